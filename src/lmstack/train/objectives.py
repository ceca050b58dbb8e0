"""Training objectives. Causal LM: predict token t+1 from tokens <= t (cross-entropy, mean over
the targets that are not ``ignore_index``; half-precision logits are upcast so those runs keep an fp32 loss,
float64 ones stay float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.instruct import IGNORE_INDEX  # the one definition: labels that carry no loss


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits as float32 (an fp32 loss); float32 and float64 ones as they are."""
    return logits if logits.dtype == torch.float64 else logits.float()


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) already shifted (targets[t] = input[t + 1])."""
    return F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
