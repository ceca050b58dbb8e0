"""Weight initialisation: N(0, init_std) everywhere, zero biases, unit norm gains; with
``init_scaled_residual`` the projections that write into the residual stream (o_proj, down_proj)
use std / sqrt(2 * n_layers) so the stream's variance stays O(1) with depth (GPT-2, Radford 2019).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig

RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.init_scaled_residual else cfg.init_std
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS else cfg.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
        elif hasattr(module, "weight") and name.endswith(("norm", "layernorm")):
            nn.init.ones_(module.weight)
