"""HF checkpoints in and out: logits parity for each family, round trip, bad inputs."""

import json

import pytest
import torch

from lmstack.interop import from_hf, to_hf

from ..hf_models import load_hf, tiny_hf


def _save(hf, path, **kw):
    hf.save_pretrained(path, **kw)
    return path


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False),
                                         ("mistral", False)])
def test_from_hf_logits_match(tmp_path, seed, family, tied):
    hf, _ = tiny_hf(family, tied=tied, window=6, seed=seed)
    m = from_hf(_save(hf, tmp_path / "hf"))
    assert m.config.tie_embeddings == tied and m.config.qkv_bias == (family == "qwen2")
    x = torch.randint(0, 128, (2, 21))
    with torch.no_grad():
        assert (m(x) - hf(x).logits).abs().max() < 1e-4


def test_sharded_checkpoint_and_dtype(tmp_path, seed):
    hf, _ = tiny_hf("llama", seed=seed)
    path = _save(hf, tmp_path / "hf", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    m = from_hf(path)
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (m(x) - hf(x).logits).abs().max() < 1e-4
    mb = from_hf(path, dtype=torch.bfloat16)
    assert mb.embed_tokens.weight.dtype == torch.bfloat16


def test_from_hf_reads_one_tensor_at_a_time(tmp_path, seed, monkeypatch):
    """Memory-frugal loading: each tensor read from the (sharded, fp32) files is read once and freed
    before the next is read, and the model it fills is bf16 throughout."""
    import weakref

    import lmstack.io

    hf, _ = tiny_hf("llama", seed=seed)
    path = _save(hf, tmp_path / "hf", max_shard_size="40KB")
    read, most_alive = [], 0
    real = lmstack.io.read_tensor

    def reading(handle, name, file):
        nonlocal most_alive
        most_alive = max(most_alive, sum(r() is not None for r in read))  # earlier reads still held
        t = real(handle, name, file)
        read.append(weakref.ref(t))
        return t

    monkeypatch.setattr(lmstack.io, "read_tensor", reading)
    m = from_hf(path, dtype=torch.bfloat16)
    assert len(read) == len(m.stored_state_dict()) and most_alive == 0
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (m(x).float() - hf(x).logits).abs().max() < 0.1 * hf(x).logits.abs().max()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_to_hf_round_trip_loads_in_transformers(tmp_path, seed, family):
    _, m = tiny_hf(family, seed=seed)
    out = to_hf(m, tmp_path / "out", max_shard_bytes=60_000)  # forces sharding
    assert (out / "model.safetensors.index.json").is_file()
    hf2 = load_hf(out)
    x = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        assert (hf2(x).logits - m(x)).abs().max() < 1e-4
        assert (from_hf(out)(x) - m(x)).abs().max() == 0


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_scaling_both_spellings(tmp_path, seed, spelling, kind):
    from transformers import LlamaConfig, LlamaForCausalLM

    rs = {"rope_type": kind, "factor": 4.0}
    if kind == "llama3":
        rs.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    hc = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, max_position_embeddings=128, rope_scaling=dict(rs), rope_theta=50000.0)
    hf = LlamaForCausalLM(hc).eval()
    path = _save(hf, tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters", "rope_theta"):  # rewrite in the requested spelling
        cfg.pop(key, None)
    if spelling == "rope_scaling":
        cfg.update(rope_theta=50000.0, rope_scaling=dict(rs))
    else:
        cfg["rope_parameters"] = {**rs, "rope_theta": 50000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    m = from_hf(path)
    assert m.config.rope_scaling["type"] == kind and m.config.rope_theta == 50000.0
    x = torch.randint(0, 128, (1, 100))
    with torch.no_grad():
        assert (m(x) - hf(x).logits).abs().max() < 1e-4


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported; supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        from_hf(tmp_path)


def test_missing_and_misshaped_tensors(tmp_path, seed):
    from safetensors.torch import load_file, save_file

    hf, _ = tiny_hf("llama", seed=seed)
    path = _save(hf, tmp_path / "hf")
    sd = load_file(path / "model.safetensors")
    bad = dict(sd)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(bad, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight' has shape \(95, 64\), expected \(96, 64\)"):
        from_hf(path)
    del bad["model.layers.1.mlp.up_proj.weight"]
    save_file(bad, path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensor.*model.layers.1.mlp.up_proj.weight"):
        from_hf(path)


def test_truncated_file_and_nothing_written_on_failure(tmp_path, seed):
    hf, m = tiny_hf("llama", seed=seed)
    path = _save(hf, tmp_path / "hf")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ValueError, match="model.safetensors"):
        from_hf(path)

    class Boom(RuntimeError):
        pass

    def fail(*a, **k):
        raise Boom()

    import lmstack.interop.hf as hfmod

    orig = hfmod.save_safetensors
    hfmod.save_safetensors = fail
    try:
        with pytest.raises(Boom):
            to_hf(m, tmp_path / "never")
    finally:
        hfmod.save_safetensors = orig
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_cli_convert_both_ways(tmp_path, seed):
    from lmstack.cli import main
    from lmstack.train import load_model

    hf, m = tiny_hf("qwen2", seed=seed)
    src = _save(hf, tmp_path / "hf")
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours")
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = from_hf(tmp_path / "back")
    x = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max() < 1e-4 and (back(x) - ref).abs().max() < 1e-4
    assert main(["convert", "--out", str(tmp_path / "x")]) == 2
