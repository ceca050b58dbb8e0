"""Causal self-attention with RoPE for the MHA / GQA / MQA family (Shazeer 2019; Ainslie et al. 2023).

``n_kv_heads`` K/V heads are shared by ``n_heads // n_kv_heads`` query heads each: MHA when they
are equal, MQA at 1, GQA in between. Sharing shrinks the KV cache by that ratio. K/V are never
repeated here; the kernel maps each query head to its K/V head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .cache import KVCache
from .rope import apply_rope


@dataclass
class AttnContext:
    """What every layer needs for one forward pass, computed once by the Transformer."""

    cos: torch.Tensor  # (1|B, 1, T, head_dim)
    sin: torch.Tensor
    cache: KVCache | None = None
    seqs: kernels.Seqs | None = None
    key_valid: torch.Tensor | None = None  # (B, Tk) False for padding keys
    # A static-shape step (``KVCache.update(slots=...)``): the cache slots (T,) its tokens are
    # written at; attention then spans the whole cache buffer, masked past these slots.
    slots: torch.Tensor | None = None
    backend: str | None = None
    # Leading virtual key/value positions that begin in this call but are not rows of x (see
    # ``Transformer.virtual_tokens``): a module replacing this layer's attention (prefix tuning)
    # prepends that many keys/values before attending. 0 for the plain model.
    virtual: int = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return self.attend(*self.project(x, ctx), ctx)

    # The two halves of forward, public so a module that replaces this one (e.g. prefix tuning,
    # which puts learned keys/values before k and v) reuses them instead of copying them.
    def project(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> q (B, Hq, T, D), k and v (B, Hkv, T, D), RoPE applied to q and k."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin), v

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> the q, k and v projections (B, T, heads * D each), before RoPE.
        Decoding on a CPU computes them as one product (``lmstack.generate.decode.cpu_decode_layout``)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Append k, v (B, Hkv, Tk_new, D) to the cache, attend with q (B, Hq, T, D) and project
        the heads back: -> (B, T, dim). Tk_new >= T: extra keys lead (causal alignment is bottom-right)."""
        B, _, T, _ = q.shape
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v, ctx.slots)  # (B, Hkv, cached + Tk_new | max_len, D)
        o = kernels.attention(
            q, k, v, causal=True, seqs=ctx.seqs, window=self.window,
            key_valid=ctx.key_valid, query_pos=ctx.slots, backend=ctx.backend,
        )  # (B, Hq, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
