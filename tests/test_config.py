import pytest

from lmstack import PRESETS, ModelConfig


def test_presets_build_and_round_trip():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.n_heads % cfg.n_kv_heads == 0


def test_known_shapes():
    # Parameter counts of the real checkpoints these presets copy.
    assert abs(ModelConfig.from_preset("llama-1.1b").n_params / 1e9 - 1.100) < 0.005
    assert abs(ModelConfig.from_preset("llama3-8b").n_params / 1e9 - 8.030) < 0.005
    assert abs(ModelConfig.from_preset("qwen2-0.5b").n_params / 1e9 - 0.494) < 0.005
    assert abs(ModelConfig.from_preset("mistral-7b").n_params / 1e9 - 7.242) < 0.005
    assert 2e6 < ModelConfig.from_preset("tiny").n_params < 10e6


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown preset 'llama9'.*llama-1.1b.*tiny"):
        ModelConfig.from_preset("llama9")


def test_toy_size_keeps_architecture_flags():
    cfg = ModelConfig.from_preset("qwen2-0.5b", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab_size=128)
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.head_dim == 16 and cfg.norm_eps == 1e-6


def test_derived_fields_never_overwrite_user_values():
    cfg = ModelConfig(dim=64, n_heads=4, head_dim=32, ffn_dim=100, n_kv_heads=1)
    assert (cfg.head_dim, cfg.ffn_dim, cfg.n_kv_heads) == (32, 100, 1)
    assert ModelConfig(dim=64, n_heads=4).n_kv_heads == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=8"),
        (dict(dim=100, n_heads=8), "dim=100 is not divisible by n_heads=8"),
        (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
        (dict(norm_eps=2.0), "norm_eps"),
        (dict(rope_scaling={"type": "magic", "factor": 2}), "rope_scaling type='magic'"),
        (dict(sliding_window=-1), "sliding_window"),
    ],
)
def test_invalid_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"dim": 64, "hidden_size": 64})
