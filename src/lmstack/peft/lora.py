"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear map W (out, in) gets a trainable low-rank update: y = W x + s * B A x with
A (r, in), B (out, r), r << min(in, out) and scale s = alpha / r (rsLoRA, Kalajdzievski 2023:
alpha / sqrt(r), which keeps the update's size stable as r grows). A starts kaiming-uniform and
B at zero, so the model is unchanged at step 0. After training, W + s B A is a plain weight:
``merge`` folds it in exactly (and ``unmerge`` takes it out again), so inference costs nothing.

Trainable parameters: r * (in + out) per targeted linear layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import Wrapper, as_names, find_targets, like, replace_module

DEFAULT_TARGETS = ("q_proj", "v_proj")


class LoRALinear(Wrapper):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, use_rslora: bool):
        super().__init__(base_layer)
        kw = like(base_layer.weight)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **kw)  # weight (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **kw)  # weight (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as peft
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled or self.merged:
            return y
        a = self.lora_A.weight
        # added in the adapter's precision (fp32 on a half-precision base) and rounded once, as peft does
        return (y.to(a.dtype) + self.lora_B(self.lora_A(self.dropout(x.to(a.dtype)))) * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """s * B A (out, in) in float32 (in float64 when the weights are)."""
        dt = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        return (self.lora_B.weight.to(dt) @ self.lora_A.weight.to(dt)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) - self.delta()).to(w.dtype))
            self.merged = False


def apply_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules=DEFAULT_TARGETS,
    use_rslora: bool = False,
) -> None:
    """Wrap every ``nn.Linear`` whose name ends in one of ``target_modules`` (e.g. "q_proj";
    "all-linear" = every linear layer but the LM head) in a ``LoRALinear``."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora r={r!r} must be an integer >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout={dropout!r} must be in [0, 1)")
    if target_modules == "all-linear":
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    else:
        names = find_targets(model, as_names(target_modules, "target_modules"), nn.Linear, "target_modules")
    if "lm_head" in names and getattr(model.config, "tie_embeddings", False):
        raise ValueError("lora on lm_head of a model with tied embeddings would also change the embedding; drop it")
    for name in names:
        replace_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora))
