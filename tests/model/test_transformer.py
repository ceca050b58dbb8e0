import pytest
import torch

import lmstack
from lmstack.kernels import Seqs

from ..hf_models import FAMILIES, tiny_hf


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(seed, family):
    hf, m = tiny_hf(family, window=6, seed=seed)
    x = torch.randint(0, 128, (2, 23))  # longer than the Mistral window
    with torch.no_grad():
        ref = hf(x).logits
        out = m(x)
    assert (out - ref).abs().max() < 1e-4


def _tiny(n_kv_heads, **kw):
    cfg = lmstack.ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=80,
                              max_seq_len=64, **kw)
    return lmstack.Transformer(cfg).eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_plus_decode_equals_full_forward(seed, n_kv_heads, window):
    m = _tiny(n_kv_heads, sliding_window=window).double()
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = m(x)
        cache = m.setup_cache(3, 32)
        steps = [m(x[:, :7], cache=cache), m(x[:, 7:12], cache=cache)]  # prefill, then a chunk
        steps += [m(x[:, t : t + 1], cache=cache) for t in range(12, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 20
    cache.reset()
    assert cache.length == 0


def test_left_padded_batch_matches_unpadded_rows(seed):
    m = _tiny(2).double()
    a, b = torch.randint(3, 97, (1, 9)), torch.randint(3, 97, (1, 5))
    x = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])  # b left-padded by 4
    pad_mask = torch.ones(2, 9, dtype=torch.bool)
    pad_mask[1, :4] = False
    positions = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = m.setup_cache(2, 16)
        out = m(x, positions=positions, pad_mask=pad_mask, cache=cache)[:, -1]
        nxt = torch.randint(3, 97, (2, 1))
        step = m(nxt, positions=positions[:, -1:] + 1, cache=cache)[:, -1]
        ref_a = m(torch.cat([a, nxt[:1]], 1))
        ref_b = m(torch.cat([b, nxt[1:]], 1))
    torch.testing.assert_close(out[0], ref_a[0, -2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1], ref_b[0, -2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step[0], ref_a[0, -1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step[1], ref_b[0, -1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["GQA", "MQA"])
def test_gqa_equals_mha_with_repeated_kv(seed, n_kv_heads):
    g = _tiny(n_kv_heads).double()
    mha = _tiny(4).double()
    sd = g.state_dict()
    rep = 4 // n_kv_heads
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # (Hkv*D, dim) -> (Hq*D, dim), each head repeated
            w = sd[k].view(n_kv_heads, 16, 64)
            sd[k] = w.repeat_interleave(rep, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(g(x), mha(x), rtol=1e-10, atol=1e-10)


def test_backends_agree_forward_and_backward(seed):
    m = _tiny(2).double().train()
    x = torch.randint(0, 97, (2, 16))
    results = []
    for backend in ("sdpa", "reference"):
        m.attn_backend = backend
        m.zero_grad()
        out = m(x)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
    for g1, g2 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)


def test_packed_documents_equal_separate_forwards(seed):
    m = _tiny(2).double()
    docs = [torch.randint(3, 97, (n,)) for n in (5, 9, 2)]
    x = torch.cat(docs)[None]  # one packed row
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    packed = m(x, seqs=Seqs.from_doc_ids(doc_ids))[0]
    separate = torch.cat([m(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)
    # and training on the packed row is training on the documents apart: the same gradients
    w = torch.randn_like(packed)  # a random linear loss reaches every logit
    grads = [torch.autograd.grad((out * w).sum(), list(m.parameters())) for out in (packed, separate)]
    for name, a, b in zip([n for n, _ in m.named_parameters()], *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_hf_module_names():
    m = _tiny(2)
    names = set(dict(m.named_modules()))
    for n in ("embed_tokens", "layers.0.self_attn.q_proj", "layers.1.self_attn.o_proj", "layers.0.mlp.gate_proj",
              "layers.0.mlp.down_proj", "layers.0.input_layernorm", "layers.0.post_attention_layernorm", "norm",
              "lm_head"):
        assert n in names


def test_scaled_residual_init():
    cfg = lmstack.ModelConfig(vocab_size=97, dim=256, n_layers=8, n_heads=4, ffn_dim=512, init_std=0.02)
    m = lmstack.Transformer(cfg)
    std = m.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001 and abs(m.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.002


def test_context_and_cache_overflow_errors():
    m = _tiny(2)
    with pytest.raises(ValueError, match="exceeds the model context max_seq_len=64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    cache = m.setup_cache(1, 8)
    with pytest.raises(ValueError, match="KV cache overflow"):
        m(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds the model context"):
        m.setup_cache(1, 65)


def test_return_hidden_and_logits_to_keep(seed):
    m = _tiny(2)
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        logits, h = m(x, return_hidden=True)
        last = m(x, logits_to_keep=1)
    assert h.shape == (2, 10, 64)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    torch.testing.assert_close(m.lm_head(h), logits)
