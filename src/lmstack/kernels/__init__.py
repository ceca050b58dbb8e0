"""lmstack.kernels: one attention API over several backends.

``attention(q, k, v, causal=..., seqs=..., window=..., scale=..., key_valid=..., query_pos=..., backend=...)``
takes q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D) and returns (B, Hq, Tq, D). Queries sit at the last
Tq key positions (causal masks align bottom-right) unless ``query_pos`` (Tq,) says where: a
static-shape KV cache attends over its whole buffer, filled only up to the query. Backends:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (the default off-GPU).
  GQA uses SDPA's ``enable_gqa`` (torch >= 2.5) so K/V are never repeated; for single-token
  decoding the query heads sharing a K/V head are folded into the query-length axis instead,
  which needs no copy on any torch version.
- ``"reference"``: plain PyTorch math (``reference.attention_ref``), the specification.
- ``"triton"``: our FlashAttention-2 kernels (``flash_attention.py``), forward and backward;
  packed documents (``seqs``) go through the varlen kernel on the flattened (B*T, H, D) tokens.
  The kernels take no padding mask and align queries bottom-right: with ``key_valid`` or
  ``query_pos`` this backend falls back to SDPA with the boolean mask. On the CPU they run only
  through Triton's interpreter (``TRITON_INTERPRET=1``).

``backend=None`` picks ``"triton"`` when q is a CUDA tensor in fp16/bf16 (or under CUDA autocast to
one of them) with a supported head dim, triton imports, there is no ``key_valid`` and more than
one query (single-token decoding keeps SDPA's folded-GQA path); otherwise ``"sdpa"``. Plain fp32 runs on ``"triton"`` only when asked for. Under
autocast (CUDA or CPU) the triton backend casts q/k/v to autocast's dtype, as autocast does for SDPA.

This package imports nothing else from lmstack.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .reference import attention_mask, attention_ref, attention_tiled_ref, window_mask
from .seqs import Seqs

__all__ = ["attention", "attention_mask", "attention_ref", "attention_tiled_ref", "window_mask", "Seqs", "BACKENDS"]

BACKENDS = ("sdpa", "reference", "triton")


def version_tuple(version: str) -> tuple[int, ...]:
    """A package version's (major, minor): "2.11.0+cu130" -> (2, 11)."""
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2] if x.isdigit())


TORCH_VERSION = version_tuple(torch.__version__)
_SDPA_HAS_GQA = TORCH_VERSION >= (2, 5)


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
    query_pos: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: a query sees itself and the window - 1 keys before it, so the "
                         f"window must be >= 1 (None: no window)")
    if seqs is not None and tuple(seqs.doc_ids.shape) != (B, Tq):
        raise ValueError(f"seqs describe a {tuple(seqs.doc_ids.shape)} batch of documents but the queries are "
                         f"({B}, {Tq}); build them from this batch (Seqs.from_doc_ids / from_eos)")
    backend = backend or _auto_backend(q, key_valid)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {BACKENDS}")
    if backend == "triton":
        if key_valid is None and query_pos is None:
            return _triton(q, k, v, causal=causal, seqs=seqs, window=window, scale=scale)
        backend = "sdpa"  # the kernels take no mask: SDPA with the boolean mask below

    unmasked = window is None and seqs is None and key_valid is None and query_pos is None
    if unmasked and (Tq == 1 or not causal):  # e.g. decoding one token: every cached key is visible
        mask = None
        causal = False
    elif unmasked and Tq == Tk and (scale is None or scale > 0):  # plain causal
        mask = None  # (torch's CPU kernel scales after masking: -inf * 0 = NaN, so scale <= 0 takes a mask)
    else:
        mask = attention_mask(
            Tq, Tk, causal=causal, window=window, doc_ids=None if seqs is None else seqs.doc_ids,
            key_valid=key_valid, query_pos=query_pos, device=q.device,
        )

    if backend == "reference":
        return attention_ref(q, k, v, causal=causal, mask=mask, scale=scale)
    return _sdpa(q, k, v, causal=causal, mask=mask, scale=scale)


def _sdpa(q, k, v, *, causal, mask, scale):
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if G > 1 and Tq == 1 and (mask is None or mask.shape[1] == 1):
        # Fold the G query heads of each K/V head into the query axis: (B, Hkv, G, D); a mask
        # (B|1, 1, 1, Tk) is the same for all of them.
        o = F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v, attn_mask=mask, scale=scale)
        return o.reshape(B, Hq, 1, D)  # a view, except where torch 2.4's kernels return other strides
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


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        from . import flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _autocast_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast on q's device would run attention in (SDPA is on the lower-precision list of
    both CUDA and CPU autocast), else None. Under autocast q/k/v usually arrive in fp32 (RoPE
    multiplies by fp32 tables)."""
    device = q.device.type
    if device not in ("cuda", "cpu"):
        return None
    try:
        enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except (TypeError, AttributeError):  # older torch spellings
        if device == "cuda":
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if enabled else None


def _auto_backend(q: torch.Tensor, key_valid: torch.Tensor | None) -> str:
    dtype = _autocast_dtype(q) or q.dtype
    if (q.is_cuda and dtype in (torch.float16, torch.bfloat16) and key_valid is None and q.shape[2] > 1
            and _triton_importable()):
        from .flash_attention import supported_head_dim

        if supported_head_dim(q.shape[-1]):
            return "triton"
    return "sdpa"


# Eager under torch.compile (a graph break): the kernels launch themselves, autotuner included.
# torch._disable_dynamo is torch.compiler.disable that imports dynamo (seconds) only when called.
@torch._disable_dynamo
def _triton(q, k, v, *, causal, seqs, window, scale):
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) through the flash kernels -> (B, Hq, Tq, D)."""
    from .flash_attention import flash_attn_func, flash_attn_varlen_func

    B, Hq, Tq, D = q.shape
    cast = _autocast_dtype(q)
    if cast is not None:  # what autocast does for SDPA (which leaves float64 alone); the kernels are invisible to it
        q, k, v = (t if t.dtype == torch.float64 else t.to(cast) for t in (q, k, v))
    # Our window W: each query sees itself and the W - 1 keys before it; causal adds right = 0.
    window_size = (-1 if window is None else window - 1, -1)
    if seqs is None:
        # (B, H, T, D) -> (B, T, H, D) views: the kernels take any strides with a contiguous D axis.
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                            softmax_scale=scale, window_size=window_size)  # (B, Tq, Hq, D)
        return o.transpose(1, 2)
    if Tq != k.shape[2]:
        raise ValueError("document masks need as many queries as keys (no KV cache)")

    def flat(t):  # (B, H, T, D) -> (B*T, H, D); a view when the memory is (B, T, H, D)
        return t.transpose(1, 2).reshape(B * Tq, t.shape[1], D)

    cu = seqs.cu_seqlens.to(q.device)
    o = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, seqs.max_seqlen, seqs.max_seqlen,
                               causal=causal, softmax_scale=scale, window_size=window_size)  # (B*T, Hq, D)
    return o.view(B, Tq, Hq, D).transpose(1, 2)
