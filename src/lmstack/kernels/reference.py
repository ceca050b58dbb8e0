"""Reference attention in plain PyTorch: the specification the fast backends are tested against.

``attention_mask`` turns the high-level description (causal, sliding window, packed documents,
key padding) into one boolean "may attend" matrix; ``attention_ref`` is softmax(q k^T * scale) v
computed directly, in the input dtype (float64 in tests), with GQA done by grouping query heads
over their shared K/V head instead of repeating K/V.

Alignment: when there are more keys than queries (decoding with a KV cache) the queries are the
*last* Tq positions of the Tk keys, so causal and window masks align bottom-right.
"""

from __future__ import annotations

import math

import torch


def attention_mask(
    Tq: int,
    Tk: int,
    *,
    causal: bool = True,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean mask, True = may attend, shaped (B or 1, 1, Tq, Tk); None when nothing is masked.

    window: a query sees itself and the ``window - 1`` keys before it (HF Mistral semantics).
    doc_ids: (B, T) with Tq == Tk; tokens attend only within their own document.
    key_valid: (B, Tk) False for padding keys. A query always sees its own key, so rows of
    padding queries stay finite (their outputs are ignored; a fully masked row would give NaN).
    """
    if not causal and window is None and doc_ids is None and key_valid is None:
        return None
    qi = torch.arange(Tk - Tq, Tk, device=device).view(Tq, 1)  # absolute index of each query
    kj = torch.arange(Tk, device=device).view(1, Tk)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        mask &= kj <= qi
    if window is not None:
        mask &= qi - kj < window
    mask = mask.view(1, 1, Tq, Tk)
    if doc_ids is not None:
        if Tq != Tk:
            raise ValueError("document masks need as many queries as keys (no KV cache)")
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
        mask = mask | (kj == qi).view(1, 1, Tq, Tk)
    return mask


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) with Hq % Hkv == 0 -> (B, Hq, Tq, D).

    ``mask`` (broadcastable to (B, 1, Tq, Tk), True = attend) replaces ``causal`` when given.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if mask is None and causal:
        mask = attention_mask(Tq, Tk, causal=True, device=q.device)
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg = q.reshape(B, Hkv, G, Tq, D).to(acc)  # query head h reads K/V head h // G
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.to(acc)) * scale  # (B, Hkv, G, Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhgqk,bhkd->bhgqd", p, v.to(acc))
    return o.reshape(B, Hq, Tq, D).to(q.dtype)
