"""Static-shape decoding (``generate(static_cache=True)``, the CUDA-graph path) against HF and
against the usual cache, on the same random weights: greedy, ragged batches, beam search, sliding
windows, virtual tokens; and the compiled step (one graph reused across lengths)."""

import pytest
import torch

import lmstack
from lmstack import peft
from lmstack.generate import generate, generate_stream
from lmstack.generate.decode import STATIC_CACHE_ROUND, Steps

from ..hf_models import no_special_tokens, ragged_batch, tiny_hf

pytest.importorskip("transformers")

V = 128
PAD = V - 1


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def family(request):
    h, m = tiny_hf(request.param, scale=3.0, seed=2)  # mistral: sliding window 8 < prompt + new tokens
    return no_special_tokens(h), m


@pytest.mark.parametrize("lengths", [[9], [5, 5, 5], [6, 1, 11]])
def test_static_greedy_matches_hf(family, lengths):
    h, m = family
    ids, mask = ragged_batch(lengths, seed=sum(lengths))
    with torch.no_grad():
        ref = h.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    out = generate(m, ids, 20, attention_mask=mask, pad_token_id=PAD, static_cache=True).sequences
    assert torch.equal(out, ref), (out[:, ids.shape[1]:], ref[:, ids.shape[1]:])


def test_static_beam_matches_hf(family):
    h, m = family
    ids, mask = ragged_batch([7, 4], seed=3)
    with torch.no_grad():
        greedy = h.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
        eos = int(greedy[0, -1])  # a token the beams do emit, so hypotheses finish early
        ref = h.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, num_beams=4,
                         num_return_sequences=2, eos_token_id=eos, pad_token_id=PAD, output_scores=True,
                         return_dict_in_generate=True)
    out = generate(m, ids, 14, attention_mask=mask, num_beams=4, num_return_sequences=2, eos_token_id=eos,
                   pad_token_id=PAD, static_cache=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_static_with_virtual_tokens_equals_usual_cache(method):
    """Soft prompts and prefixes occupy the cache's first slots; static steps write after them and
    give the RoPE positions the usual cache gives."""
    _, m = tiny_hf("llama", scale=3.0, seed=4)
    torch.manual_seed(4)
    peft.apply(m, method, num_virtual_tokens=5)
    with torch.no_grad():
        for p in (p for p in m.parameters() if p.requires_grad):
            p.normal_(0, 1.0)  # not the near-identity init: the virtual tokens must matter
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 8)]
    usual = generate(m, prompts, 16, pad_token_id=PAD).sequences
    assert torch.equal(generate(m, prompts, 16, pad_token_id=PAD, static_cache=True).sequences, usual)
    assert torch.equal(generate(m, [prompts[1]], 16, static_cache=True).sequences,
                       generate(m, [prompts[1]], 16).sequences)
    beams = [generate(m, prompts, 12, pad_token_id=PAD, num_beams=3, num_return_sequences=2, static_cache=s)
             for s in (False, True)]  # each prompt's prefill, virtual tokens included, copied to its beams
    assert torch.equal(beams[0].sequences, beams[1].sequences)
    torch.testing.assert_close(beams[0].scores, beams[1].scores, atol=1e-5, rtol=0)


def test_static_cache_size_is_rounded_up():
    cfg = lmstack.ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                              max_seq_len=3 * STATIC_CACHE_ROUND)
    m = lmstack.Transformer(cfg)
    assert Steps(static=True).setup_cache(m, 2, 37).max_len == STATIC_CACHE_ROUND
    assert Steps(static=True).setup_cache(m, 2, STATIC_CACHE_ROUND + 1).max_len == 2 * STATIC_CACHE_ROUND
    assert Steps(static=True).setup_cache(m, 2, 3 * STATIC_CACHE_ROUND - 5).max_len == 3 * STATIC_CACHE_ROUND
    assert Steps().setup_cache(m, 2, 37).max_len == 37
    m.virtual_tokens = 10  # the context also holds them: the rounding stops at what is left
    assert Steps(static=True).setup_cache(m, 1, 3 * STATIC_CACHE_ROUND - 20).max_len == 3 * STATIC_CACHE_ROUND
    with pytest.raises(ValueError, match="exceeds the model context"):  # no silent shrinking
        Steps(static=True).setup_cache(m, 1, 3 * STATIC_CACHE_ROUND - 5)


def test_static_step_bad_input():
    _, m = tiny_hf("llama", seed=5)
    cache = m.setup_cache(1, 16)
    m(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="cache_slots"):
        m(torch.tensor([[4]]), cache=cache, cache_slots=cache.static_slot())  # no positions
    cache.reorder(torch.tensor([0]))  # one index per row is fine
    with pytest.raises(ValueError, match="one index per cache row"):
        cache.reorder(torch.tensor([0, 0]))
    beams = m.setup_cache(2, 16)
    with pytest.raises(ValueError, match="copy_rows fills an empty cache of 2 rows"):
        beams.copy_rows(cache, torch.tensor([0, 0, 0]))
    beams.copy_rows(cache, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="into one holding 3"):  # not empty any more
        beams.copy_rows(cache, torch.tensor([0, 0]))


def test_copy_rows_equals_prefilling_each_row():
    """Beam search prefills each prompt once and copies its cache rows to its beams: the copy holds
    what prefilling the repeated prompts would (padding and a prefix's virtual keys included)."""
    from lmstack.generate.decode import padded_positions, prefill

    _, m = tiny_hf("llama", seed=11)
    torch.manual_seed(11)
    peft.apply(m, "prefix", num_virtual_tokens=3)
    with torch.no_grad():
        for p in (p for p in m.parameters() if p.requires_grad):
            p.normal_(0, 1.0)
    ids, mask = ragged_batch([4, 7], seed=11)
    pad = mask.bool()
    rows = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        prompts = m.setup_cache(2, 7)
        prefill(m, ids, prompts, padded_positions(pad), pad)
        copied = m.setup_cache(5, 20)
        copied.copy_rows(prompts, rows)
        direct = m.setup_cache(5, 20)
        prefill(m, ids[rows], direct, padded_positions(pad[rows]), pad[rows])
    assert copied.length == direct.length == 3 + 7
    assert torch.equal(copied.key_valid, direct.key_valid)
    for a, b in zip((*copied.k, *copied.v), (*direct.k, *direct.v)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_static_cache_is_reused_across_calls():
    """A second call of the same batch size and cache size decodes on the first call's buffers
    (CUDA graphs replay on their addresses), zeroed: stale NaNs in them change nothing. Another
    size gets a new cache, which is kept instead."""
    from lmstack.generate.decode import STATIC_CACHES

    _, m = tiny_hf("llama", scale=3.0, seed=9)
    ids, mask = ragged_batch([5, 8], seed=9)
    ref = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD).sequences
    out = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, static_cache=True).sequences
    kept = STATIC_CACHES[m]
    assert torch.equal(out, ref) and kept.batch_size == 2
    with torch.inference_mode():  # generate made them inference tensors
        for t in (*kept.k, *kept.v):
            t.fill_(float("nan"))
    assert torch.equal(generate(m, ids[:, 3:], 20, attention_mask=mask[:, 3:], pad_token_id=PAD,
                                static_cache=True).sequences,
                       generate(m, ids[:, 3:], 20, attention_mask=mask[:, 3:], pad_token_id=PAD).sequences)
    assert STATIC_CACHES[m] is kept and not any(bool(t.isnan().any()) for t in kept.k)
    beams = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, num_beams=3, static_cache=True)
    assert STATIC_CACHES[m] is not kept and STATIC_CACHES[m].batch_size == 6  # 2 prompts x 3 beams
    usual = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, num_beams=3)
    assert torch.equal(beams.sequences, usual.sequences)
    assert torch.equal(generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, num_beams=3,
                                static_cache=True).sequences, usual.sequences)
    generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD)  # the usual cache leaves it alone
    assert STATIC_CACHES[m].batch_size == 6


def test_a_static_cache_in_use_is_not_shared():
    """A call that starts while another decodes (a generator's steps interleaved, or a thread)
    gets a cache of its own."""
    from lmstack.generate.decode import STATIC_CACHES

    _, m = tiny_hf("llama", seed=10)
    first, second = Steps(static=True), Steps(static=True)
    a = first.setup_cache(m, 1, 20)
    b = second.setup_cache(m, 1, 20)
    assert a is not b and m not in STATIC_CACHES
    first.close()
    second.close()
    assert STATIC_CACHES[m] is b
    assert Steps(static=True).setup_cache(m, 1, 30) is b  # same layout: reused


def test_compiled_static_step_matches_hf_and_is_reused():
    """``compile=True, static_cache=True``: the torch.compile'd static step (CUDA graphs on a GPU;
    on a CPU the same graph, compiled, without them) gives HF's tokens, and a second call with
    other prompt and output lengths in the same cache size reuses its graph."""
    from torch._dynamo.utils import counters

    h, m = tiny_hf("llama", scale=3.0, seed=6)
    no_special_tokens(h)
    for lengths, n in (([6, 2, 9], 12), ([3, 10, 4], 20)):
        ids, mask = ragged_batch(lengths, seed=n)
        with torch.no_grad():
            ref = h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD)
        out = generate(m, ids, n, attention_mask=mask, pad_token_id=PAD, compile=True, static_cache=True)
        assert torch.equal(out.sequences, ref)
        if n == 12:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile for the new lengths


def test_compile_on_torch_2_4_takes_the_static_step(monkeypatch):
    """torch 2.4's guards for dynamic shapes fail to evaluate, so its compiled usual-cache step
    would recompile at every length: there ``compile=True`` defaults to the static step. (The
    compiled step is swapped for the eager one here: what is checked is the choice and its tokens.)"""
    from lmstack.generate import decode

    chosen = []

    class Spy(Steps):
        def __init__(self, **kw):
            chosen.append(kw)
            super().__init__(**kw)

    monkeypatch.setattr(decode, "Steps", Spy)
    monkeypatch.setattr(decode, "compiled_static_step", lambda: decode.static_decode_step)
    _, m = tiny_hf("llama", scale=3.0, seed=8)
    ids, mask = ragged_batch([4, 7], seed=8)
    ref = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD).sequences
    for version, static in (((2, 4), True), ((2, 5), False)):
        monkeypatch.setattr(decode, "TORCH_VERSION", version)
        if not static:  # the usual cache's step, compiled: the eager one stands in for it too
            monkeypatch.setattr(decode, "compiled_decode_step", lambda device_type: decode.decode_step)
        out = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, compile=True).sequences
        assert chosen[-1] == {"compile": True, "static": static} and torch.equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_matches_eager():
    """On a GPU, ``compile=True`` defaults to the static cache with CUDA graphs: same tokens as the
    eager usual-cache decode, and no step falls back from CUDA graphs; guided decoding too."""
    from torch._dynamo.utils import counters

    from lmstack.generate.decode import STATIC_CACHES

    _, m = tiny_hf("llama", scale=3.0, seed=7)
    m = m.cuda()
    ids, mask = ragged_batch([6, 2, 9, 4], seed=7)
    ids, mask = ids.cuda(), mask.cuda()
    ref = generate(m, ids, 24, attention_mask=mask, pad_token_id=PAD).sequences
    skips, caches = counters["inductor"]["cudagraph_skips"], set()
    for _ in range(3):  # warm-up, recording, replays
        out = generate(m, ids, 24, attention_mask=mask, pad_token_id=PAD, compile=True).sequences
        assert torch.equal(out, ref)
        caches.add(id(STATIC_CACHES[m]))
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert len(caches) == 1  # every call replayed on the same buffers
    # a compiled stream (`lmstack generate --compile`) replays its own graph, one row, same tokens
    assert list(generate_stream(m, ids[2], 24, compile=True)) == ref[2, ids.shape[1]:].tolist()
    # guidance: prompts 0-1 with rows 2-3 as their negative prompts decode as 4 rows of one graph
    kw = dict(attention_mask=mask[:2], pad_token_id=PAD, guidance_scale=1.5, negative_prompt_ids=ids[2:],
              negative_prompt_attention_mask=mask[2:])
    guided = generate(m, ids[:2], 24, **kw).sequences
    assert not torch.equal(guided, ref[:2])
    for _ in range(2):
        assert torch.equal(generate(m, ids[:2], 24, compile=True, **kw).sequences, guided)
    assert counters["inductor"]["cudagraph_skips"] == skips
