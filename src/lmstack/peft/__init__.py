"""lmstack.peft: parameter-efficient fine-tuning by module replacement on the one Transformer.

``apply(model, method, **options)`` freezes every weight of a built model and adds a method's
small trainable parameters by swapping submodules (the model's class and code do not change):

=============  ==========================================  ===========================================
method         what is added (module)                      options (defaults)
=============  ==========================================  ===========================================
lora           B A low-rank updates on linear maps (lora)  r=8, alpha=16, dropout=0, target_modules=
                                                           ("q_proj", "v_proj") or "all-linear",
                                                           use_rslora=False
adapter        Houlsby bottleneck MLPs after sublayers     bottleneck=64, activation="gelu",
               (adapter)                                   target_modules=("self_attn", "mlp")
prefix         per-layer key/value prefixes through an     num_virtual_tokens=20,
               MLP reparameterisation (prefix)             encoder_hidden_size=n_kv_heads*head_dim,
                                                           init_token_ids | init_text + tokenizer
ptuning_v2     per-layer key/value prefixes (prefix)       num_virtual_tokens=20, init_token_ids |
                                                           init_text + tokenizer
prompt         a soft prompt before the input, or before   num_virtual_tokens=20, init_token_ids |
               the answer (prompt)                         init_text + tokenizer, position="start" |
                                                           "end" (placeholder ids: soft_prompt_ids)
ia3            learned scales of k, v and the FFN          target_modules=("k_proj", "v_proj",
               activation (ia3)                            "down_proj"), feedforward_modules=
                                                           ("down_proj",)
=============  ==========================================  ===========================================

One method per model: applying a second raises (``merge_and_unload`` or ``unload`` first).
Target names match module-name suffixes, as in HF peft; a name matching nothing raises.

Then: ``trainable_parameters`` / ``adapter_parameters`` / ``adapter_state_dict`` for training;
``disable_adapters()`` (exactly the base model: a DPO reference from the same weights);
``merge`` / ``unmerge`` / ``merge_and_unload`` (LoRA, IA3) and ``fold`` (prefix); ``unload``;
``save_adapter`` / ``load_adapter`` in lmstack's format or HF peft's (``lmstack.interop.peft_format``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from .adapter import apply_adapter
from .common import AdapterModule, Wrapper, check_not_decoding, freeze, replace_module
from .ia3 import IA3Linear, apply_ia3
from .lora import LoRALinear, apply_lora
from .prefix import PrefixEncoder, apply_prefix, apply_ptuning_v2
from .prompt import apply_prompt

METHODS = ("lora", "adapter", "prefix", "ptuning_v2", "prompt", "ia3")
_APPLY = {
    "lora": apply_lora, "adapter": apply_adapter, "prefix": apply_prefix, "ptuning_v2": apply_ptuning_v2,
    "prompt": apply_prompt, "ia3": apply_ia3,
}
MERGEABLE = ("lora", "ia3")  # linear in the base weights: foldable into them
INIT_ONLY = ("init_token_ids", "init_text", "tokenizer")  # shape nothing; not saved


def options_of(method: str, options: dict) -> dict:
    """``options`` checked against the method's keywords, with the defaults filled in."""
    if method not in _APPLY:
        raise ValueError(f"unknown PEFT method {method!r}; valid: {', '.join(METHODS)}")
    sig = inspect.signature(_APPLY[method])
    valid = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for PEFT method {method!r}; valid: {valid}")
    full = {n: sig.parameters[n].default for n in valid}
    full.update(options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}


def method_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "peft_config", None)
    return None if cfg is None else cfg["method"]


def apply(model: nn.Module, method: str, **options) -> nn.Module:
    """Freeze ``model`` and add PEFT ``method`` to it in place (see the module table); returns it.

    The method and its options (defaults filled in) are recorded as ``model.peft_config``.
    """
    full = options_of(method, options)
    check_not_decoding(model, f"apply({method!r})")
    if method_of(model) is not None:
        raise ValueError(
            f"the model already has a {method_of(model)!r} adapter; stacking PEFT methods is not supported: "
            "merge_and_unload() or unload() it first"
        )
    if getattr(model, "virtual_tokens", 0) or any(isinstance(m, AdapterModule) for m in model.modules()):
        raise ValueError("the model already has adapter modules; unload() them before applying another method")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    freeze(model)
    try:
        _APPLY[method](model, **full)  # checks its targets before it replaces anything
    except Exception:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    for m in model.modules():
        if isinstance(m, AdapterModule):
            m.train(model.training)  # new modules start in train mode: an eval model keeps its dropout off
            for _, p in m.adapter_named_parameters():
                p.requires_grad_(True)
    model.peft_config = {"method": method, "options": {k: v for k, v in full.items() if k not in INIT_ONLY}}
    return model


def soft_prompt_ids_of(method: str, options: dict) -> list[int]:
    """The placeholder ids -1 ... -n that ``apply(model, method, **options)`` makes stand for a soft
    prompt inside the text (prompt tuning with ``position="end"``), to put before each answer;
    [] for every other method and layout."""
    if method != "prompt":
        return []
    full = options_of(method, options)
    return [-1 - k for k in range(full["num_virtual_tokens"])] if full["position"] == "end" else []


def soft_prompt_ids(model: nn.Module) -> list[int]:
    """``soft_prompt_ids_of`` the model's adapter ([] without one)."""
    cfg = getattr(model, "peft_config", None)
    return [] if cfg is None else soft_prompt_ids_of(cfg["method"], cfg["options"])


def _require(model: nn.Module) -> str:
    method = method_of(model)
    if method is None:
        raise ValueError("the model has no PEFT adapter; call lmstack.peft.apply(model, method, ...) first")
    return method


# -- parameters -----------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor for every adapter parameter (names as in ``model.state_dict()``)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AdapterModule):
            for pname, p in m.adapter_named_parameters():
                out[f"{name}.{pname}" if name else pname] = p
    return out


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer should get)."""
    return list(adapter_state_dict(model).values())


def trainable_parameters(model: nn.Module) -> int:
    """How many parameter elements require grad (each shared tensor counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# -- switching adapters off -----------------------------------------------------------------------
@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model`` computes exactly its base model (e.g. the frozen reference of DPO).

    A KV cache filled inside must not be used outside, and vice versa (virtual tokens differ).
    """
    _require(model)
    mods = [m for m in model.modules() if isinstance(m, AdapterModule)]
    if any(getattr(m, "merged", False) for m in mods):
        raise ValueError("disable_adapters on a merged model: unmerge(model) first")
    if getattr(model, "soft_tokens", None) is not None:
        raise ValueError("a soft prompt placed inside the text (position='end') has no base-model equivalent: its "
                         "placeholder ids are not tokens; drop them (keep ids >= 0) to run the base model")
    saved = model.virtual_tokens
    try:
        for m in mods:
            m.disabled = True
        model.virtual_tokens = 0
        yield model
    finally:
        for m in mods:
            m.disabled = False
        model.virtual_tokens = saved


# -- merging --------------------------------------------------------------------------------------
def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights exactly (LoRA: W += s B A; IA3: scale rows/columns);
    the wrappers then cost nothing and ``unmerge`` restores W up to rounding. Prefix tuning: folds
    the MLP reparameterisation into plain prefixes (``fold``; not reversible). Other methods have
    nothing to merge and raise."""
    method = _require(model)
    check_not_decoding(model, "merge")
    if method in ("prefix", "ptuning_v2"):
        return fold(model)
    if method not in MERGEABLE:
        raise ValueError(f"PEFT method {method!r} cannot be merged into the base weights; keep it as an adapter")
    for m in model.modules():
        if isinstance(m, (LoRALinear, IA3Linear)):
            m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged LoRA/IA3 updates out of the base weights again (no-op where not merged)."""
    method = _require(model)
    check_not_decoding(model, "unmerge")
    if method not in MERGEABLE:
        raise ValueError(f"PEFT method {method!r} is never merged into the base weights; nothing to unmerge")
    for m in model.modules():
        if isinstance(m, (LoRALinear, IA3Linear)):
            m.unmerge()
    return model


def fold(model: nn.Module) -> nn.Module:
    """Prefix tuning: replace the reparameterisation MLP by the prefixes it computes (no-op for
    P-tuning v2, whose prefixes are already plain)."""
    method = _require(model)
    check_not_decoding(model, "fold")
    if method not in ("prefix", "ptuning_v2"):
        raise ValueError(f"fold applies to prefix tuning, not to {method!r}")
    model.prefix_encoder.fold()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter (unmerging first), leaving the plain base model with every parameter
    trainable again; returns it."""
    _require(model)
    check_not_decoding(model, "unload")
    for m in model.modules():
        if isinstance(m, (LoRALinear, IA3Linear)):
            m.unmerge()
    _drop_adapters(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """LoRA / IA3: merge, then drop the wrappers: a plain ``Transformer`` (``lmstack.to_hf`` can
    save it) computing what the adapted model computed; every parameter trainable again."""
    method = _require(model)
    if method not in MERGEABLE:
        raise ValueError(
            f"PEFT method {method!r} cannot be merged into the base weights; save it with save_adapter "
            "(or unload() to drop it)"
        )
    merge(model)
    _drop_adapters(model)
    return model


def _drop_adapters(model: nn.Module) -> None:
    wrapped = [name for name, m in model.named_modules() if isinstance(m, Wrapper)]
    for name in reversed(wrapped):  # innermost first
        replace_module(model, name, model.get_submodule(name).base_layer)
    if isinstance(getattr(model, "prefix_encoder", None), PrefixEncoder):
        del model.prefix_encoder
    model.virtual_embeds = None
    model.virtual_tokens = 0
    model.soft_tokens = None
    for p in model.parameters():
        p.requires_grad_(True)
    del model.peft_config


from .saving import load_adapter, save_adapter  # noqa: E402  (uses the helpers above)

__all__ = [
    "METHODS", "apply", "trainable_parameters", "adapter_parameters", "adapter_state_dict", "disable_adapters",
    "merge", "unmerge", "fold", "merge_and_unload", "unload", "save_adapter", "load_adapter", "soft_prompt_ids",
    "soft_prompt_ids_of",
]
