"""Decoding against HF ``generate``, round 2 (round 1: test_edge_parity.py): attention masks with
holes, prompts that end in EOS and EOS used as padding, generation up to the last slot of the
context, a sliding window of 1, dynamic NTK RoPE under beam search and the static cache, a seeded
fuzz over greedy and beam settings; and arguments that must give a one-line ``ValueError``
(or work as their int counterparts) instead of a traceback deep in the decode loop.

Peaked weights (``tiny_hf(scale=3)``) so no comparison is a near-tie; fresh random prompts
(``seed`` fixture) in every test.
"""

import json
import math
import random

import numpy as np
import pytest
import torch

from lmstack.generate import generate, generate_stream
from lmstack.interop import from_hf

from ..hf_models import hf_generate, hf_penalises_padding, load_hf, no_special_tokens, ragged_batch, tiny_hf

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 128
PAD = V - 1


@pytest.fixture(scope="module")
def llama():
    h, m = tiny_hf("llama", scale=3.0, seed=7)
    return no_special_tokens(h), m


def assert_same(out, ref, ref_scores=None, what=""):
    assert out.sequences.shape == ref.shape, (what, out.sequences.shape, ref.shape)
    assert torch.equal(out.sequences, ref), (what, out.sequences, ref)
    if ref_scores is not None:
        torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=4e-7, msg=lambda s: f"{what}: {s}")


def after_first(row_tokens: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """(B, N) bool: True strictly after each row's first EOS."""
    hit = torch.isin(row_tokens, torch.tensor(eos)).long()
    return (hit.cumsum(1) - hit) > 0


# -- masks, EOS in prompts, context end ---------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_attention_mask_with_interior_holes_matches_hf(seed, family):
    """An attention mask with zeros inside a row (not only leading padding), which lmstack accepts:
    positions are cumsum(mask) - 1 and the hole keys are masked, as in HF; greedy and beam search,
    usual and static cache; Mistral's window (3) counts the hole slots, as HF's does."""
    h, m = tiny_hf(family, scale=3.0, seed=5, window=3 if family == "mistral" else None)
    no_special_tokens(h)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, PAD, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 3:6] = 0  # a hole in the middle
    mask[1, :4] = 0  # left padding and a hole
    mask[1, 7] = 0
    mask[2, 9] = 0  # a hole right before the last token
    ref, _ = hf_generate(h, ids, mask, 12, pad_token_id=PAD)
    ref_b, ref_s = hf_generate(h, ids, mask, 12, pad_token_id=PAD, num_beams=3, num_return_sequences=2)
    for static in (False, True):
        assert_same(generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, static_cache=static), ref,
                    what=f"greedy static={static}")
        out = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, num_beams=3, num_return_sequences=2,
                       static_cache=static)
        assert_same(out, ref_b, ref_s, what=f"beam static={static}")


def test_prompts_ending_in_eos_and_eos_padding_match_hf(seed, llama):
    """Prompts whose last (or an inner) token is the EOS id do not count as finished (HF checks only
    new tokens); ragged lists padded with the EOS id (no pad_token_id: it defaults to EOS); greedy,
    beam with early_stopping True / False, and an EOS list led by that id."""
    h, m = llama
    g = torch.Generator().manual_seed(seed)
    ids, mask = ragged_batch([6, 2, 9], seed=seed % 1000, pad=PAD)
    T = ids.shape[1]
    free, _ = hf_generate(h, ids, mask, 10, pad_token_id=PAD)
    eos = int(free[1, T + 2])
    prompts = [row[k.bool()].tolist() for row, k in zip(ids, mask)]
    prompts[0][-1] = eos  # ends in EOS
    prompts[2][int(torch.randint(0, 8, (1,), generator=g))] = eos  # EOS inside
    hid = torch.full((3, T), eos)
    hmask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        hid[i, T - len(p):], hmask[i, T - len(p):] = torch.tensor(p), 1
    other = int(free[0, T + 4])
    for e in (eos, [eos, V + 9, other]):
        for kw in (dict(), dict(num_beams=3, num_return_sequences=3), dict(num_beams=2, early_stopping=True)):
            ref, scores = hf_generate(h, hid, hmask, 12, eos_token_id=e, **kw)
            assert_same(generate(m, prompts, 12, eos_token_id=e, **kw), ref, scores, what=f"{e} {kw}")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generation_up_to_the_last_context_slot_matches_hf(seed, family):
    """prompt + max_new_tokens == max_seq_len exactly (the RoPE table's and the cache's last slot),
    ragged, greedy and beam, usual and static cache (whose rounding is capped at the context);
    one token more is a one-line error."""
    ctx = 40
    h, m = tiny_hf(family, scale=3.0, seed=6, max_len=ctx, window=5 if family == "mistral" else None)
    no_special_tokens(h)
    ids, mask = ragged_batch([13, 3], seed=seed % 1000, pad=PAD)
    n = ctx - ids.shape[1]
    ref, _ = hf_generate(h, ids, mask, n, pad_token_id=PAD)
    ref_b, ref_s = hf_generate(h, ids, mask, n, pad_token_id=PAD, num_beams=3, num_return_sequences=2)
    for static in (False, True):
        assert_same(generate(m, ids, n, attention_mask=mask, pad_token_id=PAD, static_cache=static), ref,
                    what=f"greedy static={static}")
        out = generate(m, ids, n, attention_mask=mask, pad_token_id=PAD, num_beams=3, num_return_sequences=2,
                       static_cache=static)
        assert_same(out, ref_b, ref_s, what=f"beam static={static}")
    with pytest.raises(ValueError, match=f"max_seq_len={ctx}"):
        generate(m, ids, n + 1, attention_mask=mask, pad_token_id=PAD)


def test_sliding_window_of_one_decodes_like_a_cache_free_forward(seed):
    """Mistral with sliding_window=1 (each token sees only itself). HF's own cached generate is wrong
    here (its DynamicSlidingWindowLayer keeps no key at window 1, so a decode step differs from the
    full forward), so the reference is greedy decoding with HF's cache-free forward at every step,
    ragged (positions cumsum(mask) - 1)."""
    h, m = tiny_hf("mistral", scale=3.0, seed=3, window=1)
    no_special_tokens(h)
    ids, mask = ragged_batch([7, 1, 10], seed=seed % 1000, pad=PAD)
    seq, msk = ids, mask
    with torch.no_grad():
        for _ in range(10):
            pos = (msk.cumsum(-1) - 1).clamp(min=0)
            nxt = h(seq, attention_mask=msk, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq, msk = torch.cat([seq, nxt], 1), torch.cat([msk, torch.ones_like(nxt)], 1)
    for static in (False, True):
        out = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, static_cache=static)
        assert torch.equal(out.sequences, seq), (static, out.sequences[:, ids.shape[1]:], seq[:, ids.shape[1]:])


def test_dynamic_ntk_beam_and_static_cache_match_hf(tmp_path, seed):
    """Dynamic NTK RoPE (frequencies recomputed per forward pass from max(position) + 1) under beam
    search and the static cache, with a ragged prompt already past the original context (32).
    HF's rotary module keeps the frequencies of the longest pass it has seen, so each HF run gets
    a freshly loaded model."""
    hc = LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, max_position_embeddings=32, rope_theta=10000.0,
                     rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    torch.manual_seed(1)
    h = LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in h.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    h.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        cfg.pop(key, None)
    cfg.update(rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    m = from_hf(tmp_path / "hf")
    ids, mask = ragged_batch([38, 9], seed=seed % 1000, pad=PAD)
    for kw in (dict(), dict(num_beams=3, num_return_sequences=3), dict(num_beams=2, length_penalty=2.0,
                                                                       early_stopping="never")):
        ref, scores = hf_generate(no_special_tokens(load_hf(tmp_path / "hf")), ids, mask, 30, pad_token_id=PAD, **kw)
        for static in (False, True):
            out = generate(m, ids, 30, attention_mask=mask, pad_token_id=PAD, static_cache=static, **kw)
            assert_same(out, ref, scores if kw else None, what=f"{kw} static={static}")


def test_seeded_fuzz_greedy_and_beam_match_hf(seed):
    """Random settings per case: family, ragged lengths 1..14, max_new_tokens 1..16, no EOS / one /
    a list (with an id outside the vocabulary), pad id, repetition penalty < 1 or > 1, num_beams
    1..4 with any num_return_sequences, length_penalty and early_stopping, usual or static cache."""
    models = {f: tiny_hf(f, scale=3.0, seed=11, window=5 if f == "mistral" else None) for f in ("llama", "qwen2",
                                                                                                 "mistral")}
    for h, _ in models.values():
        no_special_tokens(h)
    rnd = random.Random(seed)
    old_hf = hf_penalises_padding()  # then a padded batch is drawn without a repetition penalty
    for case in range(30):
        fam = rnd.choice(sorted(models))
        h, m = models[fam]
        ids, mask = ragged_batch([rnd.randint(1, 14) for _ in range(rnd.randint(1, 3))], seed=rnd.randint(0, 999),
                                 pad=PAD)
        T, n = ids.shape[1], rnd.randint(1, 16)
        free, _ = hf_generate(h, ids, mask, n, pad_token_id=PAD)
        toks = free[:, T:].flatten().tolist()
        eos = rnd.choice([None, rnd.choice(toks), [rnd.choice(toks), rnd.choice(toks)], [rnd.choice(toks), V + 3]])
        kw = dict(eos_token_id=eos, pad_token_id=rnd.choice([PAD, None]) if eos is not None else PAD)
        penalty = rnd.choice([0.8, 1.3, 2.0]) if rnd.random() < 0.3 else None
        if penalty is not None and not (old_hf and not bool(mask.all())):  # see hf_penalises_padding
            kw["repetition_penalty"] = penalty
        N = rnd.choice([1, 2, 3, 4])
        if N > 1:
            kw.update(num_beams=N, num_return_sequences=rnd.randint(1, N), early_stopping=rnd.choice([True, False, "never"]),
                      length_penalty=rnd.choice([-1.0, 0.0, 0.5, 1.0, 2.0]))
        ref, scores = hf_generate(h, ids, mask, n, **kw)
        static = rnd.random() < 0.3
        out = generate(m, ids, n, attention_mask=mask, static_cache=static, **kw)
        assert_same(out, ref, scores if N > 1 else None, what=f"case {case}: {fam} n={n} static={static} {kw}")


# -- arguments ------------------------------------------------------------------------------------
def test_pad_token_id_outside_the_vocabulary_is_refused_or_harmless(seed, llama):
    """Rows of an unpadded batch finish at different steps; lmstack then feeds the pad id of a
    finished row into the next step, so a pad_token_id outside the vocabulary (V + 3, or -1, the
    usual "ignore" id) crashed deep in the embedding with ``IndexError: index out of range``. Either
    refuse it up front (a ValueError naming pad_token_id) or produce HF's output with that pad id
    after each row's EOS (the finished rows' next inputs do not matter). The same with no
    pad_token_id and an EOS list led by an id outside the vocabulary (pad defaults to it)."""
    h, m = llama
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, PAD, (3, 5), generator=g)
    free, _ = hf_generate(h, ids, None, 10, pad_token_id=PAD)
    for t in free[0, 5:].tolist():  # an EOS id that ends row 0 while another row goes on
        eos = [t]
        ref, _ = hf_generate(h, ids, None, 10, eos_token_id=eos, pad_token_id=PAD)
        if after_first(ref[:, 5:], eos).any():
            break
    assert after_first(ref[:, 5:], eos).any(), "every row ended at once: nothing checked"
    cases = [dict(eos_token_id=eos, pad_token_id=V + 3), dict(eos_token_id=eos, pad_token_id=-1),
             dict(eos_token_id=[V + 5] + eos)]
    for kw in cases:
        pad = kw.get("pad_token_id", V + 5)
        want = ref.clone()
        want[:, 5:][after_first(ref[:, 5:], [V + 5] + eos)] = pad
        for extra in (dict(), dict(static_cache=True), dict(temperature=0.7, top_k=1, seed=0)):
            try:
                out = generate(m, ids, 10, **kw, **extra)
            except ValueError as e:
                assert "pad_token_id" in str(e) or "eos_token_id" in str(e), (kw, extra, e)
                continue
            assert torch.equal(out.sequences, want), (kw, extra, out.sequences[:, 5:], want[:, 5:])


def test_pad_token_id_of_the_wrong_type_is_a_clear_error(seed, llama):
    """pad_token_id must be a token id: a string or a list crashed in ``torch.full`` with a
    TypeError, and 1.5 or True were silently truncated to id 1. A numpy integer is an id."""
    _, m = llama
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, PAD, (4,), generator=g).tolist(), torch.randint(0, PAD, (2,), generator=g).tolist()]
    for bad in ("0", [5], 1.5, True):
        with pytest.raises(ValueError, match="pad_token_id"):
            generate(m, prompts, 3, pad_token_id=bad)
    assert torch.equal(generate(m, prompts, 3, pad_token_id=np.int64(5)).sequences,
                       generate(m, prompts, 3, pad_token_id=5).sequences)


def test_numpy_integer_seed_works_like_an_int(seed, llama):
    """``is_int`` accepts numpy integers for a seed, but ``torch.Generator.manual_seed`` does not:
    ``seed=np.int64(3)`` raised ``TypeError: an integer is required`` from generate and from
    generate_stream. It must draw what ``seed=3`` draws."""
    _, m = llama
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, PAD, (6,), generator=g).tolist()
    s = int(torch.randint(0, 2**31, (1,), generator=g))
    kw = dict(temperature=1.2, top_p=0.95)
    ref = generate(m, [prompt], 12, seed=s, **kw).sequences
    assert torch.equal(generate(m, [prompt], 12, seed=np.int64(s), **kw).sequences, ref)
    assert list(generate_stream(m, prompt, 12, seed=np.int64(s), **kw)) == ref[0, 6:].tolist()


def test_num_beams_of_the_wrong_type_is_a_clear_error(seed, llama):
    """num_beams="2" or None crashed with ``TypeError: '>' not supported`` (``num_beams > 1`` is
    evaluated before any check); None may also mean the default (1), as in HF."""
    _, m = llama
    g = torch.Generator().manual_seed(seed)
    prompt = [torch.randint(0, PAD, (5,), generator=g).tolist()]
    with pytest.raises(ValueError, match="num_beams"):
        generate(m, prompt, 4, num_beams="2")
    try:
        out = generate(m, prompt, 4, num_beams=None)
    except ValueError as e:
        assert "num_beams" in str(e)
    else:
        assert torch.equal(out.sequences, generate(m, prompt, 4).sequences)


def test_numpy_integer_beam_counts_work_like_ints(seed, llama):
    """num_beams / num_return_sequences from numpy (a config array, argparse through numpy) were
    refused with the self-contradicting "num_beams=np.int64(2) must be an integer >= 1", while
    max_new_tokens and the seed take numpy integers (``is_int``). They must act as their ints."""
    h, m = llama
    ids, mask = ragged_batch([5, 8], seed=seed % 1000, pad=PAD)
    ref, scores = hf_generate(h, ids, mask, 8, pad_token_id=PAD, num_beams=3, num_return_sequences=2)
    out = generate(m, ids, np.int64(8), attention_mask=mask, pad_token_id=PAD, num_beams=np.int64(3),
                   num_return_sequences=np.int64(2))
    assert_same(out, ref, scores)


def test_nan_length_penalty_is_a_clear_error(seed, llama):
    """length_penalty=nan passed ``check_beam_args`` (a float), made every finished score nan, so no
    hypothesis entered the store and beam search died on its internal ``AssertionError: beam search
    ended with an empty hypothesis slot``. It must be a ValueError naming length_penalty."""
    _, m = llama
    g = torch.Generator().manual_seed(seed)
    prompt = [torch.randint(0, PAD, (5,), generator=g).tolist()]
    with pytest.raises(ValueError, match="length_penalty"):
        generate(m, prompt, 6, num_beams=2, length_penalty=math.nan)


# -- logits with no distribution ----------------------------------------------------------------
def test_sampling_from_non_finite_logits_raises_as_hf(llama, seed):
    """HF's sampling raises (torch.multinomial) when the processed logits hold NaN or inf; lmstack
    drew token 0 for such rows without a word. Greedy takes the argmax in both libraries."""
    h, m = llama
    ids = torch.randint(0, V - 1, (2, 5), generator=torch.Generator().manual_seed(seed))
    with pytest.raises(RuntimeError):  # logits / 1e-44 overflow to +-inf, softmax gives NaN
        h.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1e-44, top_k=0,
                   max_new_tokens=3)
    with pytest.raises(ValueError, match="no distribution to draw from"):
        generate(m, ids, 3, temperature=1e-44, seed=seed)
    with pytest.raises(ValueError, match="no distribution to draw from"):
        list(generate_stream(m, ids[0], 3, temperature=1e-44, seed=seed))
    assert generate(m, ids, 3, temperature=0.7, top_p=0.9, seed=seed).sequences.shape == (2, 8)  # finite: no error
    with torch.no_grad():
        w = m.lm_head.weight
        saved = w[3].clone()
        w[3] = float("nan")  # one NaN logit per row makes the whole softmax NaN
        try:
            with pytest.raises(ValueError, match="no distribution to draw from"):
                generate(m, ids, 2, temperature=1.0, seed=seed)
            generate(m, ids, 2)  # greedy: argmax, as HF's greedy search, no error
        finally:
            w[3] = saved
