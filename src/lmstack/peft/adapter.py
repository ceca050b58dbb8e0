"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A small residual MLP is inserted after each sublayer's output, before it joins the residual
stream: h + up(act(down(h))) with down (dim -> bottleneck) and up (bottleneck -> dim). Houlsby
puts one after the attention block and one after the feed-forward block of every layer. The up
projection starts at zero, so each adapter is the identity at init. Unlike LoRA and IA3 the
adapter is nonlinear, so it cannot be merged into the base weights; it also has no HF peft
equivalent (lmstack format only).

Trainable parameters: per adapter 2 * dim * bottleneck + bottleneck + dim (two biased linear
maps); with the default targets, two adapters per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Wrapper, as_names, find_targets, like, replace_module

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
DEFAULT_TARGETS = ("self_attn", "mlp")


class BottleneckAdapter(Wrapper):
    """Runs ``base_layer`` (any sublayer whose output is (..., dim)), then adds the bottleneck MLP."""

    def __init__(self, base_layer: nn.Module, dim: int, bottleneck: int, activation: str, ref: torch.Tensor):
        super().__init__(base_layer)
        self.down = nn.Linear(dim, bottleneck, **like(ref))  # default nn.Linear init
        self.up = nn.Linear(bottleneck, dim, **like(ref))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = activation

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(*args, **kwargs)  # (B, T, dim)
        if self.disabled:
            return h
        a = self.down.weight
        return h + self.up(ACTIVATIONS[self.activation](self.down(h.to(a.dtype)))).to(h.dtype)


def apply_adapter(
    model: nn.Module, *, bottleneck: int = 64, activation: str = "gelu", target_modules=DEFAULT_TARGETS
) -> None:
    """Wrap each sublayer named in ``target_modules`` (default: every ``self_attn`` and ``mlp``)
    in a ``BottleneckAdapter``."""
    if not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"adapter bottleneck={bottleneck!r} must be an integer >= 1")
    if activation not in ACTIVATIONS:
        raise ValueError(f"adapter activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
    dim = model.config.dim
    ref = model.embed_tokens.weight
    names = find_targets(model, as_names(target_modules, "target_modules"), nn.Module, "target_modules")
    for name in names:  # the adapter reads and writes the sublayer's (..., dim) output
        m = model.get_submodule(name)
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)) or (isinstance(m, nn.Linear) and m.out_features != dim):
            width = f" outputs {m.out_features} features, not dim={dim}" if isinstance(m, nn.Linear) else " is a container"
            raise ValueError(f"adapter target {name!r}{width}; target sublayers whose output joins the residual "
                             f"stream (self_attn, mlp, o_proj, down_proj)")
    for name in names:
        replace_module(model, name, BottleneckAdapter(model.get_submodule(name), dim, bottleneck, activation, ref))
