"""generate / generate_stream against HF ``LlamaForCausalLM.generate`` on the same random weights."""

import copy

import pytest
import torch

import lmstack
from lmstack.generate import GenerateOutput, generate, generate_stream

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from ..hf_models import hf_penalises_padding  # noqa: E402

V, MAX_LEN = 128, 128


@pytest.fixture(scope="module")
def models():
    """A random tiny GQA Llama in HF and the same weights in lmstack. Weights are scaled up so the
    next-token distributions are peaked and greedy decoding has no near-ties to flip."""
    hc = LlamaConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    h = LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in h.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    # No EOS / pad unless a test passes them (the config's default eos would stop HF early).
    h.generation_config.eos_token_id = None
    h.generation_config.bos_token_id = None
    h.generation_config.pad_token_id = None
    cfg = lmstack.ModelConfig(
        vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=MAX_LEN
    )
    m = lmstack.Transformer(cfg).eval()
    m.load_state_dict({k.removeprefix("model."): v for k, v in h.state_dict().items()})
    return h, m


def hf_greedy(h, ids, n, **kw):
    with torch.no_grad():
        return h.generate(ids, max_new_tokens=n, do_sample=False, **kw)


def ragged(lengths):
    return [torch.randint(0, V, (n,)).tolist() for n in lengths]


def hf_left_pad(prompts, pad):
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask


def test_greedy_batch1_matches_hf(models):
    h, m = models
    ids = torch.randint(0, V, (1, 9))
    out = generate(m, ids, 40)
    assert isinstance(out, GenerateOutput) and out.scores is None
    assert out.sequences.shape == (1, 49)
    assert torch.equal(out.sequences, hf_greedy(h, ids, 40))


def test_greedy_equal_length_batch_matches_hf(models):
    h, m = models
    ids = torch.randint(0, V, (4, 7))
    out = generate(m, ids, 25, temperature=None)
    assert torch.equal(out.sequences, hf_greedy(h, ids, 25))


def test_greedy_ragged_matches_hf_left_padding(models):
    h, m = models
    prompts, pad = ragged([5, 11, 1, 8]), 3
    ids, mask = hf_left_pad(prompts, pad)
    ref = hf_greedy(h, ids, 20, attention_mask=mask, pad_token_id=pad)
    assert torch.equal(generate(m, prompts, 20, pad_token_id=pad).sequences, ref)
    # The same batch given as a padded tensor with an HF-style attention mask.
    assert torch.equal(generate(m, ids, 20, attention_mask=mask, pad_token_id=pad).sequences, ref)


def test_greedy_ragged_rows_equal_unpadded_runs(models):
    _, m = models
    prompts = ragged([6, 2, 9])
    out = generate(m, prompts, 12, pad_token_id=0).sequences
    for i, p in enumerate(prompts):
        alone = generate(m, [p], 12).sequences[0]
        assert torch.equal(out[i, out.shape[1] - len(p) - 12:], alone)


def test_compiled_decode_matches_hf(models):
    """``compile=True`` (torch.compile of the decode step, through the CPU decode layout's one-row
    and few-rows products) gives HF's tokens, for one row and for a ragged batch."""
    h, m = models
    ids = torch.randint(0, V, (1, 6))
    assert torch.equal(generate(m, ids, 12, compile=True).sequences, hf_greedy(h, ids, 12))
    prompts, pad = ragged([5, 9, 2]), 3
    ids, mask = hf_left_pad(prompts, pad)
    ref = hf_greedy(h, ids, 12, attention_mask=mask, pad_token_id=pad)
    assert torch.equal(generate(m, prompts, 12, pad_token_id=pad, compile=True).sequences, ref)


def test_repetition_penalty_greedy_matches_hf(models):
    if hf_penalises_padding():
        pytest.skip("this transformers penalises left padding in repetition_penalty (newer ones, and lmstack, do not)")
    h, m = models
    prompts, pad = ragged([4, 10, 7]), 5
    ids, mask = hf_left_pad(prompts, pad)
    ref = hf_greedy(h, ids, 20, attention_mask=mask, pad_token_id=pad, repetition_penalty=1.8)
    assert torch.equal(generate(m, prompts, 20, pad_token_id=pad, repetition_penalty=1.8).sequences, ref)


def test_eos_matches_hf(models):
    h, m = models
    prompts = ragged([6, 9, 3])
    free = generate(m, prompts, 24, pad_token_id=0).sequences
    T = free.shape[1] - 24
    eos = int(free[0, T + 3])  # row 0 certainly reaches it, at step 3 at the latest
    pad = (eos + 1) % V
    ids, mask = hf_left_pad(prompts, pad)
    ref = hf_greedy(h, ids, 24, attention_mask=mask, pad_token_id=pad, eos_token_id=eos)
    out = generate(m, prompts, 24, pad_token_id=pad, eos_token_id=eos).sequences
    assert torch.equal(out, ref)
    # After a row's EOS only padding follows; decoding stopped as soon as every row had ended.
    for row in out[:, T:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[int(hits[0]) + 1:] == pad).all()
    # A list of EOS ids, and no EOS handling at all.
    assert torch.equal(generate(m, prompts, 24, pad_token_id=pad, eos_token_id=[V - 1, eos]).sequences,
                       hf_greedy(h, ids, 24, attention_mask=mask, pad_token_id=pad, eos_token_id=[V - 1, eos]))
    assert generate(m, prompts, 24, pad_token_id=pad, eos_token_id=eos, stop_on_eos=False).sequences.shape[1] == T + 24


def test_max_length_counts_the_prompt_as_hf(models):
    """max_length caps prompt + new tokens (the padded prompt, in a batch), and max_new_tokens wins
    when both are given, as in HF generate; the stream and beam search take it too."""
    h, m = models
    prompts, pad = ragged([5, 11, 2]), 3
    ids, mask = hf_left_pad(prompts, pad)
    with torch.no_grad():
        ref = h.generate(ids, attention_mask=mask, max_length=20, do_sample=False, pad_token_id=pad)
        both = h.generate(ids, attention_mask=mask, max_length=20, max_new_tokens=4, do_sample=False,
                          pad_token_id=pad)
        beams = h.generate(ids[:1], attention_mask=mask[:1], max_length=16, num_beams=3, do_sample=False,
                           pad_token_id=pad)
    assert ref.shape == (3, 20) and both.shape == (3, 15)
    assert torch.equal(generate(m, prompts, max_length=20, pad_token_id=pad).sequences, ref)
    assert torch.equal(generate(m, prompts, 4, max_length=20, pad_token_id=pad).sequences, both)
    assert torch.equal(generate(m, ids[:1], max_length=16, num_beams=3, attention_mask=mask[:1],
                                pad_token_id=pad).sequences, beams)
    one = hf_greedy(h, torch.tensor(prompts[:1]), None, max_length=9)[0, 5:].tolist()  # 9 - 5 prompt tokens
    assert len(one) == 4 and list(generate_stream(m, prompts[0], max_length=9)) == one
    assert generate(m, [[1, 2]]).sequences.shape == (1, 66)  # neither: 64 new tokens


def test_sampling_is_seeded(models):
    _, m = models
    ids = torch.randint(0, V, (3, 5))
    kw = dict(temperature=1.3, top_k=20)
    a = generate(m, ids, 30, seed=7, **kw).sequences
    b = generate(m, ids, 30, seed=7, **kw).sequences
    c = generate(m, ids, 30, seed=8, **kw).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], ids)
    full = generate(m, ids, 30, seed=7, temperature=1.3, top_p=0.9, min_p=0.05, typical_p=0.95, repetition_penalty=1.2)
    assert full.sequences.shape == (3, 35)
    prompts = ragged([3, 7])  # sampling with left padding: the penalty skips the padding
    kw = dict(temperature=0.9, repetition_penalty=1.3, pad_token_id=0, seed=1)
    r = generate(m, prompts, 10, **kw).sequences
    assert torch.equal(r, generate(m, prompts, 10, **kw).sequences)
    assert r.shape == (2, 17)


def test_compiled_and_static_streams_match_hf(models):
    """generate_stream's ``compile`` and ``static_cache`` (the pair CUDA gets by default with
    ``compile=True``) give HF's tokens; a static stream gives its cache back when it ends."""
    from lmstack.generate.decode import STATIC_CACHES, Steps

    h, m = models
    ids = torch.randint(0, V, (1, 6))
    ref = hf_greedy(h, ids, 12)[0, 6:].tolist()
    for kw in ({"compile": True}, {"static_cache": True}, {"compile": True, "static_cache": True}):
        STATIC_CACHES.pop(m, None)
        assert list(generate_stream(m, ids[0], 12, **kw)) == ref, kw
        static = Steps.for_device(m.lm_head.weight.device, compile=kw.get("compile", False),
                                  static=kw.get("static_cache")).static  # compiling on torch 2.4: static too
        assert (m in STATIC_CACHES) == static, kw


def test_generate_stream_yields_generate_tokens(models):
    _, m = models
    prompt = torch.randint(0, V, (8,)).tolist()
    greedy = generate(m, [prompt], 20).sequences[0, 8:].tolist()
    assert list(generate_stream(m, prompt, 20)) == greedy
    eos = greedy[5]
    stop = greedy.index(eos)
    assert list(generate_stream(m, torch.tensor(prompt), 20, eos_token_id=eos)) == greedy[:stop]
    sampled = generate(m, [prompt], 20, temperature=0.8, top_k=10, seed=3).sequences[0, 8:].tolist()
    assert list(generate_stream(m, prompt, 20, temperature=0.8, top_k=10, seed=3)) == sampled

    # A stream decodes with the CPU decode layout while it runs, and takes it down when it is
    # exhausted, or closed part way (as a consumer that breaks out of its loop does).
    def laid_out():
        return any("decode_weight" in mod.__dict__ for mod in m.modules())

    for take in (20, 3):
        stream = generate_stream(m, prompt, 20)
        got = [next(stream) for _ in range(take)]
        assert got == greedy[:take] and laid_out()
        if take == 20:
            assert next(stream, None) is None
        else:
            stream.close()
        assert not laid_out()


def test_bad_inputs(models):
    _, m = models
    with pytest.raises(ValueError, match=r"120 tokens.*max_new_tokens=20.*max_seq_len=128"):
        generate(m, torch.zeros(1, 120, dtype=torch.long), 20)
    with pytest.raises(ValueError, match="max_seq_len=128"):
        generate_stream(m, [1] * 100, 50)  # raised at the call, before iterating
    with pytest.raises(ValueError, match="empty prompt"):
        generate(m, torch.zeros(2, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(m, [[1, 2], []], 5)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, [[1, 2]], 5, temperature=-1.0)
    with pytest.raises(ValueError, match="right padding"):
        generate(m, torch.ones(2, 4, dtype=torch.long), 5, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(m, [[1, 2]], 5, num_beams=2, num_return_sequences=3)


def test_generate_leaves_grad_mode_alone(models):
    _, m = models
    stream = generate_stream(m, [1, 2, 3], 5)
    next(stream)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_cpu_decode_layout_is_off_for_compiling_on_torch_2_4(models, monkeypatch):
    """torch 2.4's dynamo guards module tensors by identity, so the layout's per-call copies would
    recompile a compiled step at every call: there, compiled decoding runs without the layout."""
    from lmstack.generate import decode

    _, m = models
    for inlines, compiled, laid_out in ((False, True, False), (False, False, True), (True, True, True)):
        monkeypatch.setattr(decode, "dynamo_inlines_modules", lambda inlines=inlines: inlines)
        with decode.cpu_decode_layout(m, compiled=compiled):
            assert ("decode_weight" in m.lm_head.__dict__) == laid_out


def test_cpu_decode_layout_is_invisible(monkeypatch):
    """The decode layout's matrix products (one row: column-major copies; a few rows: the
    transposed product; q/k/v and gate/up as one product each; more rows: the usual path) give
    the usual outputs, and on exit the model is exactly as it was: same parameters, weight tying,
    no leftover forward, method or weight copies."""
    import lmstack
    from lmstack.generate.decode import FEW_ROWS, cpu_decode_layout, decode_fused, decode_linear
    from lmstack.model import Attention

    cfg = lmstack.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                              max_seq_len=64, tie_embeddings=True, qkv_bias=True)
    torch.manual_seed(0)
    m = lmstack.Transformer(cfg).eval()
    with torch.no_grad():
        for layer in m.layers:  # qkv_bias inits the biases at zero: make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    before = {n: p for n, p in m.named_parameters(remove_duplicate=False)}

    def leftovers():
        names = [n for mod in m.modules() for n in mod.__dict__ if n == "forward" or n.startswith("decode_")]
        return names + [type(mod) for mod in m.modules() if type(mod).__name__.startswith("Decoding")]

    with torch.no_grad():
        for shape in [(1, 1), (3, 1), (2, 5), (1, FEW_ROWS), (3, FEW_ROWS)]:  # 1, few and many rows
            x = torch.randint(0, 64, shape)
            ref = m(x)
            with cpu_decode_layout(m):
                mlp, attn = m.layers[0].mlp, m.layers[0].self_attn
                assert mlp.gate_up.__func__ is decode_fused and attn.qkv.__func__ is decode_fused
                assert mlp.decode_weight.stride() == (1, 96)  # gate + up (96, 32), column-major
                assert mlp.down_proj.decode_weight.stride() == (48, 1)  # (32, 48): fewer outputs, kept as is
                assert m.lm_head.decode_weight.stride() == (1, 64)
                assert all(lin.forward.__func__ is decode_linear for lin in (attn.o_proj, mlp.down_proj, m.lm_head))
                torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    after = {n: p for n, p in m.named_parameters(remove_duplicate=False)}
    assert all(after[n] is p for n, p in before.items())
    assert not leftovers()
    assert m.lm_head.weight is m.embed_tokens.weight

    # bf16 and fp16 weights keep their layout for the one-row product (a column-major copy falls
    # off MKL's fast path there), and only the fusion applies.
    for dtype in (torch.bfloat16, torch.float16):
        half = copy.deepcopy(m).to(dtype)
        with torch.no_grad():
            for shape in [(1, 1), (3, 1)]:
                x = torch.randint(0, 64, shape)
                ref = half(x)
                with cpu_decode_layout(half):
                    mlp = half.layers[0].mlp
                    assert mlp.gate_up.__func__ is decode_fused
                    copies = [mod.decode_weight for mod in half.modules() if "decode_weight" in mod.__dict__]
                    assert copies and all(w.is_contiguous() and w.dtype == dtype for w in copies)
                    torch.testing.assert_close(half(x), ref, rtol=2e-2, atol=2e-2)


    # Nested (or concurrent) generate calls share one layout; the last one out takes it down. A
    # forward someone else installed is left alone.
    custom = m.layers[0].mlp.down_proj.forward = lambda x: torch.zeros(*x.shape[:-1], 32)
    m.layers[1].self_attn.k_proj.forward = custom  # (LoRA and IA3 wrap the layer instead: also not plain)
    with cpu_decode_layout(m):
        with cpu_decode_layout(m):
            pass
        assert "decode_weight" in m.lm_head.__dict__  # the outer generate still has its layout
        assert m.layers[0].mlp.down_proj.forward is custom
        assert type(m.layers[1].self_attn) is Attention  # one of its projections is not plain: not fused
        assert type(m.layers[0].self_attn) is not Attention and isinstance(m.layers[0].self_attn, Attention)
    del m.layers[1].self_attn.k_proj.forward
    assert not any("decode_weight" in mod.__dict__ for mod in m.modules())
    assert m.layers[0].mlp.down_proj.forward is custom
    # Overlapping calls from two threads: the first one in leaves first; the layout stays until the
    # second one leaves, and goes then.
    first, second = cpu_decode_layout(m), cpu_decode_layout(m)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert m.lm_head.forward.__func__ is decode_linear
    second.__exit__(None, None, None)
    assert not any("decode_weight" in mod.__dict__ for mod in m.modules())
    assert "forward" not in m.lm_head.__dict__ and m.layers[0].mlp.down_proj.forward is custom
    del m.layers[0].mlp.down_proj.forward

    # A model above CPU_LAYOUT_MAX_BYTES gets no copies: in fp32 only the transposed product of a
    # few rows (no fused blocks, every decode weight the parameter itself); in fp16 (or bf16) nothing.
    from lmstack.generate import decode

    with monkeypatch.context() as mp, torch.no_grad():
        mp.setattr(decode, "CPU_LAYOUT_MAX_BYTES", 0)
        for shape in [(1, 1), (3, 1), (3, FEW_ROWS)]:
            x = torch.randint(0, 64, shape)
            ref = m(x)
            with cpu_decode_layout(m):
                assert not [type(mod) for mod in m.modules() if type(mod).__name__.startswith("Decoding")]
                lins = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
                assert all(lin.forward.__func__ is decode_linear for lin in lins)
                assert all(lin.decode_weight.data_ptr() == lin.weight.data_ptr() for lin in lins)
                torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
            assert not leftovers()
        with cpu_decode_layout(half):
            assert not any(n.startswith("decode_") for mod in half.modules() for n in mod.__dict__)
