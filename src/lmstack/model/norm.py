"""RMSNorm (Zhang & Sennrich 2019): scale by the root mean square, no mean subtraction, no bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.dtype == torch.float64:
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
        # Half precision: normalise in float32, cast back, then scale (the order HF LLaMA uses).
        y = F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return self.weight * y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
