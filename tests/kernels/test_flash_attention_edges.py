"""Edge cases of the Triton FlashAttention kernels against an independent float64 reference.

The reference builds its boolean mask straight from the documented rule (query i of Lq sees key j
of Lk iff i + Lk - Lq - left <= j <= i + Lk - Lq + right; causal sets right = 0) and loops over
heads, so it shares no code with lmstack.kernels.reference. Rows that see no key output 0, have
logsumexp -inf and pass no gradient. Shapes are small: off a GPU the kernels run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).
"""


import pytest
import torch

triton = pytest.importorskip("triton")

from . import require_kernels  # noqa: E402

require_kernels()

from lmstack.kernels import flash_attention as fa  # noqa: E402
from lmstack.kernels.flash_attention import flash_attn_func, flash_attn_varlen_func  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def visible(Lq, Lk, causal, left, right):
    right = 0 if causal else right
    i = torch.arange(Lq, device=DEVICE).view(-1, 1) + (Lk - Lq)
    j = torch.arange(Lk, device=DEVICE).view(1, -1)
    m = torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE)
    if left >= 0:
        m &= j >= i - left
    if right >= 0:
        m &= j <= i + right
    return m


def naive(q, k, v, causal=False, window_size=(-1, -1), scale=None):
    """One sequence: q (Lq, Hq, D), k/v (Lk, Hkv, D) float64 -> out (Lq, Hq, D), lse (Hq, Lq)."""
    Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[:2]
    scale = D**-0.5 if scale is None else scale
    m = visible(Lq, Lk, causal, *window_size)
    empty = ~m.any(-1)
    outs, lses = [], []
    for h in range(Hq):
        kh = h // (Hq // Hkv)
        s = (q[:, h] @ k[:, kh].T * scale).masked_fill(~m, float("-inf"))
        lses.append(torch.logsumexp(s, -1).detach() if Lk else torch.full((Lq,), float("-inf"), dtype=F64,
                                                                          device=DEVICE))
        if Lk:
            p = torch.softmax(s.masked_fill(empty[:, None], 0.0), -1) * ~empty[:, None]
            outs.append(p @ v[:, kh])
        else:
            outs.append(q[:, h] * 0)
    return torch.stack(outs, 1), torch.stack(lses)


def rel_err(a, b):
    # Gradients that are exactly 0 in exact arithmetic (one visible key) carry fp32 noise: floor the scale.
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(5e-2)).item()


def assert_close(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = rel_err(ours, ref)
    assert err < 1e-3, f"{what}: relative error {err:.2e}"


def assert_lse(ours, ref):
    seen = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), seen), "lse: finite pattern differs"
    assert (ours[~seen] == float("-inf")).all(), "lse: rows without keys must be -inf"
    if seen.any():
        assert_close(ours[seen], ref[seen], "lse")


def run_dense(B, Sq, Sk, Hq, Hkv, D, causal, window_size, scale=None, layout="contig"):
    q64 = torch.randn(B, Sq, Hq, D, dtype=F64, device=DEVICE)
    k64 = torch.randn(B, Sk, Hkv, D, dtype=F64, device=DEVICE)
    v64 = torch.randn(B, Sk, Hkv, D, dtype=F64, device=DEVICE)
    if layout == "qkv":  # q, k, v sliced out of one packed (B, S, Hq + 2 Hkv, D) projection
        leaf = torch.cat([q64, k64, v64], 2).float().requires_grad_()
        q, k, v = leaf[:, :, :Hq], leaf[:, :, Hq:Hq + Hkv], leaf[:, :, Hq + Hkv:]
        grads = lambda: (leaf.grad[:, :, :Hq], leaf.grad[:, :, Hq:Hq + Hkv], leaf.grad[:, :, Hq + Hkv:])  # noqa: E731
    elif layout == "dstride":  # head-dim stride 2: copied to a contiguous D axis on the way in
        leaves = [torch.stack([t, -t], -1).float().requires_grad_() for t in (q64, k64, v64)]
        q, k, v = (t[..., 0] for t in leaves)
        grads = lambda: tuple(t.grad[..., 0] for t in leaves)  # noqa: E731
    else:
        q, k, v = leaves = [t.float().requires_grad_() for t in (q64, k64, v64)]
        grads = lambda: tuple(t.grad for t in leaves)  # noqa: E731
    out, lse = flash_attn_func(q, k, v, causal=causal, window_size=window_size, softmax_scale=scale,
                               return_lse=True)
    r64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    refs = [naive(r64[0][b], r64[1][b], r64[2][b], causal, window_size, scale) for b in range(B)]
    ref, ref_lse = torch.stack([r[0] for r in refs]), torch.stack([r[1] for r in refs])
    assert_close(out, ref, "out")
    assert_lse(lse, ref_lse)
    do = torch.randn_like(ref)
    out.backward(do.transpose(1, 2).contiguous().float().transpose(1, 2))  # a strided cotangent
    ref.backward(do)
    for name, a, r in zip(("dq", "dk", "dv"), grads(), r64):
        assert_close(a, r.grad, name)


# (B, Sq, Sk, Hq, Hkv, D, causal, window_size, scale, layout)
DENSE = {
    "q>k-two-sided-d24": (2, 37, 21, 4, 2, 24, False, (3, 50), 0.7, "contig"),
    "q=k-window-gqa4-d40-qkv": (1, 29, 29, 4, 1, 40, True, (6, -1), None, "qkv"),
    "q<k-left0-right0-dstride": (1, 13, 35, 2, 2, 16, False, (0, 0), 1.7, "dstride"),
    "q>k-causal-wide-left-mqa8-d8": (1, 40, 18, 8, 1, 8, True, (100, -1), None, "contig"),
}


@pytest.mark.parametrize("case", DENSE)
def test_dense_edges(seed, case):
    run_dense(*DENSE[case])


@pytest.mark.skipif(DEVICE != "cpu", reason="block sizes are fixed only in the interpreter")
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_unequal_blocks(seed, monkeypatch, blocks):
    """GPU configs use BLOCK_M != BLOCK_N (128x64, 32x128, ...); the interpreter's 16x16 never
    does, so the masked/unmasked segment split is checked here with unequal blocks."""
    monkeypatch.setitem(fa.INTERPRET_BLOCKS, "BLOCK_M", blocks[0])
    monkeypatch.setitem(fa.INTERPRET_BLOCKS, "BLOCK_N", blocks[1])
    run_dense(1, 45, 38, 2, 1, 16, False, (9, 4), None, "contig")
    run_dense(1, 19, 48, 2, 2, 16, True, (-1, -1), None, "contig")


def varlen_case(lens_q, lens_k, Hq, Hkv, D, causal, window_size, extra, packed):
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q64 = torch.randn(sum(lens_q), Hq, D, dtype=F64, device=DEVICE)
    k64 = torch.randn(sum(lens_k), Hkv, D, dtype=F64, device=DEVICE)
    v64 = torch.randn(sum(lens_k), Hkv, D, dtype=F64, device=DEVICE)
    if packed:
        leaf = torch.cat([q64, k64, v64], 1).float().requires_grad_()
        q, k, v = leaf[:, :Hq], leaf[:, Hq:Hq + Hkv], leaf[:, Hq + Hkv:]
    else:
        q, k, v = leaves = [t.float().requires_grad_() for t in (q64, k64, v64)]
    out, lse = flash_attn_varlen_func(q, k, v, cu_q.to(DEVICE), cu_k.to(DEVICE), max(lens_q) + extra,
                                      max(lens_k) + extra, causal=causal, window_size=window_size,
                                      return_lse=True)
    r64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    parts = [naive(r64[0][a:b], r64[1][c:d], r64[2][c:d], causal, window_size)
             for a, b, c, d in zip(cu_q.tolist(), cu_q[1:].tolist(), cu_k.tolist(), cu_k[1:].tolist())]
    ref, ref_lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], 1)
    assert_close(out, ref, "out")
    assert_lse(lse, ref_lse)
    do = torch.randn_like(ref)
    out.backward(do.float())
    ref.backward(do)
    ours = (leaf.grad[:, :Hq], leaf.grad[:, Hq:Hq + Hkv], leaf.grad[:, Hq + Hkv:]) if packed else \
        tuple(t.grad for t in leaves)
    for name, a, r in zip(("dq", "dk", "dv"), ours, r64):
        assert_close(a, r.grad if r.grad is not None else torch.zeros_like(r), name)


# (lens_q, lens_k, Hq, Hkv, D, causal, window_size, extra max_seqlen, packed qkv)
VARLEN = {
    # sequences of 0 queries (with keys), 0 keys (with queries), both 0, q > k and q < k
    "zero-lengths-cross": ([0, 5, 0, 19, 1], [3, 0, 0, 7, 33], 4, 2, 24, True, (-1, -1), 0, False),
    "window-gqa-max-seqlen-larger": ([17, 1, 0, 34], [17, 1, 0, 34], 4, 1, 40, False, (2, 5), 21, True),
}


@pytest.mark.parametrize("case", VARLEN)
def test_varlen_edges(seed, case):
    varlen_case(*VARLEN[case])


def test_varlen_strided_cu_seqlens(seed):
    """cu_seqlens that are a strided view ([0, 3, 10] read every other element): the kernels index
    them as contiguous, so the call copies them (it read [0, 7, 3] before: rows attended across
    the document boundary and rows 7-9 were never written)."""
    Hq, D = 2, 16
    cu = torch.tensor([0, 7, 3, 7, 10, 7], dtype=torch.int32, device=DEVICE)[::2]  # values [0, 3, 10]
    assert cu.tolist() == [0, 3, 10] and not cu.is_contiguous()
    q64, k64, v64 = (torch.randn(10, Hq, D, dtype=F64, device=DEVICE) for _ in range(3))
    q, k, v = (t.float() for t in (q64, k64, v64))
    out = flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    ref = torch.cat([naive(q64[a:b], k64[a:b], v64[a:b], True)[0] for a, b in ((0, 3), (3, 10))])
    assert_close(out, ref, "out")
