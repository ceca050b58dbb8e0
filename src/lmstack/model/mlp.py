"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., dim) -> the gate and up projections (..., ffn_dim each). Decoding on a CPU
        computes both as one product (``lmstack.generate.decode.cpu_decode_layout``)."""
        return self.gate_proj(x), self.up_proj(x)
