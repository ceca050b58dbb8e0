"""RoPE context-extension scalings against transformers: yarn (static) and dynamic NTK, whose
frequencies change with the length of each forward pass."""

import json

import pytest
import torch

import lmstack
from lmstack.interop import from_hf, to_hf

from ..hf_models import load_hf

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

V = 128


def _hf_llama(tmp_path, rope, *, max_pos, scale=1.0, spelling="rope_scaling", theta=10000.0):
    """A random tiny Llama with ``rope`` scaling saved in the requested config spelling."""
    hc = LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, max_position_embeddings=max_pos, rope_scaling=dict(rope), rope_theta=theta)
    hf = LlamaForCausalLM(hc).eval()
    if scale != 1.0:  # peaked distributions: no near-ties in greedy comparisons
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" not in name:
                    p.mul_(scale)
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(hf.generation_config, attr, None)
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters", "rope_theta"):
        cfg.pop(key, None)
    if spelling == "rope_scaling":
        cfg.update(rope_theta=theta, rope_scaling=dict(rope))
    else:
        cfg["rope_parameters"] = {**rope, "rope_theta": theta}
    (path / "config.json").write_text(json.dumps(cfg))
    return hf, path


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3, "truncate": False},
])
def test_yarn_logits_match(tmp_path, seed, spelling, rope):
    hf, path = _hf_llama(tmp_path, rope, max_pos=128, spelling=spelling, theta=50000.0)
    m = from_hf(path)
    # the context YaRN extends to: factor x the original (default: max_position_embeddings), or more
    extended = int(rope["factor"] * rope.get("original_max_position_embeddings", 128))
    assert m.config.rope_scaling["type"] == "yarn" and m.config.max_seq_len == max(128, extended)
    x = torch.randint(0, V, (2, 120))
    with torch.no_grad():
        assert (m(x) - hf(x).logits).abs().max() < 1e-4


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_dynamic_logits_match_past_the_original_context(tmp_path, seed, spelling):
    hf, path = _hf_llama(tmp_path, {"rope_type": "dynamic", "factor": 4.0}, max_pos=32, spelling=spelling)
    m = from_hf(path)
    # Our max_seq_len is the extended context; transformers' max_position_embeddings the original one.
    assert m.config.max_seq_len == 128 and m.config.rope_scaling["original_max_position_embeddings"] == 32
    for T in (20, 32, 33, 77, 128):  # below, at and past the original context
        x = torch.randint(0, V, (2, T))
        with torch.no_grad():
            assert (m(x) - hf(x).logits).abs().max() < 1e-4, T


def test_dynamic_equals_plain_rope_within_the_original_context(seed):
    cfg = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    plain = lmstack.Transformer(lmstack.ModelConfig(**cfg)).eval()
    dyn = lmstack.Transformer(lmstack.ModelConfig(
        **cfg, rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32})).eval()
    dyn.load_state_dict(plain.state_dict())
    x = torch.randint(0, V, (1, 64))
    with torch.no_grad():
        assert (plain(x[:, :32]) - dyn(x[:, :32])).abs().max() < 1e-6
        assert (plain(x) - dyn(x)).abs().max() > 1e-5  # a 64-token pass uses stretched frequencies


def test_dynamic_greedy_generation_matches_hf(tmp_path, seed):
    """Decoding across the original context: transformers recomputes the frequencies at every step
    (keys already cached keep theirs) and so must we, for batch-1 and left-padded ragged batches."""
    hf, path = _hf_llama(tmp_path, {"rope_type": "dynamic", "factor": 4.0}, max_pos=32, scale=4.0)
    m = from_hf(path)
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=60, do_sample=False)
    assert torch.equal(lmstack.generate(m, ids, 60).sequences, ref)

    prompts, pad = [torch.randint(0, V, (n,)).tolist() for n in (5, 14, 9)], 0
    T = max(map(len, prompts))
    ids = torch.full((3, T), pad)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=pad)
    assert torch.equal(lmstack.generate(m, prompts, 40, pad_token_id=pad).sequences, ref)


def test_dynamic_to_hf_round_trip(tmp_path, seed):
    cfg = lmstack.ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=96,
                              rope_scaling={"type": "dynamic", "factor": 3.0, "original_max_position_embeddings": 32})
    m = lmstack.Transformer(cfg).eval()
    out = to_hf(m, tmp_path / "out")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["max_position_embeddings"] == 32 and hf_cfg["rope_scaling"] == {"rope_type": "dynamic", "factor": 3.0}
    hf = load_hf(out)
    x = torch.randint(0, V, (1, 90))
    with torch.no_grad():
        assert (hf(x).logits - m(x)).abs().max() < 1e-4
    assert from_hf(out).config == cfg


def test_dynamic_needs_its_original_context():
    with pytest.raises(ValueError, match="dynamic.*needs original_max_position_embeddings"):
        lmstack.ModelConfig(vocab_size=V, dim=64, n_layers=1, n_heads=4, max_seq_len=64,
                            rope_scaling={"type": "dynamic", "factor": 2.0})
