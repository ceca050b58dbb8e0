"""lmstack.peft against HF peft: the same adapter gives the same logits on the same HF weights.

Each test builds a tiny HF model, loads it with ``lmstack.from_hf``, exports the base back with
``lmstack.to_hf`` (the HF side runs on that export), applies a method in lmstack with random
(non-zero) adapter weights, saves it in peft's format and loads it with ``PeftModel.from_pretrained``.
"""

import pytest
import torch

import lmstack
import lmstack.peft as peft

from ..hf_models import load_hf, tiny_hf

pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

TOL = 1e-4


def randomize(model):
    """Move every adapter parameter away from its identity init."""
    with torch.no_grad():
        for p in peft.adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)


def base_pair(tmp_path, family, seed):
    """(lmstack model from_hf, the HF model loaded from its lmstack.to_hf export)."""
    hf, _ = tiny_hf(family, seed=seed)
    hf.save_pretrained(tmp_path / "hf")
    m = lmstack.from_hf(tmp_path / "hf")
    lmstack.to_hf(m, tmp_path / "export")
    return m, load_hf(tmp_path / "export")


CASES = {
    "lora": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora_rs_all": dict(r=3, alpha=5, target_modules="all-linear", use_rslora=True),
    "ia3": dict(),
    "prompt": dict(num_virtual_tokens=5),
    "ptuning_v2": dict(num_virtual_tokens=4),
    "prefix": dict(num_virtual_tokens=3, encoder_hidden_size=24),
}


PARITY = [("lora", "llama"), ("lora", "qwen2"), ("lora_rs_all", "qwen2"), ("ia3", "llama"), ("ia3", "qwen2"),
          ("prompt", "llama"), ("ptuning_v2", "llama"), ("prefix", "qwen2")]  # qwen2: q/k/v bias, tied embeddings


@pytest.mark.parametrize("case,family", PARITY)
def test_logits_match_peft(tmp_path, seed, family, case):
    method = case.split("_rs")[0]
    m, hf = base_pair(tmp_path, family, seed)
    peft.apply(m, method, **CASES[case])
    randomize(m)
    m.eval()
    peft.save_adapter(m, tmp_path / "adapter", format="peft")
    pm = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        ours, theirs = m(x), pm(input_ids=x).logits
    if method == "prompt":  # HF returns logits for the virtual positions too
        theirs = theirs[:, CASES[case]["num_virtual_tokens"]:]
    assert ours.shape == theirs.shape == (2, 13, 128)
    assert (ours - theirs).abs().max() <= TOL
    with torch.no_grad(), peft.disable_adapters(m):
        assert (m(x) - ours).abs().max() > 1e-3  # the adapter does something, so the check above means something


@pytest.mark.parametrize("case", ["lora", "ia3", "ptuning_v2", "prompt"])
def test_peft_format_round_trip(tmp_path, seed, case):
    """save_adapter(format="peft") then load_adapter on a fresh model gives the same logits."""
    hf, m = tiny_hf("llama", seed=seed)
    fresh = tiny_hf("llama", seed=seed)[1]
    peft.apply(m, case, **CASES[case])
    randomize(m)
    peft.save_adapter(m, tmp_path / "a", format="peft")
    peft.load_adapter(fresh, tmp_path / "a")
    assert fresh.peft_config == m.peft_config
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_load_adapter_saved_by_hf_peft(tmp_path, seed):
    """Adapters trained in HF peft (LoRA; prefix tuning with projection, stored folded) load into lmstack."""
    from peft import LoraConfig, PrefixTuningConfig

    hf, m = tiny_hf("qwen2", seed=seed)
    x = torch.randint(0, 128, (2, 11))
    configs = {
        "lora": LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM",
                           init_lora_weights=False),
        "prefix": PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM", prefix_projection=True,
                                     encoder_hidden_size=16),
    }
    for name, config in configs.items():
        pm = get_peft_model(tiny_hf("qwen2", seed=seed)[0], config).eval()
        pm.save_pretrained(tmp_path / name)
        ours = peft.load_adapter(tiny_hf("qwen2", seed=seed)[1], tmp_path / name)
        assert ours.peft_config["method"] == name
        with torch.no_grad():
            assert (ours(x) - pm(input_ids=x).logits).abs().max() <= TOL


def test_adapter_has_no_peft_format(tmp_path, seed):
    _, m = tiny_hf("llama", seed=seed)
    peft.apply(m, "adapter", bottleneck=4)
    with pytest.raises(ValueError, match="'adapter' has no HF peft equivalent"):
        peft.save_adapter(m, tmp_path / "a", format="peft")
