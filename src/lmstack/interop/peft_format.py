"""HF peft's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) <-> lmstack.peft.

Pure conversions of a config dict and a tensor dict; the files are written and read by
``lmstack.peft.save_adapter`` / ``load_adapter``. ``PeftModel.from_pretrained(hf_model, dir)``
loads what ``to_peft`` describes onto the HF model exported by ``lmstack.to_hf`` and computes the
same logits. The correspondences (peft 0.21 names):

- LoRA: ``<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), keys prefixed
  ``base_model.model.`` + the HF module path; scale lora_alpha / r (or / sqrt(r), use_rslora).
- IA3: ``<module>.ia3_l``, (out, 1) for output-scaled layers, (1, in) for ``feedforward_modules``.
- Prompt tuning: ``prompt_embeddings`` (num_virtual_tokens, hidden_size).
- Prefix tuning without projection (= P-tuning v2, or lmstack's folded prefix tuning):
  ``prompt_embeddings`` (num_virtual_tokens, num_layers * 2 * n_kv_heads * head_dim), per layer
  keys then values; ``token_dim`` = n_kv_heads * head_dim and ``num_attention_heads`` = n_kv_heads.

Houlsby adapters have no peft counterpart.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig

PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING",
              "ptuning_v2": "PREFIX_TUNING"}
ROOT = "base_model.model."


def _hf_path(name: str) -> str:
    """lmstack module path -> HF ``LlamaForCausalLM`` module path."""
    return name if name.startswith("lm_head.") else "model." + name


def _lmstack_path(key: str) -> str:
    key = key.removeprefix(ROOT)
    return key.removeprefix("model.") if key.startswith("model.") else key


def _matches(name: str, targets) -> bool:
    from ..peft.common import named_suffix_match  # here: lmstack.peft imports this module

    return named_suffix_match(name, [targets] if isinstance(targets, str) else targets or [])


def _peft_targets(targets):
    """lmstack target names as peft reads them: peft takes a string other than "all-linear" for a
    regex matched against the whole module path, so one name is written as a list."""
    return targets if targets == "all-linear" or not isinstance(targets, str) else [targets]


def _lmstack_targets(targets, option: str):
    """peft's target list in lmstack's module names: peft saves "all-linear" expanded into full HF
    paths (``model.layers.0.self_attn.q_proj``), which lmstack names without the ``model.`` prefix."""
    if targets is None or targets == "all-linear":
        return targets
    if isinstance(targets, str):
        raise ValueError(f"peft regex {option}={targets!r} is not supported; list the module names")
    return [_lmstack_path(t) if isinstance(t, str) else t for t in targets]


# What peft fills in for a config that leaves these out (peft.utils.constants, for lmstack's families)
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
PEFT_DEFAULT_TARGETS = {
    "LORA": {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]},
    "IA3": {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
            "qwen2": ["q_proj", "v_proj", "down_proj"]},
}
PEFT_DEFAULT_FEEDFORWARD = ["down_proj"]  # IA3, every family here


def _targets(config: dict[str, Any], kind: str, cfg: ModelConfig) -> list[str] | str:
    targets = config.get("target_modules")
    if targets is None:
        targets = PEFT_DEFAULT_TARGETS[kind][cfg.hf_model_type]
    return _lmstack_targets(targets, "target_modules")


# Options of a peft config that do not change what a loaded adapter computes (bookkeeping, or how its
# weights were initialised or trained); any other option set to a non-empty value must be one lmstack
# implements, else loading it is refused rather than computing something else.
_INERT = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
          "inference_mode", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
          "megatron_config", "megatron_core", "runtime_config", "layers_pattern", "qalora_group_size",
          "ensure_weight_tying", "init_ia3_weights", "prompt_tuning_init", "prompt_tuning_init_text",
          "tokenizer_name_or_path", "tokenizer_kwargs", "init_weights"}
_HANDLED = {
    "LORA": {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"},
    "IA3": {"target_modules", "feedforward_modules"},
    "PROMPT_TUNING": {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                      "num_layers"},
}
_HANDLED["PREFIX_TUNING"] = _HANDLED["PROMPT_TUNING"] | {"encoder_hidden_size", "prefix_projection"}


def _off(value) -> bool:
    """An option left at "off": null, false, empty, or peft's bias="none"."""
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list)) and not value)


def to_peft(method: str, options: dict[str, Any], tensors: dict[str, torch.Tensor], cfg: ModelConfig
            ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """lmstack method, options and adapter tensors (folded prefixes) -> peft config and tensors."""
    if method not in PEFT_TYPES:
        raise ValueError(f"PEFT method {method!r} has no HF peft equivalent; save it with format='lmstack'")
    common = {"peft_type": PEFT_TYPES[method], "task_type": "CAUSAL_LM", "inference_mode": True,
              "base_model_name_or_path": None, "revision": None, "modules_to_save": None}
    if method == "lora":
        config = {**common, "r": options["r"], "lora_alpha": options["alpha"], "lora_dropout": options["dropout"],
                  "target_modules": _peft_targets(options["target_modules"]), "use_rslora": options["use_rslora"],
                  "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False}
        return config, {ROOT + _hf_path(k): v for k, v in tensors.items()}
    if method == "ia3":
        config = {**common, "target_modules": _peft_targets(options["target_modules"]),
                  "feedforward_modules": _peft_targets(options["feedforward_modules"]), "fan_in_fan_out": False,
                  "init_ia3_weights": True}
        out = {}
        for k, v in tensors.items():
            module = k.removesuffix(".ia3_l")
            ff = _matches(module, options["feedforward_modules"])
            out[ROOT + _hf_path(k)] = v.reshape(1, -1) if ff else v.reshape(-1, 1)
        return config, out
    P = options["num_virtual_tokens"]
    shape = {"num_virtual_tokens": P, "num_transformer_submodules": 1, "num_layers": cfg.n_layers}
    if method == "prompt":
        if options.get("position", "start") != "start":
            raise ValueError(f"HF peft puts soft prompts before the input; position={options['position']!r} has no "
                             f"peft equivalent: save it with format='lmstack'")
        config = {**common, **shape, "token_dim": cfg.dim, "num_attention_heads": cfg.n_heads,
                  "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
        return config, {"prompt_embeddings": tensors["virtual_embeds.weight"]}
    kv = cfg.n_kv_heads * cfg.head_dim
    config = {**common, **shape, "token_dim": kv, "num_attention_heads": cfg.n_kv_heads,
              "encoder_hidden_size": kv, "prefix_projection": False}  # saved prefixes are folded
    return config, {"prompt_embeddings": tensors["prefix_encoder.table"]}


def _refuse(config: dict[str, Any], kind: str) -> None:
    """Raise for an option that would change what the adapter computes and that lmstack does not
    implement (aLoRA, DoRA, exclude_modules, modules_to_save, rank patterns, fan_in_fan_out, …)."""
    for key, value in config.items():
        if key not in _INERT and key not in _HANDLED[kind] and not _off(value):
            raise ValueError(f"peft adapter option {key}={value!r} is not supported by lmstack.peft")


def from_peft(config: dict[str, Any], tensors: dict[str, torch.Tensor], cfg: ModelConfig
              ) -> tuple[str, dict[str, Any], bool, dict[str, torch.Tensor]]:
    """peft config and tensors -> (lmstack method, options, prefixes folded?, lmstack tensors)."""
    kind = config.get("peft_type")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"peft task_type={config.get('task_type')!r} is not supported; only CAUSAL_LM")
    if kind not in _HANDLED:
        raise ValueError(f"peft adapter type {kind!r} is not supported; supported: {', '.join(_HANDLED)}")
    _refuse(config, kind)
    if kind == "LORA":
        r, alpha = (config.get(k, PEFT_DEFAULTS[k]) for k in ("r", "lora_alpha"))
        options = {"r": r, "alpha": alpha, "dropout": config.get("lora_dropout", 0.0),
                   "target_modules": _targets(config, kind, cfg), "use_rslora": bool(config.get("use_rslora", False))}
        return "lora", options, False, {_lmstack_path(k): v for k, v in tensors.items()}
    if kind == "IA3":
        targets = _targets(config, kind, cfg)
        ff = config.get("feedforward_modules")
        if ff is None:  # peft's default, for the targets that are one
            ff = ([t for t in targets if t.split(".")[-1] in PEFT_DEFAULT_FEEDFORWARD] if isinstance(targets, list)
                  else PEFT_DEFAULT_FEEDFORWARD)
        options = {"target_modules": targets, "feedforward_modules": _lmstack_targets(ff, "feedforward_modules")}
        return "ia3", options, False, {_lmstack_path(k): v.flatten() for k, v in tensors.items()}
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
        if config.get("num_transformer_submodules", 1) != 1:
            raise ValueError("peft prompt adapters for encoder-decoder models are not supported")
        if set(tensors) != {"prompt_embeddings"}:
            raise ValueError(f"peft {kind} adapter holds {sorted(tensors)}; expected only 'prompt_embeddings'")
        P = config.get("num_virtual_tokens")
        if P is None:
            raise ValueError(f"peft {kind} adapter config has no num_virtual_tokens; pass the adapter_config.json "
                             f"peft saved")
        table = tensors["prompt_embeddings"]
        if kind == "PROMPT_TUNING":
            return "prompt", {"num_virtual_tokens": P}, False, {"virtual_embeds.weight": table}
        kv = cfg.n_kv_heads * cfg.head_dim
        if config.get("num_layers", cfg.n_layers) != cfg.n_layers or config.get("token_dim", kv) != kv:
            raise ValueError(
                f"peft prefix adapter is for {config.get('num_layers')} layers of key width {config.get('token_dim')}; "
                f"this model has {cfg.n_layers} layers of width n_kv_heads*head_dim={kv}"
            )
        if config.get("prefix_projection"):  # peft stores the projection's output: lmstack's folded prefix
            hidden = config.get("encoder_hidden_size") or kv
            return "prefix", {"num_virtual_tokens": P, "encoder_hidden_size": hidden}, True, {
                "prefix_encoder.table": table}
        return "ptuning_v2", {"num_virtual_tokens": P}, False, {"prefix_encoder.table": table}
