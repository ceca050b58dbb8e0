"""Rotary position embeddings (RoFormer, Su et al. 2021) and their context-extension scalings.

RoPE rotates each pair of query/key dimensions by an angle proportional to the token's position,
so q.k depends only on the relative distance. We use the "rotate half" pairing (dimension i with
i + head_dim/2) that HF LLaMA checkpoints are trained with. Scalings change the frequencies:
``linear`` (position interpolation, Chen et al. 2023) divides them all by the factor; ``llama3``
divides only the low frequencies and blends the middle band.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, scaled as the config asks."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are interpolated, short ones kept, the band between blended.
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        middle = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(middle, blended, out)
    raise NotImplementedError(f"rope_scaling type {kind!r} is not implemented yet (supported: linear, llama3)")


def rope_tables(inv_freq: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (max_len, head_dim), computed in float32."""
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())  # (max_len, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin broadcastable to it, e.g. (1|B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
