"""Adversarial review of HF peft interop: adapters written by HF peft 0.21 load into lmstack.peft
with the logits ``PeftModel.from_pretrained`` computes, lmstack adapters saved in peft's format load
in peft, and what lmstack cannot represent raises one clear error instead of a silently wrong model.

The references: peft's own forward (and ``generate``, or a no-cache greedy loop over peft's forward
where peft's generate is unreliable for prompt learning), peft's ``merge_and_unload``, and peft's
loader. Every adapter gets nonzero random weights, so an adapter that is ignored shows up.
"""

import json
import os

import pytest
import torch

import lmstack
import lmstack.peft as lp

from ..hf_models import load_hf, no_special_tokens, ragged_batch, tiny_hf

pytest.importorskip("peft")
from peft import (  # noqa: E402
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

TOL = 1e-4
C = "CAUSAL_LM"
V = 128


def _randomize_peft(pm, scale=0.3):
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def _peft_adapter(tmp_path, family, config, name="a", adapter_scale=0.3, **hf_kw):
    """An HF peft adapter with random weights saved to tmp_path/name; returns (dir, peft model)."""
    pm = get_peft_model(tiny_hf(family, **hf_kw)[0], config)
    _randomize_peft(pm, adapter_scale)
    pm.eval()
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name, pm


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _peft_logits(pm, x):
    with torch.no_grad():
        return pm(input_ids=x).logits[:, -x.shape[1]:]  # prompt tuning: HF returns the virtual rows too


def _assert_parity(tmp_path, family, config, x=None, **hf_kw):
    d, pm = _peft_adapter(tmp_path, family, config, **hf_kw)
    m = tiny_hf(family, **hf_kw)[1]  # eval mode, as lmstack.from_hf returns it; no .eval() after loading
    lp.load_adapter(m, d)
    x = torch.randint(0, V, (2, 9)) if x is None else x
    ours, ref = _logits(m, x), _peft_logits(pm, x)
    base = _logits(tiny_hf(family, **hf_kw)[1], x)
    assert (base - ref).abs().max() > 1e-3, "the adapter does nothing: the check below would mean nothing"
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= TOL


# -- LoRA configs as HF peft writes them ------------------------------------------------------------------
LORA_OK = {
    "list": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "suffix_paths": ("llama", dict(target_modules=["layers.1.self_attn.q_proj", "mlp.up_proj"])),
    "rslora": ("llama", dict(target_modules=["k_proj", "o_proj"], use_rslora=True, r=3, lora_alpha=7)),
    "qwen2_tied_bias": ("qwen2", dict(target_modules=["q_proj", "k_proj", "gate_proj"])),
    # peft turns fan_in_fan_out off for nn.Linear (with a warning) and saves False
    "fan_in_fan_out_linear": ("llama", dict(target_modules=["q_proj"], fan_in_fan_out=True)),
    "no_task_type": ("mistral", dict(target_modules=["v_proj"], task_type=None)),
    # peft 0.21 saves "all-linear" expanded into FULL module paths ("model.layers.0.self_attn.q_proj", ...)
    "all_linear": ("llama", dict(target_modules="all-linear")),
    # a full module path is an exact-name match in peft
    "full_path": ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"])),
    # LoRA on an untied lm_head: peft also saves lm_head.base_layer.weight (save_embedding_layers="auto")
    "lm_head_untied": ("llama", dict(target_modules=["lm_head", "q_proj"])),
}


@pytest.mark.parametrize("case", list(LORA_OK))
def test_peft_lora_loads_with_peft_logits(tmp_path, seed, case):
    family, kw = LORA_OK[case]
    kw = {"r": 4, "lora_alpha": 8, "task_type": C, "init_lora_weights": False, **kw}
    _assert_parity(tmp_path, family, LoraConfig(**kw))


def test_peft_lora_dropout_is_off_in_an_eval_model(tmp_path, seed):
    """peft's default lora_dropout=0.05 (here 0.3): loading into an eval-mode model (lmstack.from_hf's
    mode) must not leave fresh Dropout modules in training mode."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3, task_type=C,
                        init_lora_weights=False)
    d, pm = _peft_adapter(tmp_path, "llama", config)
    m = tiny_hf("llama")[1]
    assert not m.training
    lp.load_adapter(m, d)
    assert not any(mod.training for mod in m.modules()), "load_adapter put modules of an eval model in train mode"
    x = torch.randint(0, V, (2, 9))
    assert (_logits(m, x) - _peft_logits(pm, x)).abs().max() <= TOL


# options lmstack cannot represent: one clear ValueError naming the option (matched by regex)
LORA_REFUSED = {
    "regex_str": ("llama", dict(target_modules=r".*\.(q_proj|down_proj)"), "regex"),
    "layers_to_transform": ("llama", dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"),
                            "layers_to_transform"),
    "rank_pattern": ("llama", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}), "rank_pattern"),
    "alpha_pattern": ("llama", dict(target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 3}),
                      "alpha_pattern"),
    "bias_all": ("llama", dict(target_modules=["q_proj"], bias="all"), "bias"),
    "bias_lora_only": ("qwen2", dict(target_modules=["q_proj"], bias="lora_only"), "bias"),
    "modules_to_save_lm_head": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                "modules_to_save"),
    "modules_to_save_embed": ("llama", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                              "modules_to_save"),
    "dora": ("llama", dict(target_modules=["q_proj"], use_dora=True), "use_dora"),
    "lora_bias": ("llama", dict(target_modules=["q_proj"], lora_bias=True), "lora_bias"),
    "embed_tokens": ("llama", dict(target_modules=["embed_tokens", "q_proj"]), "embed_tokens"),
    "tied_lm_head": ("qwen2", dict(target_modules=["lm_head", "q_proj"]), "lm_head"),
}


@pytest.mark.parametrize("case", list(LORA_REFUSED))
def test_peft_lora_unsupported_option_is_a_clear_error(tmp_path, seed, case):
    family, kw, match = LORA_REFUSED[case]
    kw = {"r": 4, "lora_alpha": 8, "task_type": C, "init_lora_weights": False, **kw}
    d, _ = _peft_adapter(tmp_path, family, LoraConfig(**kw))
    with pytest.raises(ValueError, match=match):
        lp.load_adapter(tiny_hf(family)[1], d)


# options peft applies that lmstack does not look at: either peft's logits or an error naming the option
LORA_SILENT = {
    # aLoRA: the update acts only from the invocation tokens on (absent here: peft = base model)
    "alora_invocation_tokens": dict(target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6]),
    # peft leaves layer 0's q_proj alone
    "exclude_modules": dict(target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
}


@pytest.mark.parametrize("case", list(LORA_SILENT))
def test_peft_lora_option_is_honoured_or_refused(tmp_path, seed, case):
    kw = {"r": 4, "lora_alpha": 8, "task_type": C, "init_lora_weights": False, **LORA_SILENT[case]}
    d, pm = _peft_adapter(tmp_path, "llama", LoraConfig(**kw))
    x = torch.randint(7, V, (2, 9))  # never the aLoRA invocation tokens
    m = tiny_hf("llama")[1]
    try:
        lp.load_adapter(m, d)
    except ValueError as e:
        assert case in str(e), f"error does not name the option {case!r}: {e}"
        return
    assert (_logits(m, x) - _peft_logits(pm, x)).abs().max() <= TOL


# -- IA3, prompt tuning, prefix tuning, P-tuning --------------------------------------------------------
OTHER_OK = {
    "ia3_default_targets": ("llama", lambda tmp: IA3Config(task_type=C)),
    "ia3_qwen2_q_up": ("qwen2", lambda tmp: IA3Config(target_modules=["q_proj", "up_proj"],
                                                      feedforward_modules=["up_proj"], task_type=C)),
    "prompt_random": ("qwen2", lambda tmp: PromptTuningConfig(num_virtual_tokens=5, task_type=C)),
    "prompt_sample_vocab": ("llama", lambda tmp: PromptTuningConfig(num_virtual_tokens=4, task_type=C,
                                                                    prompt_tuning_init="SAMPLE_VOCAB")),
    "prompt_text": ("llama", lambda tmp: PromptTuningConfig(
        num_virtual_tokens=6, task_type=C, prompt_tuning_init="TEXT", prompt_tuning_init_text="w5 w9 w17",
        tokenizer_name_or_path=str(_word_tokenizer(tmp)))),
    "prefix_plain": ("llama", lambda tmp: PrefixTuningConfig(num_virtual_tokens=4, task_type=C)),
    "prefix_projection": ("qwen2", lambda tmp: PrefixTuningConfig(num_virtual_tokens=3, task_type=C,
                                                                  prefix_projection=True, encoder_hidden_size=16)),
    "prefix_mistral_window": ("mistral", lambda tmp: PrefixTuningConfig(num_virtual_tokens=3, task_type=C)),
}


def _word_tokenizer(tmp_path):
    """A local HF tokenizer "w0" ... "w126" -> ids 0..126 (peft's TEXT init loads it by path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(V - 1)}
    vocab["<unk>"] = V - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(out)
    return out


@pytest.mark.parametrize("case", list(OTHER_OK))
def test_peft_ia3_prompt_prefix_load_with_peft_logits(tmp_path, seed, case):
    family, make = OTHER_OK[case]
    x = torch.randint(0, V, (2, 12))  # > mistral's window 8 (+ prefix)
    _assert_parity(tmp_path, family, make(tmp_path), x=x)


def test_peft_ptuning_prompt_encoder_is_a_clear_error(tmp_path, seed):
    d, _ = _peft_adapter(tmp_path, "llama", PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16,
                                                                task_type=C))
    with pytest.raises(ValueError, match="P_TUNING"):
        lp.load_adapter(tiny_hf("llama")[1], d)


# -- generation -----------------------------------------------------------------------------------------
def _greedy_oracle(pm, ids, n):
    """Greedy tokens from repeated full forwards of the peft model (no cache)."""
    cur = ids
    with torch.no_grad():
        for _ in range(n):
            cur = torch.cat([cur, pm(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return cur[:, ids.shape[1]:]


GEN = {
    "lora": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type=C,
                                 init_lora_weights=False)),
    "prompt": ("llama", PromptTuningConfig(num_virtual_tokens=4, task_type=C)),
    "prefix": ("llama", PrefixTuningConfig(num_virtual_tokens=4, task_type=C)),
    "prefix_projection": ("qwen2", PrefixTuningConfig(num_virtual_tokens=3, task_type=C, prefix_projection=True,
                                                      encoder_hidden_size=16)),
}
# (Mistral's sliding window is counted in cache slots, here and in HF: with virtual tokens the left
# padding sits between them and the prompt, so a padded row differs from the row alone in both.)


@pytest.mark.parametrize("case", list(GEN))
def test_generate_with_loaded_adapter_matches_peft(tmp_path, seed, case):
    family, config = GEN[case]
    d, _ = _peft_adapter(tmp_path, family, config, name="g", adapter_scale=0.5, scale=3.0)
    pm = PeftModel.from_pretrained(no_special_tokens(tiny_hf(family, scale=3.0)[0]), d).eval()
    m = lp.load_adapter(tiny_hf(family, scale=3.0)[1], d)
    n = 6
    ids = torch.randint(0, V - 1, (2, 7))
    ours = lmstack.generate(m, ids, max_new_tokens=n, temperature=0.0).sequences[:, 7:]
    assert torch.equal(ours, _greedy_oracle(pm, ids, n))
    # a left-padded batch: each row generates what it generates alone
    lengths = [3, 7, 5]
    ids, mask = ragged_batch(lengths, seed=int(torch.randint(0, 2**31, ())))
    ours = lmstack.generate(m, ids, attention_mask=mask, max_new_tokens=n, temperature=0.0).sequences[:, ids.shape[1]:]
    for i, L in enumerate(lengths):
        assert torch.equal(ours[i], _greedy_oracle(pm, ids[i:i + 1, -L:], n)[0]), f"row {i}"
    if case == "lora":  # peft's generate is reliable for LoRA (not for prompt learning in peft 0.21 + tf 5.24)
        with torch.no_grad():
            ref = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        assert torch.equal(ours, ref[:, ids.shape[1]:])


# -- merging, then exporting ----------------------------------------------------------------------------
MERGE = {
    "lora_llama": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
                                       task_type=C, init_lora_weights=False)),
    "lora_rs_qwen2": ("qwen2", LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj", "up_proj"],
                                          use_rslora=True, task_type=C, init_lora_weights=False)),
    "ia3_qwen2": ("qwen2", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"], task_type=C)),
}


@pytest.mark.parametrize("case", list(MERGE))
def test_merge_then_to_hf_matches_peft_merge_and_unload(tmp_path, seed, case):
    family, config = MERGE[case]
    d, pm = _peft_adapter(tmp_path, family, config)
    m = lp.load_adapter(tiny_hf(family)[1], d)
    lp.merge_and_unload(m)
    lmstack.to_hf(m, tmp_path / "merged")
    ours = load_hf(tmp_path / "merged")
    ref = pm.merge_and_unload().eval()
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        a, b = ours(input_ids=x).logits, ref(input_ids=x).logits
        base = tiny_hf(family)[0](input_ids=x).logits
    assert (base - b).abs().max() > 1e-3
    assert (a - b).abs().max() <= TOL


# -- round trips ----------------------------------------------------------------------------------------
def _randomize(m):
    with torch.no_grad():
        for p in lp.adapter_parameters(m):
            p.add_(torch.randn_like(p) * 0.3)


ROUND = {
    "lora_str_target": ("llama", "lora", dict(r=4, alpha=8, target_modules="q_proj")),  # lmstack: a suffix name
    "ia3_str_target": ("llama", "ia3", dict(target_modules="down_proj", feedforward_modules="down_proj")),
    "lora_lm_head": ("llama", "lora", dict(r=2, alpha=4, target_modules=["lm_head", "v_proj"])),
    "lora_all_linear": ("qwen2", "lora", dict(r=2, alpha=3, target_modules="all-linear", use_rslora=True)),
    "prompt": ("qwen2", "prompt", dict(num_virtual_tokens=3)),
    "prefix": ("mistral", "prefix", dict(num_virtual_tokens=3, encoder_hidden_size=8)),
}


@pytest.mark.parametrize("case", list(ROUND))
def test_lmstack_peft_lmstack_peft_round_trip(tmp_path, seed, case):
    """lmstack save (peft format) -> peft load = same logits; peft save -> lmstack load -> save -> peft load."""
    family, method, options = ROUND[case]
    hf, m = tiny_hf(family)
    lp.apply(m, method, **options)
    _randomize(m)
    m.eval()
    lp.save_adapter(m, tmp_path / "ours", format="peft")
    pm = PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    x = torch.randint(0, V, (2, 9))
    want = _logits(m, x)
    assert (_peft_logits(pm, x) - want).abs().max() <= TOL
    pm.save_pretrained(tmp_path / "theirs")
    m2 = lp.load_adapter(tiny_hf(family)[1], tmp_path / "theirs")
    assert (_logits(m2, x) - want).abs().max() <= TOL
    lp.save_adapter(m2, tmp_path / "ours2", format="peft")
    pm2 = PeftModel.from_pretrained(tiny_hf(family)[0], tmp_path / "ours2").eval()
    assert (_peft_logits(pm2, x) - want).abs().max() <= TOL


# -- bad adapter folders: one clear error naming what is wrong ------------------------------------------
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=C, init_lora_weights=False)


def _edit_config(d, **changes):
    c = json.loads((d / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (d / "adapter_config.json").write_text(json.dumps(c))


def test_bad_adapter_folders(tmp_path, seed):
    def fresh(name, **hf_kw):
        return _peft_adapter(tmp_path, "llama", LoraConfig(**LORA), name=name, **hf_kw)[0]

    def err(d, exc=ValueError, **hf_kw):
        with pytest.raises(exc) as e:
            lp.load_adapter(tiny_hf("llama", **hf_kw)[1], d)
        msg = str(e.value)
        assert "\n" not in msg.strip() and len(msg) < 600, msg
        return msg

    d = fresh("no_weights")
    os.remove(d / "adapter_model.safetensors")
    assert "adapter_model.safetensors" in err(d, FileNotFoundError)
    d = fresh("no_config")
    os.remove(d / "adapter_config.json")
    assert "adapter_config.json" in err(d, FileNotFoundError)
    assert "holds no adapter" in err(tmp_path / "missing_dir", FileNotFoundError)
    d = fresh("r_differs")
    _edit_config(d, r=8)
    assert "lora_A" in err(d) and "(4, 64)" in err(d)
    d = fresh("hidden")  # adapter for dim 64 on a dim 32 model
    assert "(4, 64)" in err(d, dim=32, heads=2, kv_heads=1)
    d = fresh("three_layers", layers=3)
    assert "layers.2." in err(d)
    d = fresh("one_layer", layers=1)
    assert "layers.1." in err(d)
    d = fresh("unknown_type")
    _edit_config(d, peft_type="LOHA")
    assert "LOHA" in err(d)
    d = fresh("seq_cls")
    _edit_config(d, task_type="SEQ_CLS")
    assert "SEQ_CLS" in err(d)
    d = fresh("bad_json")
    (d / "adapter_config.json").write_text("{oops")
    assert "JSON" in err(d)
    d = fresh("corrupt")
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    assert "safetensors" in err(d)
    d, _ = _peft_adapter(tmp_path, "llama", PromptTuningConfig(num_virtual_tokens=4, task_type=C), name="p")
    assert "virtual_embeds" in err(d, dim=32, heads=2, kv_heads=1)
    d, _ = _peft_adapter(tmp_path, "llama", PrefixTuningConfig(num_virtual_tokens=4, task_type=C), name="pre", layers=1)
    assert "layers" in err(d)


def test_lm_head_adapter_onto_another_base_weight_is_refused(tmp_path, seed):
    """peft saves a targeted lm_head's base weight with the adapter; loading it onto a model whose
    lm_head differs (another base, a resized vocabulary) is refused, naming the tensor, instead of
    silently using this model's weight under an adapter trained on another."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], task_type=C, init_lora_weights=False)
    d, _ = _peft_adapter(tmp_path, "llama", config)
    other = tiny_hf("llama", seed=1)[1]
    with pytest.raises(ValueError, match=r"lm_head\.base_layer\.weight.*not this model's"):
        lp.load_adapter(other, d)
    bf16 = tiny_hf("llama")[1].to(torch.bfloat16)  # the same weights in another precision load
    lp.load_adapter(bf16, d)
