"""Reference attention in plain PyTorch: the specification the fast backends are tested against.

``attention_mask`` turns the high-level description (causal, sliding window, packed documents,
key padding) into one boolean "may attend" matrix; ``attention_ref`` is softmax(q k^T * scale) v
computed directly, in the input dtype (float64 in tests), with GQA done by grouping query heads
over their shared K/V head instead of repeating K/V.

Alignment: when there are more keys than queries (decoding with a KV cache) the queries are the
*last* Tq positions of the Tk keys, so causal and window masks align bottom-right.

``attention_tiled_ref`` is FlashAttention's algorithm (online softmax over key blocks) in plain
PyTorch, with flash-attn's ``window_size=(left, right)`` masks (``window_mask``): the
specification of the Triton kernels in ``flash_attention.py``.
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
    query_pos: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean mask, True = may attend, shaped (B or 1, 1, Tq, Tk); None when nothing is masked.

    window: a query sees itself and the ``window - 1`` keys before it (HF Mistral semantics).
    doc_ids: (B, T) with Tq == Tk; tokens attend only within their own document.
    key_valid: (B, Tk) False for padding keys. A query always sees its own key, so rows of
    padding queries stay finite (their outputs are ignored; a fully masked row would give NaN).
    query_pos: (Tq,) the key index each query sits at. Default: the last Tq keys (bottom-right
        alignment); a static-shape KV cache, whose buffer runs past the queries, passes the slots.
    """
    if not causal and window is None and doc_ids is None and key_valid is None:
        return None
    if query_pos is None:
        qi = torch.arange(Tk - Tq, Tk, device=device).view(Tq, 1)  # absolute index of each query
    else:
        qi = query_pos.to(device).view(Tq, 1)
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
    if mask is not None:  # a query that sees no key (more queries than keys, causal) outputs 0, as the kernels
        p = p.masked_fill(~mask.unsqueeze(2).any(-1, keepdim=True), 0.0)
    o = torch.einsum("bhgqk,bhkd->bhgqd", p, v.to(acc))
    return o.reshape(B, Hq, Tq, D).to(q.dtype)


def window_mask(
    Tq: int, Tk: int, *, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """flash-attn's mask (Tq, Tk), True = may attend: query i sees key j iff
    ``i + Tk - Tq - left <= j <= i + Tk - Tq + right`` (-1 = unbounded; ``causal`` sets right = 0).

    ``attention_mask(window=W)`` is ``window_mask(causal=True, window_size=(W - 1, 0))``.
    """
    left, right = window_size
    right = 0 if causal else right
    qi = torch.arange(Tk - Tq, Tk, device=device).view(Tq, 1)  # each query's position on the key axis
    kj = torch.arange(Tk, device=device).view(1, Tk)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= kj <= qi + right
    if left >= 0:
        mask &= kj >= qi - left
    return mask


def attention_tiled_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention one key block at a time with an online softmax (FlashAttention, Dao et al. 2022;
    FlashAttention-2, Dao 2023). q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (out (B, Hq, Tq, D),
    lse (B, Hq, Tq)), lse = logsumexp over the visible keys of the scaled scores (natural log).

    softmax(s) v = exp(s - lse) v never needs all of a row's scores at once. Each query row keeps a
    running maximum ``m`` of the scores seen so far, the running sum ``l`` of exp(s - m) and the
    accumulator ``acc`` = sum exp(s - m) v. When a new block raises the maximum to m', what was
    accumulated is rescaled by exp(m - m'); at the end out = acc / l and lse = m + log(l). A row
    that sees no key (possible with Tq > Tk or a window) returns out = 0 and lse = -inf.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    visible = window_mask(Tq, Tk, causal=causal, window_size=window_size, device=q.device)  # (Tq, Tk)
    qg = q.reshape(B, Hkv, G, Tq, D).to(acc_dtype)  # query head h reads K/V head h // G
    m = torch.full((B, Hkv, G, Tq), float("-inf"), dtype=acc_dtype, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros_like(qg)  # (B, Hkv, G, Tq, D)
    for n0 in range(0, Tk, block_size):
        kb = k[:, :, n0 : n0 + block_size].to(acc_dtype)  # (B, Hkv, N, D)
        vb = v[:, :, n0 : n0 + block_size].to(acc_dtype)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kb) * scale  # (B, Hkv, G, Tq, N)
        s = s.masked_fill(~visible[:, n0 : n0 + block_size], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_ref = m_new.masked_fill(m_new == float("-inf"), 0.0)  # nothing visible yet: avoid -inf - -inf
        alpha = torch.exp(m - m_ref)  # rescales the old sums to the new maximum
        p = torch.exp(s - m_ref[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhgqk,bhkd->bhgqd", p, vb)
        m = m_new
    empty = l == 0
    out = acc / l.masked_fill(empty, 1.0)[..., None]
    lse = (m + torch.log(l)).masked_fill(empty, float("-inf"))
    return out.reshape(B, Hq, Tq, D).to(q.dtype), lse.reshape(B, Hq, Tq)
