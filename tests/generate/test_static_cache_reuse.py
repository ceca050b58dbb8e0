"""The static cache kept between ``generate`` calls (``STATIC_CACHES``): several calls in a row on
one model (other batch sizes, prompt lengths, cache sizes across ``STATIC_CACHE_ROUND`` and up to
the whole context, beams, ragged batches, EOS), virtual tokens added between calls, an interrupted
call, streams and other models in between, a dtype change, and the compiled step on two batch
sizes. Every static call is checked against the usual cache (itself checked against HF elsewhere)
or against HF."""

import pytest
import torch

from lmstack import peft
from lmstack.generate import decode, generate, generate_stream
from lmstack.generate.decode import STATIC_CACHE_ROUND, STATIC_CACHES

from ..hf_models import no_special_tokens, ragged_batch, tiny_hf

pytest.importorskip("transformers")

V = 128
PAD = V - 1


def same_as_usual(m, ids, n, **kw):
    """Static and usual cache give the same sequences (and beam scores); returns the static output."""
    usual = generate(m, ids, n, pad_token_id=PAD, **kw)
    static = generate(m, ids, n, pad_token_id=PAD, static_cache=True, **kw)
    assert torch.equal(static.sequences, usual.sequences), (static.sequences[:, -8:], usual.sequences[:, -8:])
    if usual.scores is not None:
        torch.testing.assert_close(static.scores, usual.scores, atol=1e-4, rtol=0)
    return static


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: window 8, shorter than the prompts
def test_calls_in_a_row(family):
    ctx = 300  # caches of STATIC_CACHE_ROUND slots and of the whole context (rounded past it: capped)
    assert STATIC_CACHE_ROUND < ctx < 2 * STATIC_CACHE_ROUND
    h, m = tiny_hf(family, scale=3.0, seed=1, max_len=ctx)
    calls = [
        ([6, 1, 11], 20, {}),
        ([9], 5, {}),
        ([30, 12], 240, {}),  # 270 tokens: past the first round, the cache is the context
        ([20], ctx - 20, {}),  # exactly max_seq_len
        ([20, 7], ctx - 20, {}),
        ([20, 7], 30, {}),
        ([5, 5], 40, {}),  # unpadded on the same buffers: none of the last call's padding is masked
        ([7, 4], 14, dict(num_beams=4, num_return_sequences=2)),
        ([3, 9, 5], 10, dict(num_beams=2)),
        ([10, 3], ctx - 10, dict(num_beams=3, num_return_sequences=3)),
        ([6, 1, 11], 20, {}),
        ([250], 6, {}),  # 256 slots
        ([250], 7, {}),  # 257: the next size
    ]
    sizes = set()
    for lengths, n, kw in calls:
        ids, mask = ragged_batch(lengths, seed=n + len(lengths))
        same_as_usual(m, ids, n, attention_mask=mask, **kw)
        sizes.add(STATIC_CACHES[m].max_len)
    assert sizes == {STATIC_CACHE_ROUND, ctx}
    ids, mask = ragged_batch([5, 8], seed=10)
    eos = int(generate(m, ids, 6, attention_mask=mask, pad_token_id=PAD).sequences[0, -3])
    early = same_as_usual(m, ids[:1], 40, attention_mask=mask[:1], eos_token_id=eos)
    assert early.sequences.shape[1] < 8 + 40  # stopped at the EOS
    same_as_usual(m, ids, 40, attention_mask=mask, eos_token_id=eos)
    same_as_usual(m, ids, 40, attention_mask=mask)  # after a call that stopped early
    same_as_usual(m, ids, 20, attention_mask=mask, eos_token_id=eos, num_beams=3, num_return_sequences=2)
    same_as_usual(m, ids, 20, attention_mask=mask, repetition_penalty=1.3, temperature=0.8, seed=3)
    ids, mask = ragged_batch([30, 12], seed=3)  # and against HF, on the kept cache
    with torch.no_grad():
        ref = no_special_tokens(h).generate(ids, attention_mask=mask, max_new_tokens=240, do_sample=False,
                                            pad_token_id=PAD)
    assert torch.equal(generate(m, ids, 240, attention_mask=mask, pad_token_id=PAD, static_cache=True).sequences, ref)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_added_between_calls(method):
    """A cache kept from before ``peft.apply`` (no virtual tokens) is not used as if it had them;
    the context left to the prompt shrinks by the virtual tokens."""
    ctx = 300
    _, m = tiny_hf("mistral", scale=3.0, seed=4, max_len=ctx)
    ids, mask = ragged_batch([5, 9], seed=1)
    same_as_usual(m, ids, 20, attention_mask=mask)
    torch.manual_seed(4)
    peft.apply(m, method, num_virtual_tokens=5)
    with torch.no_grad():
        for p in (p for p in m.parameters() if p.requires_grad):
            p.normal_(0, 1.0)
    same_as_usual(m, ids, 20, attention_mask=mask)
    same_as_usual(m, ids[1:], 30)
    same_as_usual(m, ids, 245, attention_mask=mask)  # across the round, with the virtual slots
    same_as_usual(m, ids, ctx - 9 - 5, attention_mask=mask)  # the whole context
    same_as_usual(m, ids, 12, attention_mask=mask, num_beams=3, num_return_sequences=2)
    same_as_usual(m, ids[1:], 12, num_beams=4)
    with peft.disable_adapters(m):
        same_as_usual(m, ids, 20, attention_mask=mask)
    same_as_usual(m, ids, 20, attention_mask=mask)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_interrupted_call_then_normal_calls(monkeypatch, num_beams):
    _, m = tiny_hf("mistral", scale=3.0, seed=3)
    ids, mask = ragged_batch([5, 12, 2], seed=1)
    ref = generate(m, ids, 30, attention_mask=mask, pad_token_id=PAD).sequences
    beams = generate(m, ids, 20, attention_mask=mask, pad_token_id=PAD, num_beams=3, num_return_sequences=2)
    step, calls = decode.static_decode_step, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return step(*a, **kw)

    monkeypatch.setattr(decode, "static_decode_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(m, ids, 30, attention_mask=mask, pad_token_id=PAD, num_beams=num_beams, static_cache=True)
    monkeypatch.setattr(decode, "static_decode_step", step)
    assert torch.equal(generate(m, ids, 30, attention_mask=mask, pad_token_id=PAD, static_cache=True).sequences, ref)
    out = generate(m, ids, 20, attention_mask=mask, pad_token_id=PAD, num_beams=3, num_return_sequences=2,
                   static_cache=True)
    assert torch.equal(out.sequences, beams.sequences)


def test_streams_and_another_model_in_between():
    _, m = tiny_hf("mistral", scale=3.0, seed=3)
    _, other = tiny_hf("llama", scale=3.0, seed=5)
    ids, mask = ragged_batch([5, 12, 2], seed=1)
    prompt = ids[1].tolist()
    whole = list(generate_stream(m, prompt, 15))
    stream = generate_stream(m, prompt, 15)
    got = [next(stream) for _ in range(5)]
    same_as_usual(m, ids, 30, attention_mask=mask)
    got += [next(stream) for _ in range(5)]
    same_as_usual(m, ids[1:], 30)
    assert got + list(stream) == whole
    for _ in range(2):
        same_as_usual(m, ids, 25, attention_mask=mask)
        same_as_usual(other, ids, 25, attention_mask=mask)
        same_as_usual(other, ids[:1, -5:], 25)
        same_as_usual(m, ids, 10, attention_mask=mask, num_beams=2)
    assert STATIC_CACHES[m] is not STATIC_CACHES[other]


def test_dtype_change_between_calls():
    _, m = tiny_hf("mistral", scale=3.0, seed=3)
    ids, mask = ragged_batch([5, 12, 2], seed=1)
    for dtype in (torch.float32, torch.float64, torch.float32):  # bf16 ties at its rounding: left out
        m.to(dtype)  # each dtype's first call has the last one's cache shape
        same_as_usual(m, ids, 25, attention_mask=mask)
        assert STATIC_CACHES[m].k[0].dtype == dtype
        same_as_usual(m, ids, 10, attention_mask=mask, num_beams=3)
        same_as_usual(m, ids[1:], 25)
        same_as_usual(m, ids, 25, attention_mask=mask)


def test_compiled_static_step_on_two_batch_sizes():
    h, m = tiny_hf("llama", scale=3.0, seed=6)
    no_special_tokens(h)
    for lengths, n in (([6, 2], 10), ([5], 12)):
        ids, mask = ragged_batch(lengths, seed=n)
        with torch.no_grad():
            ref = h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD)
        out = generate(m, ids, n, attention_mask=mask, pad_token_id=PAD, compile=True, static_cache=True)
        assert torch.equal(out.sequences, ref)


def test_kept_cache_survives_a_refused_setup(monkeypatch):
    """A call whose cache setup fails (here interrupted) gives the kept cache back, so the next call
    still reuses its buffers (on a GPU: replays the CUDA graphs recorded on them)."""
    _, m = tiny_hf("llama", scale=3.0, seed=1)
    ids = torch.randint(0, V - 1, (2, 9))
    generate(m, ids, 4, static_cache=True)
    kept = STATIC_CACHES[m]
    with monkeypatch.context() as mp:
        mp.setattr(m, "setup_cache", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            generate(m, ids, 4, static_cache=True)
    assert STATIC_CACHES[m] is kept
    same_as_usual(m, ids, 4)
    assert STATIC_CACHES[m] is kept  # reused, not reallocated
