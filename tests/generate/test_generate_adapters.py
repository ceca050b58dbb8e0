"""Adversarial review: decoding with PEFT adapters through the Python API.

References, each independent of lmstack's decode loop:
- LoRA / IA3: transformers' ``generate`` on the HF export of the merged weights
  (``lmstack.peft.merge_and_unload`` + ``lmstack.to_hf``) against ``lmstack.generate`` on the UNMERGED
  adapter model: greedy and beam sequences and beam scores.
- prompt tuning: transformers' ``generate(inputs_embeds=[soft prompt; token embeddings])`` (before
  the input) or ``[token embeddings; soft prompt]`` (``position="end"``).
- prefix tuning / P-tuning v2 initialised from text: the adapted model is then exactly the base model
  reading that text first, so transformers' ``generate`` on ``[text, padding, prompt]`` is the reference.
- peft's own forward on the adapter saved with ``save_adapter(format="peft")``, through a cache-free
  greedy loop (Mistral's sliding window shorter than virtual tokens + prompt).
Weights are scaled up (``tiny_hf(scale=3)``) so there are no near-ties.
"""

import copy

import pytest
import torch

import lmstack
import lmstack.peft as lp
from lmstack.generate import generate, generate_stream

from ..hf_models import load_hf, no_special_tokens, ragged_batch, tiny_hf

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 128
PAD = V - 1
TOL = 1e-4


def randomize(m, scale):
    with torch.no_grad():
        for p in lp.adapter_parameters(m):
            p.add_(torch.randn_like(p) * scale)
    m.eval()
    return m


def merged_hf(m, path):
    """The HF model of ``m``'s adapter merged into a copy of its weights (m itself is left alone)."""
    mm = lp.merge_and_unload(copy.deepcopy(m))
    lmstack.to_hf(mm, path)
    return no_special_tokens(load_hf(path))


def hf_generate(h, n, **kw):
    with torch.no_grad():
        out = h.generate(max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=PAD, **kw)
    return out.sequences, getattr(out, "sequences_scores", None)


def assert_same(out, ref_new, ref_scores, T):
    new = out.sequences[:, T:]
    assert new.shape == ref_new.shape and torch.equal(new, ref_new), (new, ref_new)
    if ref_scores is not None:
        torch.testing.assert_close(out.scores, ref_scores, atol=TOL, rtol=1e-6)


DECODES = [
    dict(),
    dict(static_cache=True),
    dict(num_beams=3, num_return_sequences=2),
    dict(num_beams=4, num_return_sequences=4, length_penalty=0.5, static_cache=True),
]


def hf_kw(kw):
    return {k: v for k, v in kw.items() if k not in ("static_cache", "compile")}


# -- LoRA / IA3: unmerged adapter == HF on the merged weights -----------------------------------------------
MERGEABLE = {
    "lora_llama": ("llama", "lora", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
    "lora_rs_all_qwen2": ("qwen2", "lora", dict(r=2, alpha=3, target_modules="all-linear", use_rslora=True)),
    "lora_lm_head_mistral": ("mistral", "lora", dict(r=2, alpha=4, target_modules=["lm_head", "k_proj"])),
    "ia3_qwen2": ("qwen2", "ia3", dict()),  # k/v bias scaled too
}


@pytest.mark.parametrize("case", list(MERGEABLE))
def test_unmerged_adapter_decodes_like_hf_on_merged_weights(tmp_path, seed, case):
    family, method, options = MERGEABLE[case]
    _, m = tiny_hf(family, scale=3.0, seed=seed % 1000, window=5)
    randomize(lp.apply(m, method, **options), 0.3 if method == "lora" else 0.5)
    h = merged_hf(m, tmp_path / "merged")
    ids, mask = ragged_batch([4, 9, 6], seed=seed)
    eos = int(generate(m, ids, 6, attention_mask=mask, pad_token_id=PAD).sequences[1, -2])
    for kw in DECODES:
        for extra in (dict(), dict(eos_token_id=eos)):
            ref, scores = hf_generate(h, 10, input_ids=ids, attention_mask=mask, **hf_kw(kw), **extra)
            out = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, **kw, **extra)
            assert_same(out, ref[:, ids.shape[1]:], scores, ids.shape[1])
    # a stream is the greedy row alone
    ref, _ = hf_generate(h, 8, input_ids=ids[1:])
    assert list(generate_stream(m, ids[1], 8)) == ref[0, 9:].tolist()


# -- prompt tuning: HF generate on inputs_embeds ---------------------------------------------------------
@pytest.mark.parametrize("family,window,position", [("llama", None, "start"), ("mistral", 3, "start"),
                                                    ("qwen2", None, "end"), ("mistral", 5, "end")])
def test_prompt_tuning_decodes_like_hf_on_inputs_embeds(seed, family, window, position):
    h, m = tiny_hf(family, scale=3.0, seed=seed % 1000, window=window)
    h = no_special_tokens(h)
    P = 4
    lp.apply(m, "prompt", num_virtual_tokens=P, position=position)
    table = m.virtual_embeds if position == "start" else m.soft_tokens
    with torch.no_grad():
        table.weight.normal_(0, 1.0)
    m.eval()
    ids, mask = ragged_batch([7, 3, 10], seed=seed)
    B = ids.shape[0]
    soft = table.weight.detach()[None].expand(B, -1, -1)
    ones = torch.ones(B, P, dtype=torch.long)
    with torch.no_grad():
        emb = h.get_input_embeddings()(ids)
    if position == "start":
        emb, hmask = torch.cat([soft, emb], 1), torch.cat([ones, mask], 1)
    else:  # placeholders -1..-P at the end of every prompt
        emb, hmask = torch.cat([emb, soft], 1), torch.cat([mask, ones], 1)
        ids = torch.cat([ids, torch.tensor(lp.soft_prompt_ids(m))[None].expand(B, -1)], 1)
        mask = hmask
    for kw in DECODES:
        ref, scores = hf_generate(h, 10, inputs_embeds=emb, attention_mask=hmask, **hf_kw(kw))
        out = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, **kw)
        assert_same(out, ref, scores, ids.shape[1])


# -- prefix tuning / P-tuning v2 from text: HF generate on [text, padding, prompt] -------------------------
@pytest.mark.parametrize("method,family,window", [("ptuning_v2", "mistral", 3), ("prefix", "qwen2", None),
                                                  ("ptuning_v2", "llama", None)])
def test_prefix_from_text_decodes_like_hf_reading_the_text(seed, method, family, window):
    h, m = tiny_hf(family, scale=3.0, seed=seed % 1000, window=window)
    h = no_special_tokens(h)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, PAD, (5,), generator=g)
    lp.apply(m, method, num_virtual_tokens=5, init_token_ids=text.tolist())
    m.eval()
    ids, mask = ragged_batch([6, 2, 9], seed=seed)
    B, T = ids.shape
    hids = torch.cat([text[None].expand(B, -1), ids], 1)
    hmask = torch.cat([torch.ones(B, 5, dtype=torch.long), mask], 1)
    for kw in DECODES:
        ref, scores = hf_generate(h, 10, input_ids=hids, attention_mask=hmask, **hf_kw(kw))
        out = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, **kw)
        assert_same(out, ref[:, 5 + T:], scores, T)
    ref, _ = hf_generate(h, 8, input_ids=hids[2:])
    assert list(generate_stream(m, ids[2], 8)) == ref[0, 5 + T:].tolist()


# -- virtual tokens exported to peft, sliding window shorter than prefix + prompt ---------------------------
@pytest.mark.parametrize("method,options", [("prefix", dict(num_virtual_tokens=3, encoder_hidden_size=16)),
                                            ("prompt", dict(num_virtual_tokens=4))])
def test_virtual_tokens_with_sliding_window_match_peft_forward(tmp_path, seed, method, options):
    from peft import PeftModel

    h, m = tiny_hf("mistral", scale=3.0, seed=seed % 1000, window=3)
    randomize(lp.apply(m, method, **options), 1.0)
    lp.save_adapter(m, tmp_path / "a", format="peft")
    pm = PeftModel.from_pretrained(no_special_tokens(h), tmp_path / "a").eval()
    ids = torch.randint(0, PAD, (2, 9))
    cur = ids
    with torch.no_grad():
        for _ in range(8):  # cache-free greedy over peft's forward
            cur = torch.cat([cur, pm(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(m, ids, 8).sequences, cur)
    assert torch.equal(generate(m, ids, 8, static_cache=True).sequences, cur)
    assert list(generate_stream(m, ids[0], 8)) == cur[0, 9:].tolist()


# -- state between calls: merge / unmerge / disable / switch adapters ---------------------------------------
def test_merge_unmerge_disable_and_switching_between_calls(tmp_path, seed):
    h, m = tiny_hf("llama", scale=3.0, seed=seed % 1000)
    base = no_special_tokens(h)
    randomize(lp.apply(m, "lora", r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"]), 0.3)
    merged = merged_hf(m, tmp_path / "lora")
    ids, mask = ragged_batch([5, 9, 3], seed=seed)
    one = ids[1:2]  # the unpadded row alone

    def check(h_ref, **kw):
        for x, am in ((ids, mask), (one, None)):  # 1-row steps take the decode layout's one-row copies
            ref, scores = hf_generate(h_ref, 8, input_ids=x, attention_mask=am, **hf_kw(kw))
            assert_same(generate(m, x, 8, attention_mask=am, pad_token_id=PAD, **kw), ref[:, x.shape[1]:], scores,
                        x.shape[1])

    for kw in (dict(static_cache=True), dict(num_beams=2, static_cache=True)):
        check(merged, **kw)
        lp.merge(m)
        check(merged, **kw)
        lp.unmerge(m)
        check(merged, **kw)
        with lp.disable_adapters(m):
            check(base, **kw)
    lp.unload(m)
    check(base, static_cache=True)
    randomize(lp.apply(m, "ia3"), 0.5)
    check(merged_hf(m, tmp_path / "ia3"), static_cache=True)
    lp.unload(m)
    lp.apply(m, "ptuning_v2", num_virtual_tokens=3, init_token_ids=[7, 8, 9])
    text = torch.tensor([[7, 8, 9]])
    for x, am in ((ids, mask), (one, None)):
        B = x.shape[0]
        hm = None if am is None else torch.cat([torch.ones(B, 3, dtype=torch.long), am], 1)
        ref, _ = hf_generate(base, 8, input_ids=torch.cat([text.expand(B, -1), x], 1), attention_mask=hm)
        out = generate(m, x, 8, attention_mask=am, pad_token_id=PAD, static_cache=True)
        assert torch.equal(out.sequences[:, x.shape[1]:], ref[:, 3 + x.shape[1]:])
    with lp.disable_adapters(m):
        check(base, static_cache=True)


def test_merge_while_another_stream_is_open(tmp_path, seed):
    """A stream the caller has not finished (kept in a variable) decodes with copies of the weights
    that every call sharing its layout uses: merging under it used to make a later, separate
    ``generate`` decode with the weights from before ``merge``. It is refused, and works once the
    stream is closed."""
    _, m = tiny_hf("llama", scale=3.0, seed=seed % 1000)
    randomize(lp.apply(m, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), 0.3)
    h = merged_hf(m, tmp_path / "m")
    ids = torch.randint(0, PAD, (1, 6))
    ref, _ = hf_generate(h, 10, input_ids=ids)
    assert torch.equal(generate(m, ids, 10).sequences, ref)
    stream = generate_stream(m, ids[0], 4)
    next(stream)  # the caller reads one token, then moves on
    with pytest.raises(ValueError, match="merge: a generate_stream on this model is still open"):
        lp.merge(m)
    stream.close()
    lp.merge(m)
    out = generate(m, ids, 10).sequences
    assert torch.equal(out, ref), (out[0, 6:], ref[0, 6:])


def test_adapter_applied_while_another_stream_is_open(tmp_path, seed):
    """The same with the other switch between calls: an adapter applied after a plain model's
    stream started was ignored by the next ``generate``. Refused until the stream is closed."""
    h, m = tiny_hf("llama", scale=3.0, seed=seed % 1000)
    ids = torch.randint(0, PAD, (1, 6))
    stream = generate_stream(m, ids[0], 4)
    next(stream)
    with pytest.raises(ValueError, match=r"apply\('lora'\): a generate_stream"):
        lp.apply(m, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    assert lp.method_of(m) is None
    stream.close()
    randomize(lp.apply(m, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), 0.3)
    ref, _ = hf_generate(merged_hf(m, tmp_path / "m"), 10, input_ids=ids)
    out = generate(m, ids, 10).sequences
    assert torch.equal(out, ref), (out[0, 6:], ref[0, 6:])


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_on_a_tied_lm_head_merges_exactly_or_is_refused(tmp_path, seed, feedforward):
    """LoRA on a tied lm_head is refused (its merge would change the embedding too); IA3's merge
    scales the same shared matrix, so it must be refused as well, or merge exactly."""
    _, m = tiny_hf("qwen2", scale=3.0, seed=seed % 1000)  # tied embeddings
    assert m.config.tie_embeddings
    try:
        lp.apply(m, "ia3", target_modules=["lm_head", "k_proj"], feedforward_modules=["lm_head"] if feedforward else [])
    except ValueError as e:
        assert "lm_head" in str(e)
        return
    randomize(m, 0.5)
    x = torch.randint(0, PAD, (2, 8))
    with torch.no_grad():
        unmerged = m(x)
        merged = lp.merge(m)(x)
    lp.unmerge(m)
    assert (unmerged - merged).abs().max() <= TOL, "merge() changed what the model computes"
    ids, mask = ragged_batch([5, 8], seed=seed)
    ref, _ = hf_generate(merged_hf(m, tmp_path / "m"), 8, input_ids=ids, attention_mask=mask)
    assert torch.equal(generate(m, ids, 8, attention_mask=mask, pad_token_id=PAD).sequences, ref)


# -- compiled decode step with an adapter, then disabled ---------------------------------------------------
def test_compiled_step_with_lora_and_disabled(tmp_path, seed):
    h, m = tiny_hf("mistral", scale=3.0, seed=seed % 1000, dim=32, heads=2, kv_heads=1, ffn=48, layers=1, window=4)
    randomize(lp.apply(m, "lora", r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"]), 0.3)
    ids, mask = ragged_batch([5, 8], seed=seed)
    ref, _ = hf_generate(merged_hf(m, tmp_path / "m"), 8, input_ids=ids, attention_mask=mask)
    assert torch.equal(generate(m, ids, 8, attention_mask=mask, pad_token_id=PAD, compile=True).sequences, ref)
    base, _ = hf_generate(no_special_tokens(h), 8, input_ids=ids, attention_mask=mask)
    with lp.disable_adapters(m):
        assert torch.equal(generate(m, ids, 8, attention_mask=mask, pad_token_id=PAD, compile=True).sequences, base)
