"""What every PEFT method shares: the adapter-module marker, target lookup by name, module swap.

Methods change a built ``Transformer`` by replacing submodules (torchtune's ``modules/peft``):
a wrapper keeps the original module as ``base_layer`` and adds its own small parameters; the
model's class and code stay as they are. ``AdapterModule`` marks the modules a method added, so
the helpers in ``lmstack.peft`` find the adapter parameters, flip adapters off, merge and unload
without knowing the method.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class AdapterModule(nn.Module):
    """A module added by a PEFT method. Wrappers hold the replaced module as ``base_layer``; every
    other parameter of the module belongs to the adapter. ``disabled`` makes it compute exactly
    what the base module computes (``lmstack.peft.disable_adapters``)."""

    disabled = False

    def adapter_named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, p


class Wrapper(AdapterModule):
    """An adapter around one module of the model (kept as ``base_layer``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer


def named_suffix_match(name: str, targets: Iterable[str]) -> bool:
    """HF peft's rule: a module matches a target name if its full name is it or ends in '.' + it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def as_names(targets, option: str) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [targets]
    names = tuple(targets)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"{option}={targets!r} must be a module name or a non-empty list of names")
    return names


def find_targets(model: nn.Module, targets: tuple[str, ...], kind: type[nn.Module], option: str) -> list[str]:
    """Full names of the ``kind`` modules whose names match ``targets`` (module-name suffixes).

    Raises ValueError when a target name matches nothing, listing the names that exist.
    """
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, kind)}
    found = [name for name in candidates if named_suffix_match(name, targets)]
    unmatched = [t for t in targets if not any(named_suffix_match(n, [t]) for n in found)]
    if unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ValueError(
            f"{option} {unmatched} matched no {kind.__name__} module of the model; "
            f"{kind.__name__} names that exist: {leaves}"
        )
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def like(weight: torch.Tensor) -> dict:
    """factory kwargs putting new adapter parameters on the base weight's device, in its dtype, but
    in float32 on a half-precision base (as HF peft does): in bf16 most of AdamW's small updates to
    an adapter would round away. The forwards cast at the boundary, so the base stays in its dtype."""
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    return {"device": weight.device, "dtype": dtype}


def check_not_decoding(model: nn.Module, what: str) -> None:
    """Refuse to change the weights or modules under an open ``generate_stream``: its decode layout
    holds copies of the weights (and its KV cache their keys), which every call sharing it uses."""
    if model.__dict__.get("decode_layout_users", 0):
        raise ValueError(f"{what}: a generate_stream on this model is still open and decodes with copies of its "
                         f"weights; finish it or close() it first")
