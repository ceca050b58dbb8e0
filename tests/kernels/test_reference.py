"""The tiled online-softmax reference (FlashAttention's algorithm in PyTorch) equals plain softmax
attention in float64, including its logsumexp, windows, GQA and rows that see no key."""

import pytest
import torch

from lmstack.kernels import attention_mask, attention_ref, attention_tiled_ref, window_mask

F64 = torch.float64


def _plain(q, k, v, mask, scale=None):
    """attention_ref, and torch.logsumexp of the scaled scores; rows without keys give out 0."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    empty = ~mask.any(-1)  # (Tq,)
    out = attention_ref(q, k, v, mask=(mask | empty[:, None])[None, None], scale=scale) * ~empty[:, None]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(Hq // Hkv, 1)) * (scale or D**-0.5)
    lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    return out, lse


@pytest.mark.parametrize(
    "Tq,Tk,Hq,Hkv,causal,window_size",
    [
        (37, 37, 4, 2, True, (-1, -1)),
        (5, 41, 4, 1, True, (-1, -1)),  # decode-like: bottom-right causal
        (41, 5, 2, 2, True, (-1, -1)),  # more queries than keys: the first 36 rows see nothing
        (33, 33, 8, 2, False, (-1, -1)),
        (30, 30, 2, 1, False, (4, 2)),
        (26, 20, 2, 2, False, (1, 1)),  # window rows that see nothing
        (29, 40, 4, 4, True, (6, -1)),
    ],
)
@pytest.mark.parametrize("block_size", [16, 7])
def test_tiled_matches_plain_attention(seed, Tq, Tk, Hq, Hkv, causal, window_size, block_size):
    q = torch.randn(2, Hq, Tq, 16, dtype=F64)
    k, v = torch.randn(2, 2, Hkv, Tk, 16, dtype=F64)
    mask = window_mask(Tq, Tk, causal=causal, window_size=window_size)
    out, lse = attention_tiled_ref(q, k, v, causal=causal, window_size=window_size, block_size=block_size)
    ref_out, ref_lse = _plain(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)  # -inf exactly where rows are empty
    assert torch.isfinite(out).all()


def test_window_mask_matches_attention_mask():
    # Our window W (itself + W - 1 before, causal) is flash-attn's window_size=(W - 1, 0).
    for Tq, Tk in ((9, 9), (3, 9), (1, 9)):
        for w in (1, 3, 5):
            a = attention_mask(Tq, Tk, causal=True, window=w)[0, 0]
            assert torch.equal(a, window_mask(Tq, Tk, causal=True, window_size=(w - 1, 0)))
            assert torch.equal(a, window_mask(Tq, Tk, causal=True, window_size=(w - 1, -1)))
        assert torch.equal(attention_mask(Tq, Tk, causal=True)[0, 0], window_mask(Tq, Tk, causal=True))


def test_tiled_scale_and_half_precision(seed):
    q, k, v = torch.randn(3, 1, 2, 20, 32, dtype=F64)
    mask = window_mask(20, 20, causal=True)
    ref, _ = _plain(q, k, v, mask, scale=0.3)
    out, _ = attention_tiled_ref(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out16, lse16 = attention_tiled_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, scale=0.3)
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    torch.testing.assert_close(out16.double(), ref, rtol=3e-2, atol=3e-2)
