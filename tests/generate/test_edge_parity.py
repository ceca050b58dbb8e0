"""Edge cases of decoding against HF ``generate`` on the same fp32 weights (peaked: no near-ties).

Ragged batches with length-1 and very long prompts, EOS on the first new token and EOS lists,
``max_new_tokens=1``, beam-search grids (num_beams 2/3/5, length_penalty < 0 / 0 / 2, every
early_stopping rule, with and without EOS), the sampling path (deterministic settings token for
token, and the sampled distribution of a ragged batch against HF's processed probabilities), the
logits processors on awkward logits, sliding windows longer than the window, Qwen2 with non-zero
q/k/v biases, a compiled decode, and ``generate_stream``.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from lmstack.generate import generate, generate_stream, process_logits

from ..hf_models import hf_penalises_padding, no_special_tokens, ragged_batch, tiny_hf

pytest.importorskip("transformers")
from transformers import GenerationConfig  # noqa: E402
from transformers.generation import logits_process as lp  # noqa: E402

V = 128
PAD = V - 1


def make(family, seed=5, **kw):
    """(hf, lmstack) in fp32; Qwen2's q/k/v biases made non-zero (HF inits them at zero, so a
    bias bug would not show), Mistral with a window of 4, shorter than the prompts below."""
    if family == "mistral":
        kw.setdefault("window", 4)
    h, m = tiny_hf(family, scale=3.0, seed=seed, **kw)
    if family == "qwen2":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in h.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g))
        sd = {k.removeprefix("model."): v for k, v in h.state_dict().items()}
        sd.pop("lm_head.weight", None)
        m.load_state_dict(sd, strict=False)
        assert any(bool(p.detach().any()) for n, p in m.named_parameters() if n.endswith("bias"))
    return no_special_tokens(h), m


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def family(request):
    return make(request.param)


@pytest.fixture(scope="module")
def llama():
    return make("llama", seed=7)


def hf_greedy(h, ids, mask, n, **kw):
    with torch.no_grad():
        return h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)


def hf_beam(h, ids, mask, n, **kw):
    with torch.no_grad():
        out = h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, out.sequences_scores


def unpadded(ids, mask):
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def assert_beams_match(h, m, ids, mask, n, **kw):
    ref, ref_scores = hf_beam(h, ids, mask, n, **kw)
    out = generate(m, ids, n, attention_mask=mask, **kw)
    T = ids.shape[1]
    assert out.sequences.shape == ref.shape, (kw, out.sequences.shape, ref.shape)
    assert torch.equal(out.sequences, ref), (kw, out.sequences[:, T:], ref[:, T:])
    torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=4e-7, msg=lambda s: f"{kw}: {s}")
    return ref


# -- greedy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [[1], [1, 1], [30, 1, 3]])
def test_greedy_ragged_edges_match_hf(family, lengths):
    """Length-1 prompts, and one prompt 30x longer than another (Mistral: far past its window),
    as a padded tensor with a mask and as ragged lists; max_new_tokens 1 and 24."""
    h, m = family
    ids, mask = ragged_batch(lengths, seed=sum(lengths), pad=PAD)
    for n in (1, 24):
        ref = hf_greedy(h, ids, mask, n, pad_token_id=PAD)
        assert torch.equal(generate(m, ids, n, attention_mask=mask, pad_token_id=PAD).sequences, ref)
        assert torch.equal(generate(m, unpadded(ids, mask), n, pad_token_id=PAD).sequences, ref)


def test_eos_edge_cases_match_hf(llama):
    """Rows ending at different steps, EOS on the very first new token (one row, every row), EOS
    lists, pad_token_id unset (HF and lmstack both pad with the first EOS id) or 0, with a
    repetition penalty, max_new_tokens 1 / 3 / 20."""
    h, m = llama
    ids, mask = ragged_batch([5, 1, 12, 7], seed=3, pad=PAD)
    T = ids.shape[1]
    free = hf_greedy(h, ids, mask, 20, pad_token_id=PAD)[:, T:]
    first = [int(t) for t in free[:, 0]]
    assert len(set(first)) > 1  # the rows do not all stop at once
    cases = [
        dict(eos_token_id=first[0], pad_token_id=PAD),
        dict(eos_token_id=first, pad_token_id=PAD),
        dict(eos_token_id=first[:2]),
        dict(eos_token_id=[int(free[0, 4]), int(free[2, 9])], pad_token_id=0),
        dict(eos_token_id=int(free[1, 2])),
        dict(eos_token_id=int(free[1, 2]), repetition_penalty=1.5, pad_token_id=PAD),
    ]
    for kw in cases:
        for n in (1, 3, 20):
            ref = hf_greedy(h, ids, mask, n, **kw)
            out = generate(m, ids, n, attention_mask=mask, **kw).sequences
            assert torch.equal(out, ref), (kw, n, out[:, T:], ref[:, T:])
    out = generate(m, ids, 20, attention_mask=mask, eos_token_id=first, pad_token_id=PAD).sequences
    assert out.shape[1] == T + 1  # every row ended on its first token: no second step


# -- sampling -----------------------------------------------------------------------------------
def hf_processors(h, ids, mask, **settings):
    """The processors HF ``generate(do_sample=True)`` builds (top_k explicit: HF's default is 50)."""
    settings.setdefault("top_k", 0)
    return h._get_logits_processor(
        generation_config=GenerationConfig(do_sample=True, **settings), input_ids_seq_length=ids.shape[1],
        encoder_input_ids=ids, prefix_allowed_tokens_fn=None, logits_processor=lp.LogitsProcessorList(),
        device="cpu", model_kwargs={"attention_mask": mask.long()},
    )


@pytest.mark.parametrize("settings", [
    dict(top_k=1, temperature=0.7),
    dict(top_p=1e-6, temperature=1.3, repetition_penalty=1.5),
    dict(min_p=1.0, top_k=40, typical_p=0.99, temperature=0.5),
])
def test_sampling_path_with_one_token_left_matches_hf(settings):
    """Sampling settings that leave one token: HF's sampler and lmstack's must then agree token for
    token through the whole sampling path (processors, draw, ragged positions, EOS, padding)."""
    if "repetition_penalty" in settings and hf_penalises_padding():
        pytest.skip("this transformers penalises left padding in repetition_penalty (newer ones, and lmstack, do not)")
    h, m = make("mistral", seed=2)
    ids, mask = ragged_batch([1, 12, 5], seed=8, pad=PAD)
    T = ids.shape[1]
    free = hf_greedy(h, ids, mask, 20, pad_token_id=PAD)
    eos = [int(free[0, T + 3]), int(free[2, T + 7])]
    torch.manual_seed(0)
    with torch.no_grad():
        ref = h.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, pad_token_id=PAD,
                         eos_token_id=eos, **{"top_k": 0, **settings})
    out = generate(m, ids, 20, attention_mask=mask, pad_token_id=PAD, eos_token_id=eos, seed=3, **settings)
    assert torch.equal(out.sequences, ref), (out.sequences[:, T:], ref[:, T:])


def chi2_bound(df: int) -> float:
    """Chi-square quantile at p = 1e-4 (Wilson-Hilferty), df >= 1. The draws are seeded, so the
    test is deterministic; the bound only decides how far from HF's probabilities they may land."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_distribution(counts: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    n = float(counts.sum())
    assert n >= 20, what
    assert counts[probs == 0].sum() == 0, f"{what}: drew a token HF's processors removed"
    expected = probs.double() * n
    big = expected >= 5
    stat = float(((counts[big] - expected[big]) ** 2 / expected[big]).sum())
    rest_e, rest_c = float(expected[~big].sum()), float(counts[~big].sum())
    df = int(big.sum()) - 1
    if rest_e >= 5:
        stat += (rest_c - rest_e) ** 2 / rest_e
        df += 1
    if df >= 1:  # else too few draws for the test: only the support is checked
        assert stat < chi2_bound(df), f"{what}: chi2 {stat:.1f} over {df} degrees of freedom"


@pytest.mark.parametrize("settings", [
    dict(temperature=0.3, top_k=20, top_p=0.95, repetition_penalty=1.3),
    dict(temperature=0.5, top_k=50, top_p=0.98, min_p=0.02, typical_p=0.9),
])
def test_sampled_distribution_matches_hf_ragged(settings):
    """A ragged batch (prompts of 1, 6 and 11 tokens), 4000 samples each (``num_return_sequences``,
    as HF's ``generate(do_sample=True, num_return_sequences=4000)``): the first new token's
    frequencies follow HF's processed probabilities for each prompt, and so do the second's given
    the commonest first token (positions, padding and the penalty's mask in the decode step)."""
    h, m = tiny_hf("llama", scale=4.0, seed=3)
    no_special_tokens(h)
    ids, mask = ragged_batch([1, 6, 11], seed=2, pad=PAD)
    B, T = ids.shape
    R = 4000
    out = generate(m, ids, 2, attention_mask=mask, pad_token_id=PAD, seed=0, num_return_sequences=R,
                   **settings).sequences

    def hf_probs(ids, mask):
        with torch.no_grad():
            logits = h(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        return hf_processors(h, ids, mask, **settings)(ids, logits.float()).softmax(-1)

    first = hf_probs(ids, mask)
    for b in range(B):
        mine = out[b * R : (b + 1) * R]
        counts = torch.bincount(mine[:, T], minlength=V).double()
        assert_distribution(counts, first[b], f"prompt {b}, token 1")
        mode = int(counts.argmax())
        ids2 = torch.cat([ids[b : b + 1], torch.tensor([[mode]])], 1)
        mask2 = torch.cat([mask[b : b + 1], torch.ones(1, 1, dtype=mask.dtype)], 1)
        counts2 = torch.bincount(mine[mine[:, T] == mode, T + 1], minlength=V).double()
        assert_distribution(counts2, hf_probs(ids2, mask2)[0], f"prompt {b}, token 2 after {mode}")


def edge_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    W = 32
    rows = [torch.randn(W, generator=g) * 3]
    r = torch.full((W,), float("-inf"))
    r[7] = 1.0
    rows.append(r)  # a single finite logit
    r = torch.full((W,), float("-inf"))
    r[3] = r[9] = 2.0
    r[11] = -1.0
    rows.append(r)  # three finite, tied at the top
    rows.append(torch.zeros(W))  # all tied
    r = torch.randn(W, generator=g).round()
    r[:10] = float("-inf")
    rows.append(r)  # ties and -inf
    rows.append(torch.randn(W, generator=g) * 30)  # extremely peaked
    r = -torch.rand(W, generator=g) * 1e-3 - 5
    rows.append(r)  # nearly flat
    return torch.stack(rows)


def test_processors_on_edge_logits_match_hf_pipeline(llama):
    """process_logits against the processor list HF ``generate`` builds, combined in HF's order,
    on rows with one finite logit, ties at the top, all ties, -inf, extreme and flat logits:
    top_k past the vocabulary, top_p 1 / tiny, min_p 0 / 1 with temperature, typical_p tiny."""
    h, _ = llama
    logits = edge_logits()
    B, W = logits.shape
    ids = torch.randint(0, W, (B, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[::2, :2] = False
    grid = itertools.product((0.5, 2.3), (None, 1, W + 10), (None, 1.0, 0.5, 1e-6), (None, 0.0, 1.0), (None, 1e-4, 0.5))
    for i, (temp, k, p, mp, ty) in enumerate(grid):
        rp = 1.3 if i % 2 else None
        s = {n: v for n, v in dict(temperature=temp, top_k=k, top_p=p, min_p=mp, typical_p=ty,
                                     repetition_penalty=rp).items() if v is not None}
        ref = hf_processors(h, ids, mask, **s)(ids, logits.clone())
        # (a transformers that penalises padding too is matched by giving lmstack no mask)
        ours = process_logits(logits, ids, input_mask=None if rp and hf_penalises_padding() else mask, **s)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), s
        assert torch.equal(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)]), s
    assert i + 1 == 2 * 3 * 4 * 3 * 3


# -- beam search --------------------------------------------------------------------------------
@pytest.mark.parametrize("eos_kind", ["none", "one", "list"])
@pytest.mark.parametrize("num_beams", [2, 3, 5])
def test_beam_grid_matches_hf(llama, num_beams, eos_kind):
    """num_return_sequences == num_beams, length_penalty -1 / 0 / 2 with early_stopping True / False /
    "never", sequences and final scores; ragged prompts of 1, 9 and 4 tokens; and max_new_tokens=1.
    The EOS list holds each prompt's greedy first token: hypotheses end on their first token."""
    h, m = llama
    ids, mask = ragged_batch([1, 9, 4], seed=11, pad=PAD)
    T = ids.shape[1]
    free = hf_greedy(h, ids, mask, 10, pad_token_id=PAD)[:, T:]
    eos = {"none": None, "one": int(free[0, 2]), "list": [int(t) for t in free[:, 0]]}[eos_kind]
    for lp_, es in ((-1.0, True), (-1.0, "never"), (0.0, False), (2.0, False), (2.0, "never")):
        assert_beams_match(h, m, ids, mask, 12, num_beams=num_beams, num_return_sequences=num_beams,
                           length_penalty=lp_, early_stopping=es, eos_token_id=eos, pad_token_id=PAD)
    assert_beams_match(h, m, ids, mask, 1, num_beams=num_beams, num_return_sequences=num_beams,
                       eos_token_id=eos, pad_token_id=PAD)


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_beam_long_and_short_prompt_with_penalty_matches_hf(name):
    """A 1-token and a 40-token prompt (Mistral: 10x its window), repetition penalty, EOS."""
    h, m = make(name, seed=9)
    ids, mask = ragged_batch([1, 40], seed=6, pad=PAD)
    T = ids.shape[1]
    eos = int(hf_greedy(h, ids, mask, 8, pad_token_id=PAD)[1, T + 5])
    for N, lp_, es, e in ((2, 1.0, False, eos), (5, 2.0, "never", eos), (5, -0.5, True, None)):
        assert_beams_match(h, m, ids, mask, 20, num_beams=N, num_return_sequences=N, length_penalty=lp_,
                           early_stopping=es, eos_token_id=e, pad_token_id=PAD, repetition_penalty=1.2)


def test_beam_hypotheses_padded_with_pad_token_id_zero(llama):
    """pad_token_id=0: lmstack pads finished hypotheses with 0, as documented. (HF 5.x fills them
    with the EOS id instead: ``output_fill_value = pad_token_id or eos_token_id[0]`` in
    ``_beam_search`` treats a pad id of 0 as unset, so HF is run with another pad id and its
    padding is mapped to 0; the pad id changes no beam decision.)"""
    h, m = llama
    ids, mask = ragged_batch([6, 11], seed=0, pad=PAD)
    T = ids.shape[1]
    eos = int(hf_greedy(h, ids, mask, 4, pad_token_id=PAD)[1, T + 3])
    kw = dict(num_beams=4, num_return_sequences=4, eos_token_id=eos)
    ref, ref_scores = hf_beam(h, ids, mask, 16, pad_token_id=PAD, **kw)
    new = ref[:, T:].clone()
    ended = (new == eos).cumsum(1) - (new == eos).long() > 0  # strictly after the first EOS
    assert ended.any(), "no hypothesis ended early: the test checks nothing"
    new[ended] = 0
    out = generate(m, ids, 16, attention_mask=mask, pad_token_id=0, **kw)
    assert out.sequences.shape == ref.shape
    assert torch.equal(out.sequences[:, :T], ref[:, :T]) and torch.equal(out.sequences[:, T:], new)
    torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=4e-7)


# -- streaming, compiling, inputs ---------------------------------------------------------------
def test_stream_matches_generate_edges(family):
    """generate_stream = generate's new tokens up to (not including) the first EOS: a 1-token and
    a 30-token prompt, max_new_tokens 1 and 20, EOS on the first token, EOS lists, penalties,
    seeded sampling with every filter."""
    h, m = family
    ids, mask = ragged_batch([1, 30], seed=4, pad=PAD)
    T = ids.shape[1]
    ref = hf_greedy(h, ids, mask, 20, pad_token_id=PAD)[:, T:]
    for i, prompt in enumerate(unpadded(ids, mask)):
        assert list(generate_stream(m, prompt, 20)) == ref[i].tolist()  # and so equal to HF
        settings = [dict(), dict(eos_token_id=int(ref[i, 0])), dict(eos_token_id=[V + 5, int(ref[i, 6])]),
                    dict(repetition_penalty=1.7), dict(repetition_penalty=0.7, eos_token_id=int(ref[i, 3])),
                    dict(temperature=0.9, top_k=30, top_p=0.95, min_p=0.02, typical_p=0.97, repetition_penalty=1.2,
                         seed=5)]
        for kw in settings:
            for n in (1, 20):
                new = generate(m, [prompt], n, **kw).sequences[0, len(prompt):].tolist()
                eos = kw.get("eos_token_id")
                eos = set([eos] if isinstance(eos, int) else eos or [])
                stop = next((j for j, t in enumerate(new) if t in eos), len(new))
                assert list(generate_stream(m, prompt, n, **kw)) == new[:stop], (kw, n)


def test_compiled_sliding_window_ragged_matches_hf():
    """compile=True on a Mistral model whose window (4) is shorter than the prompts, ragged."""
    h, m = make("mistral", seed=5, layers=1)
    ids, mask = ragged_batch([3, 9, 1], seed=4, pad=PAD)
    ref = hf_greedy(h, ids, mask, 10, pad_token_id=PAD)
    assert torch.equal(generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, compile=True).sequences, ref)


def test_eos_id_as_numpy_integer_or_tensor_like_hf(llama):
    """HF ``generate`` takes an EOS id as an int, a numpy integer or a tensor (0-d or 1-d), all
    alike; so should ``generate`` and ``generate_stream`` (ids often come out of numpy arrays or
    tensors)."""
    h, m = llama
    prompt = [3, 17, 60, 5]
    ids = torch.tensor([prompt])
    free = hf_greedy(h, ids, None, 8)[0, 4:].tolist()
    eos = free[3]
    ref = hf_greedy(h, ids, None, 8, eos_token_id=eos, pad_token_id=PAD)
    stop = free.index(eos)
    for e in (torch.tensor([eos]), np.int64(eos), torch.tensor(eos)):
        assert torch.equal(hf_greedy(h, ids, None, 8, eos_token_id=e, pad_token_id=PAD), ref)
        assert torch.equal(generate(m, [prompt], 8, eos_token_id=e, pad_token_id=PAD).sequences, ref), type(e)
        assert list(generate_stream(m, prompt, 8, eos_token_id=e)) == free[:stop], type(e)


def test_numpy_prompts_work_like_tensors(llama):
    """A numpy array of ids (a tokenizer's ``return_tensors="np"``) is a prompt, as a tensor is, in
    ``generate`` and ``generate_stream``; float ids are refused."""
    h, m = llama
    ids = torch.tensor([[3, 17, 60, 5], [9, 2, 41, 7]])
    ref = hf_greedy(h, ids, None, 6)
    assert torch.equal(generate(m, ids.numpy(), 6).sequences, ref)
    assert torch.equal(generate(m, ids[0].numpy(), 6).sequences, ref[:1])
    assert list(generate_stream(m, ids[0].numpy(), 6)) == ref[0, 4:].tolist()
    with pytest.raises(ValueError, match="integer token ids"):
        generate(m, ids.numpy().astype(np.float32), 6)
