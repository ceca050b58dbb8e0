"""Rotary position embeddings (RoFormer, Su et al. 2021) and their context-extension scalings.

RoPE rotates each pair of query/key dimensions by an angle proportional to the token's position,
so q.k depends only on the relative distance. We use the "rotate half" pairing (dimension i with
i + head_dim/2) that HF LLaMA checkpoints are trained with. Scalings change the frequencies:
``linear`` (position interpolation, Chen et al. 2023) divides them all by the factor; ``llama3``
divides only the low frequencies and blends the middle band; ``yarn`` (Peng et al. 2023) blends
interpolated and original frequencies along a ramp between two rotation counts and scales
cos/sin by an attention factor; ``dynamic`` (NTK-aware, bloc97/emozilla 2023) leaves short
sequences alone and, once a forward pass reaches past the original context, raises the base
theta with the current length (``dynamic_rope``, recomputed per forward pass).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _base_inv_freq(head_dim: int, theta: float | torch.Tensor, device=None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, scaled as the config asks (``dynamic``: the
    unscaled frequencies, which it uses up to its original context)."""
    inv_freq = _base_inv_freq(head_dim, theta)
    if scaling is None or scaling["type"] == "dynamic":
        return inv_freq
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        old_ctx = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are interpolated, short ones kept, the band between blended.
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        middle = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(middle, blended, out)
    if kind == "yarn":
        # Dimension d turns 2*pi*... times over the original context; dimensions that turn more than
        # beta_fast times keep their frequency, fewer than beta_slow are interpolated, a ramp between.
        old_ctx = float(scaling["original_max_position_embeddings"])
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def dim_at(rotations: float) -> float:
            return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_at(beta_fast), dim_at(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: keep the original frequency, 0: interpolate by the factor
        return (inv_freq / factor) * (1 - keep) + inv_freq * keep
    raise ValueError(f"rope_scaling type {kind!r} is not supported (linear, dynamic, llama3, yarn)")


def rope_attention_scale(scaling: dict[str, Any] | None) -> float:
    """The factor cos/sin are multiplied by: yarn's "mscale" (0.1 ln(factor) + 1 by default), else 1."""
    if scaling is None or scaling["type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor, m, m_all = float(scaling["factor"]), scaling.get("mscale"), scaling.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


def dynamic_rope(head_dim: int, theta: float, scaling: dict[str, Any],
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., T, head_dim) for ``positions`` under dynamic NTK scaling.

    The forward pass's length L = max(positions) + 1; past the original context ``L0`` the base
    becomes ``theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))``, which stretches the
    lowest frequency to cover L while the highest barely moves. Up to L0 it is plain RoPE. Computed
    with tensors (no host sync), in float32 like transformers, so it also runs under torch.compile.
    Cached keys keep the frequencies they were written with, as in transformers.
    """
    old_ctx, factor = scaling["original_max_position_embeddings"], float(scaling["factor"])
    seq_len = (positions.max() + 1).clamp_min(old_ctx)  # () int64
    base = theta * ((factor * seq_len / old_ctx) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = _base_inv_freq(head_dim, base, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rope_tables(inv_freq: torch.Tensor, max_len: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (max_len, head_dim), computed in float32 (times ``scale``: yarn's factor)."""
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())  # (max_len, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin broadcastable to it, e.g. (1|B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
