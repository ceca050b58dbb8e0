"""FlashAttention forward and backward in Triton (Dao et al. 2022; FlashAttention-2, Dao 2023).

Attention is computed tile by tile without ever materialising the (Tq, Tk) score matrix: each
program owns a block of queries and streams the key/value blocks through on-chip memory, keeping a
running row maximum ``m``, a running softmax denominator ``l`` and an unnormalised output
accumulator that is rescaled whenever ``m`` grows (``reference.attention_tiled_ref`` is the same
algorithm in plain PyTorch). The forward saves only the output and the per-row logsumexp; the
backward recomputes the probabilities from them (FlashAttention-2):

- ``delta = rowsum(dO * O)`` (one small kernel), since dS = P * (dP - delta);
- dK/dV: one program per key block loops over the query blocks that can see it, for all the
  query heads sharing its K/V head (GQA/MQA) in the same loop, so dK/dV are written once, without
  atomics;
- dQ: one program per query block loops over the key blocks it sees, like the forward.

The call shapes follow the flash-attn package so callers can swap implementations:
``flash_attn_func`` on (batch, seqlen, heads, head_dim) tensors and ``flash_attn_varlen_func`` on
packed (total_tokens, heads, head_dim) tensors with ``cu_seqlens`` boundaries. Masks (flash-attn
>= 2.1 semantics): query i of a sequence with Lq queries and Lk keys sees key j iff
``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` for ``window_size=(left, right)`` (-1 =
unbounded), and ``causal`` sets ``right = 0`` (bottom-right aligned). Rows that see no key output 0
and have logsumexp -inf. K/V heads are indexed (``kv_head = q_head // (Hq // Hkv)``), never repeated.

Each tile is either fully visible (no mask is computed) or on a boundary (masked); the key range
of a query block is split into masked / unmasked / masked segments up front. Head dims that are
not a power of two (96) are padded to the next one inside the block, with masked loads and stores.

With ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on the CPU through
Triton's interpreter with small fixed blocks (bf16 inputs in fp32, as the interpreter's bf16 products
are wrong); on a GPU the block sizes are autotuned per head dim.
"""

from __future__ import annotations

import math
import os

import torch

from . import version_tuple

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError("lmstack.kernels.flash_attention needs triton: pip install triton") from e

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "supported_head_dim", "INTERPRET", "MIN_TRITON"]

# The oldest Triton the kernels are tested with (3.2 and 3.6 in the interpreter, 3.6 and 3.9 compiled
# for sm_90a, 3.9 in CI). Under 3.0 and 3.1 (torch 2.4's and 2.5's) the interpreter stops at the
# first kernel ("arange's arguments must be of type tl.constexpr"); there lmstack uses SDPA.
MIN_TRITON = (3, 2)


def check_triton_version(version: str, need: tuple[int, int] = MIN_TRITON, what: str = "lmstack's Triton kernels",
                         instead: str = ", or use the 'sdpa' attention backend") -> None:
    """Raise ImportError (so ``lmstack.kernels`` falls back to SDPA) on a Triton ``version`` older than ``need``."""
    if version_tuple(version) < need:
        least = ".".join(map(str, need))
        raise ImportError(f"{what} need triton >= {least}, found {version}: pip install -U 'triton>={least}'{instead}")


check_triton_version(triton.__version__)


def check_compile_ahead() -> None:
    """ImportError unless this Triton can compile the kernels ahead without a GPU, as
    bench/kernel_resources.py and bench/triton_cache.py do through the JIT's warm-up path with a
    compile-only driver: those internals are Triton 3.6's (the GPU machine's; tested with 3.6 and 3.9)."""
    check_triton_version(triton.__version__, (3, 6), "bench/kernel_resources.py and bench/triton_cache.py", "")

# Triton reads TRITON_INTERPRET when it decorates a kernel, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
LOG2E = 1.4426950408889634  # scores are kept in log2 units so the kernels use exp2
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supported_head_dim(d: int) -> bool:
    """Head dims the kernels accept: multiples of 8 up to 256 (32, 64, 96, 128, 256, ...)."""
    return 8 <= d <= 256 and d % 8 == 0


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """First token and length of sequence b in the q and k token axes."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        len_k = tl.load(CU_K + b + 1) - k_start
    else:  # every sequence has the same lengths (as int32 tensors, like the loaded values)
        q_start = b * 0
        len_q = seqlen_q + b * 0
        k_start = b * 0
        len_k = seqlen_k + b * 0
    return q_start, len_q, k_start, len_k


@triton.jit
def _visible(qi, kj, len_q, len_k, diff, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """May query qi see key kj (broadcast shapes)? Both in range and inside the window band."""
    ok = (qi < len_q) & (kj < len_k)
    if HAS_RIGHT:
        ok = ok & (kj <= qi + diff + right)
    if HAS_LEFT:
        ok = ok & (kj >= qi + diff - left)
    return ok


@triton.jit
def _segments(t0, t_last, n_other, c_lo, c_hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
              BLOCK: tl.constexpr):
    """The rows t0..t_last see other-axis indices x with t + c_lo <= x <= t + c_hi, x < n_other.
    Returns lo <= a <= b <= hi, block-aligned from lo: blocks in [a, b) are visible to every row and
    need no mask; blocks in [lo, a) and [b, hi) do. When no block is fully visible the whole range
    goes to one masked segment: [lo, a) if there is a lower bound, else [b, hi). So [lo, a) is
    empty without HAS_LO, and [b, hi) is empty without HAS_HI when n_other is a multiple of BLOCK:
    the kernels compile those loops away (``EVEN``)."""
    lo = t0 * 0  # scalars as int32 tensors, like the runtime values that replace them below
    hi = n_other + t0 * 0
    a = lo
    b = n_other // BLOCK * BLOCK
    if HAS_LO:
        lo = tl.maximum(t0 + c_lo, 0) // BLOCK * BLOCK
        a = tl.cdiv(tl.maximum(t_last + c_lo, 0), BLOCK) * BLOCK
    if HAS_HI:
        hi = tl.minimum(t_last + c_hi + 1, n_other)
        b = tl.maximum(tl.minimum(t0 + c_hi + 1, n_other), 0) // BLOCK * BLOCK
    if HAS_LO:  # no unmasked segment: [lo, hi) is all masked
        no_full = a >= b
        a = tl.where(no_full, hi, a)
        b = tl.where(no_full, hi, b)
    # else a = lo = 0 <= b, and with no unmasked block b = 0 already: [b, hi) is the whole range
    return lo, a, b, hi


@triton.jit
def _load_rows(ptr, rows, stride, n_rows, offs_d, D: tl.constexpr, ROW_MASK: tl.constexpr,
               PAD_D: tl.constexpr):
    """(len(rows), D_PAD) tile; masked rows and padded head-dim columns read as 0."""
    ptrs = ptr + rows[:, None] * stride + offs_d[None, :]
    if ROW_MASK:
        if PAD_D:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            x = tl.load(ptrs)  # interior tile: no mask, so loads vectorise fully
    return x


@triton.jit
def _store_rows(ptr, x, rows, stride, n_rows, offs_d, D: tl.constexpr):
    ptrs = ptr + rows[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D))


@triton.jit
def _load_lse2(LSE, rows, len_q, MASK: tl.constexpr):
    """Saved logsumexp in log2 units; empty rows (-inf) become +inf so that P = exp2(S - lse) = 0."""
    if MASK:
        lse = tl.load(LSE + rows, mask=rows < len_q, other=float("-inf"))
    else:
        lse = tl.load(LSE + rows)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, sks, svs, rows, offs_n, offs_d, start, end, len_q, len_k,
               diff, left, right, qk_scale, D: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n  # (BN,)
        k = _load_rows(K, cols, sks, len_k, offs_d, D, MASKED, PAD_D)  # (BN, D_PAD)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN), log2 units
        if MASKED:
            vis = _visible(rows[:, None], cols[None, :], len_q, len_k, diff, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BM,)
        if MASKED:  # a row with nothing visible yet keeps m = -inf; subtract 0 instead (no NaN)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        alpha = tl.math.exp2(m_i - m_ref)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s - m_ref[:, None])  # (BM, BN)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, cols, svs, len_k, offs_d, D, MASKED, PAD_D)  # (BN, D_PAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh,
    seqlen_q, seqlen_k, group, qk_scale, left, right,
    D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,
):
    # Grid (query blocks, Hq, batch); the last query blocks (the longest when causal) go first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = _bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    kvh = h // group
    b64 = b.to(tl.int64)
    Q += b64 * sqb + q_start.to(tl.int64) * sqs + h.to(tl.int64) * sqh
    O += b64 * sob + q_start.to(tl.int64) * sos + h.to(tl.int64) * soh
    K += b64 * skb + k_start.to(tl.int64) * sks + kvh.to(tl.int64) * skh
    V += b64 * svb + k_start.to(tl.int64) * svs + kvh.to(tl.int64) * svh
    LSE += b64 * slb + h.to(tl.int64) * slh + q_start

    PAD_D: tl.constexpr = D != D_PAD
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(Q, rows, sqs, len_q, offs_d, D, True, PAD_D)  # (BM, D_PAD)

    diff = len_k - len_q  # bottom-right alignment
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, len_q) - 1
    lo, a, bb, hi = _segments(m0, m_last, len_k, diff - left, diff + right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    if HAS_LEFT:  # the masked blocks below the band
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, sks, svs, rows, offs_n, offs_d, lo, a, len_q, len_k,
                                   diff, left, right, qk_scale, D, PAD_D, True, HAS_LEFT, HAS_RIGHT, BLOCK_N,
                                   PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, sks, svs, rows, offs_n, offs_d, a, bb, len_q, len_k,
                               diff, left, right, qk_scale, D, PAD_D, False, HAS_LEFT, HAS_RIGHT, BLOCK_N,
                               PRECISION)
    if HAS_RIGHT or not EVEN:  # the masked blocks above the band or past the end
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, sks, svs, rows, offs_n, offs_d, bb, hi, len_q, len_k,
                                   diff, left, right, qk_scale, D, PAD_D, True, HAS_LEFT, HAS_RIGHT, BLOCK_N,
                                   PRECISION)

    empty = l_i == 0.0  # no visible key: output 0, logsumexp -inf
    l_safe = tl.where(empty, 1.0, l_i)
    _store_rows(O, acc / l_safe[:, None], rows, sos, len_q, offs_d, D)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # natural log
    tl.store(LSE + rows, lse, mask=rows < len_q)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, CU_Q, sob, sos, soh, sdb, sds, sdh, slb, slh, seqlen_q,
                      D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[i] = sum_d dO[i, d] * O[i, d], in fp32, same layout as the logsumexp."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, _, _ = _bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_q, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
    O += b64 * sob + q_start.to(tl.int64) * sos + h.to(tl.int64) * soh
    DO += b64 * sdb + q_start.to(tl.int64) * sds + h.to(tl.int64) * sdh
    DELTA += b64 * slb + h.to(tl.int64) * slh + q_start
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o = _load_rows(O, rows, sos, len_q, offs_d, D, True, D != D_PAD).to(tl.float32)
    do = _load_rows(DO, rows, sds, len_q, offs_d, D, True, D != D_PAD).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < len_q)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sqs, sqh, sds, sdh, slh, h0, group, cols, offs_m, offs_d,
                  start, end, len_q, len_k, diff, left, right, qk_scale, D: tl.constexpr, PAD_D: tl.constexpr,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    # Query blocks start..end of every query head h0 .. h0 + group - 1 (those sharing this K/V head)
    # in one loop, so the pipeline runs on across heads. Works on transposed tiles (BN keys x BM
    # queries) so dK/dV accumulate with plain dots.
    n_blocks = tl.cdiv(end - start, BLOCK_M)
    for it in range(0, n_blocks * group):
        g = it // n_blocks
        h = (h0 + g).to(tl.int64)
        rows = start + (it - g * n_blocks) * BLOCK_M + offs_m  # (BM,)
        q = _load_rows(Q + h * sqh, rows, sqs, len_q, offs_d, D, MASKED, PAD_D)  # (BM, D_PAD)
        do = _load_rows(DO + h * sdh, rows, sds, len_q, offs_d, D, MASKED, PAD_D)  # (BM, D_PAD)
        lse2 = _load_lse2(LSE + h * slh, rows, len_q, MASKED)  # (BM,)
        if MASKED:
            delta = tl.load(DELTA + h * slh + rows, mask=rows < len_q, other=0.0)
        else:
            delta = tl.load(DELTA + h * slh + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BN, BM) log2 units
        if MASKED:
            vis = _visible(rows[None, :], cols[:, None], len_q, len_k, diff, left, right, HAS_LEFT, HAS_RIGHT)
            s_t = tl.where(vis, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])  # (BN, BM) = P^T
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # (BN, D_PAD)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM) = dP^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T (without the softmax scale)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
    sdkb, sdks, sdkh, sdvb, sdvs, sdvh, slb, slh,
    seqlen_q, seqlen_k, group, sm_scale, qk_scale, left, right,
    D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,
):
    # Grid (key blocks, Hkv, batch): one program owns a K/V block and every query head reading it.
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = _bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    b64 = b.to(tl.int64)
    K += b64 * skb + k_start.to(tl.int64) * sks + kvh.to(tl.int64) * skh
    V += b64 * svb + k_start.to(tl.int64) * svs + kvh.to(tl.int64) * svh
    DK += b64 * sdkb + k_start.to(tl.int64) * sdks + kvh.to(tl.int64) * sdkh
    DV += b64 * sdvb + k_start.to(tl.int64) * sdvs + kvh.to(tl.int64) * sdvh

    PAD_D: tl.constexpr = D != D_PAD
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    k = _load_rows(K, cols, sks, len_k, offs_d, D, True, PAD_D)  # (BN, D_PAD)
    v = _load_rows(V, cols, svs, len_k, offs_d, D, True, PAD_D)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

    diff = len_k - len_q
    # Key j is seen by queries i with j - diff - right <= i <= j - diff + left.
    n_last = tl.minimum(n0 + BLOCK_N, len_k) - 1
    lo, a, bb, hi = _segments(n0, n_last, len_q, -diff - right, -diff + left, HAS_RIGHT, HAS_LEFT, BLOCK_M)
    Qb = Q + b64 * sqb + q_start.to(tl.int64) * sqs  # heads are added in the loop
    DOb = DO + b64 * sdb + q_start.to(tl.int64) * sds
    LSEb = LSE + b64 * slb + q_start
    DELTAb = DELTA + b64 * slb + q_start
    h0 = kvh * group
    if HAS_RIGHT:  # the masked blocks below the band
        dk, dv = _bwd_kv_inner(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, sqs, sqh, sds, sdh, slh, h0, group, cols,
                               offs_m, offs_d, lo, a, len_q, len_k, diff, left, right, qk_scale, D, PAD_D, True,
                               HAS_LEFT, HAS_RIGHT, BLOCK_M, PRECISION)
    dk, dv = _bwd_kv_inner(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, sqs, sqh, sds, sdh, slh, h0, group, cols,
                           offs_m, offs_d, a, bb, len_q, len_k, diff, left, right, qk_scale, D, PAD_D, False,
                           HAS_LEFT, HAS_RIGHT, BLOCK_M, PRECISION)
    if HAS_LEFT or not EVEN:  # the masked blocks above the band or past the end
        dk, dv = _bwd_kv_inner(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, sqs, sqh, sds, sdh, slh, h0, group, cols,
                               offs_m, offs_d, bb, hi, len_q, len_k, diff, left, right, qk_scale, D, PAD_D, True,
                               HAS_LEFT, HAS_RIGHT, BLOCK_M, PRECISION)
    _store_rows(DK, dk * sm_scale, cols, sdks, len_k, offs_d, D)
    _store_rows(DV, dv, cols, sdvs, len_k, offs_d, D)


@triton.jit
def _bwd_q_inner(dq, q, do, lse2, delta, K, V, sks, svs, rows, offs_n, offs_d, start, end, len_q, len_k,
                 diff, left, right, qk_scale, D: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(K, cols, sks, len_k, offs_d, D, MASKED, PAD_D)  # (BN, D_PAD)
        v = _load_rows(V, cols, svs, len_k, offs_d, D, MASKED, PAD_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN) log2 units
        if MASKED:
            vis = _visible(rows[:, None], cols[None, :], len_q, len_k, diff, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(vis, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])  # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # (BM, D_PAD)
    return dq


@triton.jit
def _bwd_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sdqb, sdqs, sdqh, slb, slh,
    seqlen_q, seqlen_k, group, sm_scale, qk_scale, left, right,
    D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,
):
    # Grid (query blocks, Hq, batch), like the forward.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = _bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    kvh = h // group
    b64 = b.to(tl.int64)
    Q += b64 * sqb + q_start.to(tl.int64) * sqs + h.to(tl.int64) * sqh
    DO += b64 * sdb + q_start.to(tl.int64) * sds + h.to(tl.int64) * sdh
    DQ += b64 * sdqb + q_start.to(tl.int64) * sdqs + h.to(tl.int64) * sdqh
    K += b64 * skb + k_start.to(tl.int64) * sks + kvh.to(tl.int64) * skh
    V += b64 * svb + k_start.to(tl.int64) * svs + kvh.to(tl.int64) * svh
    LSE += b64 * slb + h.to(tl.int64) * slh + q_start
    DELTA += b64 * slb + h.to(tl.int64) * slh + q_start

    PAD_D: tl.constexpr = D != D_PAD
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(Q, rows, sqs, len_q, offs_d, D, True, PAD_D)  # (BM, D_PAD)
    do = _load_rows(DO, rows, sds, len_q, offs_d, D, True, PAD_D)
    lse2 = _load_lse2(LSE, rows, len_q, True)  # (BM,)
    delta = tl.load(DELTA + rows, mask=rows < len_q, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    diff = len_k - len_q
    m_last = tl.minimum(m0 + BLOCK_M, len_q) - 1
    lo, a, bb, hi = _segments(m0, m_last, len_k, diff - left, diff + right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    if HAS_LEFT:  # the masked blocks below the band
        dq = _bwd_q_inner(dq, q, do, lse2, delta, K, V, sks, svs, rows, offs_n, offs_d, lo, a, len_q, len_k, diff,
                          left, right, qk_scale, D, PAD_D, True, HAS_LEFT, HAS_RIGHT, BLOCK_N, PRECISION)
    dq = _bwd_q_inner(dq, q, do, lse2, delta, K, V, sks, svs, rows, offs_n, offs_d, a, bb, len_q, len_k, diff,
                      left, right, qk_scale, D, PAD_D, False, HAS_LEFT, HAS_RIGHT, BLOCK_N, PRECISION)
    if HAS_RIGHT or not EVEN:  # the masked blocks above the band or past the end
        dq = _bwd_q_inner(dq, q, do, lse2, delta, K, V, sks, svs, rows, offs_n, offs_d, bb, hi, len_q, len_k, diff,
                          left, right, qk_scale, D, PAD_D, True, HAS_LEFT, HAS_RIGHT, BLOCK_N, PRECISION)
    _store_rows(DQ, dq * sm_scale, rows, sdqs, len_q, offs_d, D)


# ---------------------------------------------------------------------------------------------
# Launch configuration: fixed small blocks in the interpreter, autotuned per head dim on a GPU
# ---------------------------------------------------------------------------------------------

INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (kernel, head dims <= 128 or larger) -> configs. The forward and dQ kernels stream keys past a
# query block (BLOCK_M queries, BLOCK_N keys per step); dK/dV streams query blocks past BLOCK_N keys.
# Chosen offline with bench/kernel_resources.py (each config compiled for sm_90a on a CPU, with
# Triton 3.6 and 3.9): on the bench grid's and the training run's shapes all but the fp32 fallback
# use Hopper's wgmma, and at most two dK/dV configs spill registers, by 16-24 bytes a thread (the
# lists before spilled up to 1,032). dK/dV holds two (BLOCK_N, D) fp32
# accumulators, so it needs 8 warps at D = 128: with 4, a 128-key block's accumulators alone take
# 256 registers a thread. At D = 256 every wgmma dK/dV config spills (16x64 the least: 8 bytes
# under Triton 3.6, 176 under 3.9), so that list also holds 32-key blocks, which run on the older
# mma instructions without spilling.
_CONFIGS = {
    ("fwd", False): [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 4), _cfg(128, 32, 8, 3),
                     _cfg(64, 32, 4, 2)],
    ("fwd", True): [_cfg(128, 64, 8, 2), _cfg(64, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2),
                    _cfg(32, 32, 4, 2)],
    ("kv", False): [_cfg(32, 128, 8, 2), _cfg(32, 128, 8, 1), _cfg(64, 128, 8, 1), _cfg(64, 64, 8, 1),
                    _cfg(32, 64, 8, 2), _cfg(32, 32, 4, 2)],
    ("kv", True): [_cfg(16, 64, 8, 2), _cfg(64, 32, 8, 2), _cfg(32, 32, 8, 2), _cfg(16, 32, 8, 1)],
    ("q", False): [_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3),
                   _cfg(32, 32, 4, 2)],
    ("q", True): [_cfg(64, 32, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2), _cfg(64, 32, 8, 3),
                  _cfg(32, 32, 4, 2)],
}  # the last of each list fits fp32 tiles and is the one fp32 inputs use; tuning skips what does not fit


def _configs(name: str, d_pad: int) -> list:
    """Kernel ``name``'s autotune list for a (padded) head dim."""
    return _CONFIGS[(name, d_pad > 128)]


def _gpu_configs(name: str, meta: dict) -> list:
    """The configs a GPU launch of kernel ``name`` compiles: the whole autotune list for fp16/bf16,
    the list's last config alone (untuned) for fp32."""
    configs = _configs(name, meta["D_PAD"])
    return configs[-1:] if meta["PRECISION"] == "ieee" else configs


# EVEN: every sequence's length along the axis a kernel streams is a multiple of that block (fixed
# lengths only), so the masked loop past the end is compiled away when no window bound needs it.
def _even_keys(a):  # forward and dQ stream key blocks
    return not a["VARLEN"] and a["seqlen_k"] % a["BLOCK_N"] == 0


def _even_queries(a):  # dK/dV streams query blocks
    return not a["VARLEN"] and a["seqlen_q"] % a["BLOCK_M"] == 0


_EVEN = {"fwd": _even_keys, "q": _even_keys, "kv": _even_queries}
_KERNELS = {name: triton.heuristics({"EVEN": _EVEN[name]})(kernel)
            for name, kernel in (("fwd", _fwd_kernel), ("kv", _bwd_kv_kernel), ("q", _bwd_q_kernel))}
_TUNED: dict = {}
_TUNE_KEY = ["D_PAD", "VARLEN", "HAS_LEFT", "HAS_RIGHT", "PRECISION"]  # the autotuner adds dtypes


def _launch(name, grid, *args, **meta):
    """Run kernel ``name``: fixed small blocks in the interpreter; on a GPU its autotuned config, or
    for fp32 inputs the list's last config untuned. fp32 is the exact path (tests, references), not
    a fast one: its products skip the tensor cores and most configs spill at fp32, so tuning would
    compile them all for little."""
    kernel = _KERNELS[name]
    if INTERPRET:
        meta.update(INTERPRET_BLOCKS)
    elif meta["PRECISION"] == "ieee":
        (cfg,) = _gpu_configs(name, meta)
        meta.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        key = (name, meta["D_PAD"] > 128)
        if key not in _TUNED:
            _TUNED[key] = triton.autotune(_gpu_configs(name, meta), key=_TUNE_KEY)(kernel)
        kernel = _TUNED[key]
    kernel[grid](*args, **meta)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _strides(t, varlen):
    """(batch, token, head) strides; packed tensors have no batch axis (sequence starts come from
    cu_seqlens)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    """(batch, head) strides of the logsumexp: (B, Hq, Sq), or (Hq, total_q) when packed."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class _FlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right):
        varlen = cu_q is not None
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        Hq, D = q.shape[-2], q.shape[-1]
        Hkv = k.shape[-2]
        if varlen:
            n_seq = cu_q.numel() - 1
            lse = torch.empty(Hq, q.shape[0], device=q.device, dtype=torch.float32)  # (Hq, total_q)
        else:
            n_seq = q.shape[0]
            lse = torch.empty(n_seq, Hq, max_q, device=q.device, dtype=torch.float32)  # (B, Hq, Sq)
        o = torch.empty_like(q)
        right = 0 if causal else right
        meta = _meta(q, D, varlen, left, right)
        grid = lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), Hq, n_seq)  # noqa: E731
        _launch("fwd", grid, q, k, v, o, lse, cu_q, cu_k,
                *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
                *_lse_strides(lse, varlen), max_q, max_k, Hq // Hkv, scale * LOG2E, max(left, 0), max(right, 0), **meta)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, left, right, varlen, n_seq)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: create_graph=True raises, not drops terms
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, left, right, varlen, n_seq = ctx.args
        do = _last_dim_contiguous(do)
        Hq, D = q.shape[-2], q.shape[-1]
        Hkv = k.shape[-2]
        meta = _meta(q, D, varlen, left, right)
        sl = _lse_strides(lse, varlen)
        delta = torch.empty_like(lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sq, sk, sv, sdo = (_strides(t, varlen) for t in (q, k, v, do))
        bm = min(128, 8192 // meta["D_PAD"])  # (bm, D_PAD) tiles of at most 8192 elements
        _bwd_delta_kernel[(triton.cdiv(max_q, bm), Hq, n_seq)](
            o, do, delta, cu_q, *_strides(o, varlen), *sdo, *sl, max_q,
            D=D, D_PAD=meta["D_PAD"], VARLEN=varlen, BLOCK_M=bm)
        common = (max_q, max_k, Hq // Hkv, scale, scale * LOG2E, max(left, 0), max(right, 0))
        grid_kv = lambda m: (triton.cdiv(max_k, m["BLOCK_N"]), Hkv, n_seq)  # noqa: E731
        _launch("kv", grid_kv, q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *sq, *sk, *sv, *sdo,
                *_strides(dk, varlen), *_strides(dv, varlen), *sl, *common, **meta)
        grid_q = lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), Hq, n_seq)  # noqa: E731
        _launch("q", grid_q, q, k, v, do, lse, delta, dq, cu_q, cu_k, *sq, *sk, *sv, *sdo,
                *_strides(dq, varlen), *sl, *common, **meta)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _meta(q, D, varlen, left, right):
    return dict(
        D=D, D_PAD=max(16, triton.next_power_of_2(D)), VARLEN=varlen, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        # fp32 inputs get exact fp32 products (tensor cores would round them to tf32).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _check(q, k, v, rank, window_size, dropout_p):
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        raise ValueError(f"q, k, v must have {rank} dims, got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Hq, Hkv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"q head_dim {D} != k/v head_dim {k.shape[-1]}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not supported_head_dim(D):
        raise ValueError(f"unsupported head_dim {D}: flash attention takes multiples of 8 up to 256")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.is_cuda or INTERPRET) or not (q.device == k.device == v.device):
        raise ValueError(f"flash attention needs q, k, v on one CUDA device (or TRITON_INTERPRET=1 on the CPU), "
                         f"got {q.device}, {k.device}, {v.device}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with -1 for unbounded, got {window_size}")
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: attention dropout is not implemented, use 0.0")


def _flash(q, k, v, *args):
    """``_FlashAttn.apply``. Triton's interpreter (seen in 3.9) multiplies bf16 tiles as raw uint16 bits
    (``tl.dot`` is off by ~1e10), so on the CPU bf16 inputs run the kernels in fp32 and the output is
    rounded to bf16."""
    if INTERPRET and not q.is_cuda and q.dtype == torch.bfloat16:
        out, lse = _FlashAttn.apply(q.float(), k.float(), v.float(), *args)
        return out.bfloat16(), lse
    return _FlashAttn.apply(q, k, v, *args)


def flash_attn_func(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), dropout_p=0.0,
                    return_lse=False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with Hq % Hkv == 0 -> out (B, Sq, Hq, D).

    Options are keyword-only (flash-attn's positional order starts with dropout_p); dropout_p must
    be 0. ``return_lse=True`` also returns the logsumexp of the scaled scores, (B, Hq, Sq) float32
    (-inf for rows that see no key); it carries no gradient.
    """
    _check(q, k, v, 4, window_size, dropout_p)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k/v batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, lse = _flash(q, k, v, None, None, q.shape[1], k.shape[1], bool(causal), scale,
                      int(window_size[0]), int(window_size[1]))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           softmax_scale=None, window_size=(-1, -1), dropout_p=0.0, return_lse=False):
    """Packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence i holds tokens
    cu_seqlens[i]:cu_seqlens[i + 1] (int32, (n + 1,)) -> out (total_q, Hq, D).

    ``max_seqlen_*`` must be at least the longest sequence (it sizes the launch grid). On the CPU
    bad cu_seqlens raise a ValueError; on a GPU they are checked on the device without a sync, and
    a bad one stops the program with a device-side assertion instead of returning garbage.
    ``return_lse=True`` also returns the logsumexp, (Hq, total_q).
    """
    _check(q, k, v, 3, window_size, dropout_p)
    # the kernels read cu_seqlens[b] and [b + 1] as neighbours in memory: a strided view must be copied
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2 or cu.device != q.device:
            raise ValueError(f"{name} must be an int32 (n_seqs + 1,) tensor on {q.device}, got {cu.dtype} "
                             f"{tuple(cu.shape)} on {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k hold different numbers of sequences: "
                         f"{cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1}")
    for name, cu, total, mx in (("q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                ("k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        lens = cu[1:] - cu[:-1]
        if not q.is_cuda:  # cheap to check here
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens < 0).any()) or int(lens.max()) > mx:
                raise ValueError(f"cu_seqlens_{name} must rise from 0 to {total} (the {name} tokens) in steps "
                                 f"of at most max_seqlen_{name}={mx}, got {cu.tolist()}")
        else:  # a sync per call would stall the GPU: the device checks and stops the program if they fail
            torch._assert_async(((cu[0] == 0) & (cu[-1] == total) & (lens >= 0).all() & (lens <= mx).all()),
                                f"flash_attn_varlen_func: cu_seqlens_{name} must rise from 0 to {total} in steps of "
                                f"at most max_seqlen_{name}={mx} (the grid is sized from it)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, lse = _flash(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                      bool(causal), scale, int(window_size[0]), int(window_size[1]))
    return (out, lse) if return_lse else out
