"""lmstack.kernels: one attention API over several backends.

``attention(q, k, v, causal=..., seqs=..., window=..., scale=..., key_valid=..., backend=...)``
takes q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D) and returns (B, Hq, Tq, D). Backends:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (the default off-GPU).
  GQA uses SDPA's ``enable_gqa`` (torch >= 2.5) so K/V are never repeated; for single-token
  decoding the query heads sharing a K/V head are folded into the query-length axis instead,
  which needs no mask and no copy on any torch version.
- ``"reference"``: plain PyTorch math (``reference.attention_ref``), the specification.

This package imports nothing else from lmstack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import attention_mask, attention_ref
from .seqs import Seqs

__all__ = ["attention", "attention_mask", "attention_ref", "Seqs", "BACKENDS"]

BACKENDS = ("sdpa", "reference")
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    seqs: Seqs | None = None,
    window: int | None = None,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    backend = backend or "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {BACKENDS}")

    # Decoding one token with nothing to mask: every cached key is visible.
    simple_decode = Tq == 1 and window is None and seqs is None and key_valid is None
    plain_causal = causal and Tq == Tk and window is None and seqs is None and key_valid is None
    if simple_decode or (not causal and window is None and seqs is None and key_valid is None):
        mask = None
        causal = False
    elif plain_causal:
        mask = None
    else:
        mask = attention_mask(
            Tq, Tk, causal=causal, window=window,
            doc_ids=None if seqs is None else seqs.doc_ids, key_valid=key_valid, device=q.device,
        )

    if backend == "reference":
        return attention_ref(q, k, v, causal=causal, mask=mask, scale=scale)
    return _sdpa(q, k, v, causal=causal, mask=mask, scale=scale)


def _sdpa(q, k, v, *, causal, mask, scale):
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if G > 1 and Tq == 1 and mask is None:
        # Fold the G query heads of each K/V head into the query axis: (B, Hkv, G, D).
        o = F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v, scale=scale)
        return o.view(B, Hq, 1, D)
    kw = {}
    if G > 1:
        if _SDPA_HAS_GQA:
            kw["enable_gqa"] = True
        else:  # torch 2.4: no GQA in SDPA, repeat K/V (the only backend that must)
            k = k.repeat_interleave(G, dim=1)
            v = v.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, **kw
    )
