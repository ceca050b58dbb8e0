"""The attention backends agree with each other and with a naive per-query loop, in float64,
forward and backward, for every masking mode the model uses."""

import math

import pytest
import torch

from lmstack.kernels import BACKENDS, Seqs, attention, attention_mask

F64 = torch.float64


def naive(q, k, v, allowed):
    """Independent spec: one softmax per (batch, head, query), K/V head = q head // group."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Tq):
                keys = [j for j in range(k.shape[2]) if allowed(b, i, j)]
                s = torch.stack([q[b, h, i] @ k[b, kh, j] for j in keys]) / math.sqrt(D)
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[n] * v[b, kh, j] for n, j in enumerate(keys))
    return out


def rand(B, Hq, Hkv, Tq, Tk, D=8, grad=False):
    q = torch.randn(B, Hq, Tq, D, dtype=F64, requires_grad=grad)
    k = torch.randn(B, Hkv, Tk, D, dtype=F64, requires_grad=grad)
    v = torch.randn(B, Hkv, Tk, D, dtype=F64, requires_grad=grad)
    return q, k, v


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 1), (8, 2)])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (3, 10), (1, 9)])
def test_causal_bottom_right_matches_naive(seed, Hq, Hkv, Tq, Tk):
    q, k, v = rand(2, Hq, Hkv, Tq, Tk)
    ref = naive(q, k, v, lambda b, i, j: j <= i + Tk - Tq)
    for backend in ("sdpa", "reference"):
        torch.testing.assert_close(attention(q, k, v, causal=True, backend=backend), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("Tq,Tk", [(9, 9), (2, 9), (1, 9)])
def test_sliding_window(seed, window, Tq, Tk):
    q, k, v = rand(2, 4, 2, Tq, Tk)
    off = Tk - Tq
    ref = naive(q, k, v, lambda b, i, j: j <= i + off and i + off - j < window)
    for backend in ("sdpa", "reference"):
        torch.testing.assert_close(attention(q, k, v, window=window, backend=backend), ref, rtol=1e-10, atol=1e-10)


def test_padding_keys_are_ignored(seed):
    Tq, Tk = 3, 8
    q, k, v = rand(3, 4, 2, Tq, Tk)
    key_valid = torch.ones(3, Tk, dtype=torch.bool)
    key_valid[0, :2] = False  # left padding of two tokens in row 0
    key_valid[2, :5] = False
    ref = naive(q, k, v, lambda b, i, j: j <= i + Tk - Tq and bool(key_valid[b, j]))
    for backend in ("sdpa", "reference"):
        torch.testing.assert_close(attention(q, k, v, key_valid=key_valid, backend=backend), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("window", [None, 3])
def test_query_pos_places_queries_in_a_longer_buffer(seed, Hq, Hkv, Tq, window):
    """``query_pos``: queries at given key slots of a buffer that runs past them (a static-shape KV
    cache); keys after a query, padding keys and keys outside the window are not seen."""
    Tk = 12
    q, k, v = rand(2, Hq, Hkv, Tq, Tk)
    pos = torch.arange(5, 5 + Tq)  # the last query sits at slot 4 + Tq; slots after it are unused
    key_valid = torch.ones(2, Tk, dtype=torch.bool)
    key_valid[1, :3] = False
    def allowed(b, i, j):
        return j <= int(pos[i]) and bool(key_valid[b, j]) and (window is None or pos[i] - j < window)

    ref = naive(q, k, v, allowed)
    for backend in ("sdpa", "reference", "triton"):  # triton: no kernel for this, it falls back to SDPA
        out = attention(q, k, v, window=window, key_valid=key_valid, query_pos=pos, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # Without padding too; and the same as bottom-right attention over the filled slots only.
    out = attention(q, k, v, window=window, query_pos=pos)
    torch.testing.assert_close(out, attention(q, k[:, :, :5 + Tq], v[:, :, :5 + Tq], window=window),
                               rtol=1e-10, atol=1e-10)


def test_padding_queries_stay_finite(seed):
    q, k, v = rand(1, 2, 2, 5, 5)
    key_valid = torch.tensor([[False, False, True, True, True]])
    for backend in ("sdpa", "reference"):
        assert torch.isfinite(attention(q, k, v, key_valid=key_valid, backend=backend)).all()


def test_document_mask(seed):
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    seqs = Seqs.from_doc_ids(doc_ids)
    q, k, v = rand(2, 4, 2, 8, 8)
    ref = naive(q, k, v, lambda b, i, j: j <= i and bool(doc_ids[b, i] == doc_ids[b, j]))
    for backend in ("sdpa", "reference"):
        torch.testing.assert_close(attention(q, k, v, seqs=seqs, backend=backend), ref, rtol=1e-10, atol=1e-10)


def test_seqs_worked_example():
    # The example in lmstack/kernels/seqs.py's docstring.
    s = Seqs.from_doc_ids(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]]))
    assert s.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert s.cu_seqlens.tolist() == [0, 3, 7, 8] and s.max_seqlen == 4
    eos = Seqs.from_eos(torch.tensor([[5, 6, 1, 7, 1, 8], [9, 9, 9, 9, 9, 9]]), eos_id=1)
    assert eos.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert eos.cu_seqlens.tolist() == [0, 3, 5, 6, 12]  # row boundaries are document boundaries
    m = attention_mask(8, 8, doc_ids=s.doc_ids)[0, 0].int()
    assert m[3].tolist() == [0, 0, 0, 1, 0, 0, 0, 0] and m[6].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("mode", ["causal", "window", "docs", "padding", "decode-cache"])
def test_backends_agree_on_gradients(seed, mode):
    B, Hq, Hkv = 2, 8, 2
    Tq, Tk = (3, 9) if mode == "decode-cache" else (9, 9)
    kw = {}
    if mode == "window":
        kw["window"] = 4
    elif mode == "docs":
        kw["seqs"] = Seqs.from_doc_ids(torch.tensor([[0] * 4 + [1] * 5, [0] * 7 + [1] * 2]))
    elif mode == "padding":
        kw["key_valid"] = torch.tensor([[False] * 3 + [True] * 6, [True] * 9])
    grads = []
    for backend in ("sdpa", "reference"):
        torch.manual_seed(seed)
        q, k, v = rand(B, Hq, Hkv, Tq, Tk, grad=True)
        out = attention(q, k, v, backend=backend, **kw)
        w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
        (out * w).sum().backward()
        grads.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_reference_gradient_is_correct(seed):
    # gradcheck: the reference's analytic gradients equal finite differences in float64.
    q, k, v = rand(1, 4, 2, 4, 6, D=4, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, backend="reference"), (q, k, v))


def test_half_precision_close_to_float64(seed):
    q, k, v = rand(2, 4, 2, 16, 16, D=32)
    ref = attention(q, k, v, backend="reference")
    for dt in (torch.float32, torch.bfloat16):
        out = attention(q.to(dt), k.to(dt), v.to(dt), backend="sdpa").double()
        tol = 1e-5 if dt == torch.float32 else 3e-2
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_bad_head_counts():
    q, k, v = rand(1, 6, 4, 3, 3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(*rand(1, 2, 2, 3, 3), backend="magic")


def _old_triton():
    """A stand-in for a Triton older than the kernels support (torch 2.4 ships 3.0)."""
    import types

    old = types.ModuleType("triton")
    old.__version__ = "3.1.0"
    old.language = types.ModuleType("triton.language")
    return old


@pytest.mark.parametrize("triton, error", [
    (None, "needs triton"),  # None in sys.modules makes `import triton` raise ImportError
    (_old_triton(), r"need triton >= 3\.2, found 3\.1\.0: pip install -U 'triton>=3\.2'"),
], ids=["absent", "too-old"])
def test_works_without_a_usable_triton(monkeypatch, seed, triton, error):
    # lmstack.kernels never imports triton up front; without it, or with one too old, "sdpa" stays
    # the automatic choice and the flash module says in one line what is missing.
    import importlib
    import sys

    import lmstack.kernels
    from lmstack.kernels import _triton_importable

    monkeypatch.setitem(sys.modules, "triton", triton)
    if triton is not None:
        monkeypatch.setitem(sys.modules, "triton.language", triton.language)
    monkeypatch.delitem(sys.modules, "lmstack.kernels.flash_attention", raising=False)
    monkeypatch.delattr(lmstack.kernels, "flash_attention", raising=False)  # imported by test collection
    with pytest.raises(ImportError, match=error):
        importlib.import_module("lmstack.kernels.flash_attention")
    assert _triton_importable.__wrapped__() is False
    q, k, v = rand(1, 2, 2, 5, 5)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="reference"))


@pytest.mark.parametrize("window", [0, -3])
def test_window_below_one_is_refused(window):
    """A window counts the query itself: 0 or less would see nothing (and the Triton path would read
    it as unbounded), so it is refused on every backend."""
    q = torch.randn(1, 2, 4, 8)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=f"window={window}.*>= 1"):
            attention(q, q, q, window=window, backend=backend)
