"""Training objectives. Causal LM: predict token t+1 from tokens <= t (cross-entropy, mean over
the targets that are not ``ignore_index``; logits are upcast so half-precision runs keep an fp32 loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.instruct import IGNORE_INDEX  # the one definition: labels that carry no loss


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) already shifted (targets[t] = input[t + 1])."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
