"""Adversarial checks of lmstack.kernels.attention's dispatch and of the Triton FlashAttention API.

Everything is compared against float64 math (``attention(..., backend="reference")`` on float64
inputs, or a per-query loop where the reference itself is under test). Off a GPU the Triton kernels
run through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported),
so shapes are tiny: sequence lengths <= 40, head dim 16, 1-4 heads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does the same)

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from . import require_kernels  # noqa: E402

require_kernels()

import lmstack  # noqa: E402
from lmstack.kernels import Seqs, attention  # noqa: E402
from lmstack.kernels.flash_attention import flash_attn_func, flash_attn_varlen_func  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand64(*shapes, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=F64, generator=g).to(DEVICE).requires_grad_(grad) for s in shapes]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


def qkv_shapes(B, Hq, Hkv, Tq, Tk, D=16):
    return (B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)


# -- scale <= 0 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", None, "reference", "triton"])
@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_nonpositive_scale_plain_causal(backend, scale):
    """softmax(scale * q k^T) with scale 0 is a uniform average over the visible keys, and a
    negative scale is just as well defined. The SDPA backend (the default off the GPU) hands plain
    causal attention to SDPA's is_causal, whose CPU kernel masks with -inf *before* scaling:
    -inf * 0 and -inf * -0.5 are NaN / +inf, so every output row comes back NaN."""
    q, k, v = rand64(*qkv_shapes(2, 4, 2, 13, 13), seed=11, grad=True)
    ref = attention(q, k, v, scale=scale, backend="reference")
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = attention(q32, k32, v32, scale=scale, backend=backend)
    assert bool(torch.isfinite(out).all()), f"backend={backend} scale={scale}: non-finite outputs"
    assert rel_err(out, ref) < 1e-5
    do = torch.randn(ref.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref.backward(do)
    out.backward(do.float())
    for name, a, b in zip("qkv", (q32, k32, v32), (q, k, v)):
        assert rel_err(a.grad, b.grad) < 1e-4, f"d{name}"


# -- double backward ------------------------------------------------------------------------------


def test_triton_double_backward_is_refused_or_right():
    """A gradient penalty (create_graph=True) differentiates the backward itself. The Triton
    backward is not differentiable (its kernels record nothing), but it is not marked
    once_differentiable either: dq comes back without a grad_fn, so a loss that mixes the penalty
    with ordinary terms silently drops the penalty's gradient (SDPA's CPU kernel raises instead)."""
    q, k, v = rand64(*qkv_shapes(1, 2, 1, 12, 12), seed=3, grad=True)
    o = attention(q, k, v, backend="reference")
    (gq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    (o.sum() + gq.square().sum()).backward()

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    try:
        o32 = attention(q32, k32, v32, backend="triton")
        (gq32,) = torch.autograd.grad(o32.square().sum(), q32, create_graph=True)
        (o32.sum() + gq32.square().sum()).backward()
    except RuntimeError as e:  # refusing second derivatives (once_differentiable) is fine
        assert "differentiate" in str(e) or "grad" in str(e)
        return
    assert rel_err(v32.grad, v.grad) < 1e-4, "second-order term silently dropped"


# -- autocast ------------------------------------------------------------------------------------


def test_cpu_autocast_triton_matches_sdpa_precision():
    """Under CPU autocast (bf16) the triton backend casts q/k/v as autocast does for SDPA: bf16
    output, with errors against float64 like SDPA's own (forward and dq/dk/dv, GQA)."""
    q, k, v = rand64(*qkv_shapes(1, 2, 1, 20, 20), seed=5, grad=True)
    ref = attention(q, k, v, backend="reference")
    do = torch.randn(ref.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    ref.backward(do)
    errs = {}
    for backend in ("sdpa", "triton"):
        ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = attention(*ins, backend=backend)
        assert out.dtype == torch.bfloat16, backend
        out.backward(do.to(out.dtype))
        errs[backend] = [rel_err(out, ref)] + [rel_err(a.grad, b.grad) for a, b in zip(ins, (q, k, v))]
    for name, e_tri, e_sdpa in zip(("out", "dq", "dk", "dv"), errs["triton"], errs["sdpa"]):
        assert e_tri <= 2 * e_sdpa + 1e-3, f"{name}: triton {e_tri:.3g} vs sdpa {e_sdpa:.3g}"


def test_autocast_does_not_downcast_float64_for_triton():
    """Autocast never casts float64 (SDPA under autocast returns float64). The triton backend casts
    whatever arrives to autocast's dtype, so float64 inputs are silently computed in bf16 and come
    back bf16; without autocast the same call is refused with a one-line dtype error."""
    q, k, v = rand64(*qkv_shapes(1, 2, 1, 10, 10), seed=6)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert attention(q, k, v, backend="sdpa").dtype == F64
        try:
            out = attention(q, k, v, backend="triton")
        except ValueError as e:  # refused as without autocast: fine
            assert "dtype" in str(e)
            return
    assert out.dtype == F64, f"float64 inputs came back {out.dtype}"


def test_mixed_dtypes_through_triton_are_one_line_errors_or_autocast():
    q, k, v = rand64(*qkv_shapes(1, 2, 1, 8, 8), seed=7)
    with pytest.raises(ValueError, match="one dtype"):
        attention(q.float(), k.bfloat16(), v.bfloat16(), backend="triton")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # autocast unifies them, as for SDPA
        out = attention(q.float(), k.bfloat16(), v.float(), backend="triton")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, attention(q, k, v, backend="reference")) < 3e-2


# -- rows that see no key -------------------------------------------------------------------------


def test_rows_without_keys_agree_across_backends():
    """Tq > Tk, causal: the first Tq - Tk queries sit before every key. SDPA and the Triton kernels
    return 0 there (as attention_tiled_ref's docstring specifies); the "reference" backend, the
    specification the others are tested against, returns NaN."""
    q, k, v = rand64(*qkv_shapes(1, 2, 1, 10, 4), seed=8)
    outs = {b: attention(q.float(), k.float(), v.float(), backend=b) for b in ("sdpa", "triton")}
    outs["reference"] = attention(q, k, v, backend="reference")
    for b, o in outs.items():
        assert bool(torch.isfinite(o).all()), f"{b}: non-finite rows"
        assert (o[:, :, :6] == 0).all(), f"{b}: rows without keys must be 0"
    assert rel_err(outs["triton"], outs["reference"]) < 1e-5
    assert rel_err(outs["sdpa"], outs["reference"]) < 1e-5


# -- gradients through attention(backend="triton") -------------------------------------------------


@pytest.mark.parametrize("needs", ["q", "kv", "v"])
def test_triton_partial_requires_grad_and_strided_cotangent(needs):
    """Only some of q/k/v require grad; the output gradient is a non-contiguous view; GQA 4:2;
    queries fewer than keys with a window."""
    q, k, v = rand64(*qkv_shapes(1, 4, 2, 17, 23), seed=9)
    leaves64 = [t.clone().requires_grad_(n in needs) for t, n in zip((q, k, v), "qkv")]
    leaves32 = [t.detach().float().requires_grad_(n in needs) for t, n in zip((q, k, v), "qkv")]
    ref = attention(*leaves64, window=7, backend="reference")
    out = attention(*leaves32, window=7, backend="triton")
    assert rel_err(out, ref) < 1e-5
    do = torch.randn(1, 4, 16, 17, dtype=F64, generator=torch.Generator().manual_seed(3)).transpose(-1, -2)
    do = do[..., :16]  # (1, 4, 17, 16) with a head-dim stride of 17
    assert not do.is_contiguous()
    ref.backward(do)
    out.backward(do.float())
    for n, a, b in zip("qkv", leaves32, leaves64):
        if n in needs:
            assert rel_err(a.grad, b.grad) < 1e-4, f"d{n}"
        else:
            assert a.grad is None


def test_triton_inputs_with_strided_head_dim():
    """q/k/v whose head-dim axis is not contiguous (views of a (B, T, D, H) buffer)."""
    q, k, v = rand64((1, 19, 16, 2), (1, 19, 16, 1), (1, 19, 16, 1), seed=10)
    qv, kv, vv = (t.permute(0, 3, 1, 2) for t in (q, k, v))  # (B, H, T, D), D stride = H
    ref = attention(qv, kv, vv, backend="reference")
    out = attention(*(t.float() for t in (qv, kv, vv)), backend="triton")
    assert rel_err(out, ref) < 1e-5


# -- decoding, fallbacks and windows through the triton backend ------------------------------------


@pytest.mark.parametrize("mode", ["plain", "window", "key_valid", "query_pos"])
def test_triton_single_query_decode_gqa(mode):
    """Tq = 1 with a cache of 21 keys, GQA 4:1: the flash path (plain, window) and the SDPA
    fallbacks (key_valid, query_pos) against the float64 reference."""
    q, k, v = rand64(*qkv_shapes(2, 4, 1, 1, 21), seed=12)
    kw = {}
    if mode == "window":
        kw["window"] = 5
    if mode == "key_valid":
        kw["key_valid"] = torch.tensor([[False] * 4 + [True] * 17, [True] * 21], device=DEVICE)
    if mode == "query_pos":
        kw.update(query_pos=torch.tensor([15], device=DEVICE), window=9)
    ref = attention(q, k, v, backend="reference", **kw)
    out = attention(q.float(), k.float(), v.float(), backend="triton", **kw)
    assert out.shape == (2, 4, 1, 16)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("window", [1, 21, 100])
def test_triton_window_edges_with_documents(window):
    """window 1 (each token sees only itself), window == T and window > T, with packed documents."""
    seqs = Seqs.from_doc_ids(torch.tensor([[0] * 6 + [1] * 14 + [2]], device=DEVICE))
    q, k, v = rand64(*qkv_shapes(1, 2, 1, 21, 21), seed=13)
    ref = attention(q, k, v, seqs=seqs, window=window, backend="reference")
    out = attention(q.float(), k.float(), v.float(), seqs=seqs, window=window, backend="triton")
    assert rel_err(out, ref) < 1e-5
    if window == 1:
        assert rel_err(out, v.repeat_interleave(2, 1)) < 1e-5  # softmax over one key: v itself


# -- packed documents (Seqs) -----------------------------------------------------------------------


def test_seqs_with_empty_documents_through_triton():
    """A hand-built Seqs whose cu_seqlens repeat (zero-length documents) gives the same as SDPA's
    document mask."""
    doc_ids = torch.tensor([[0] * 7 + [1] * 13, [2] * 20], device=DEVICE)
    base = Seqs.from_doc_ids(doc_ids)
    cu = torch.tensor([0, 0, 7, 7, 20, 20, 40], dtype=torch.int32, device=DEVICE)
    seqs = Seqs(doc_ids=base.doc_ids, positions=base.positions, cu_seqlens=cu, max_seqlen=20)
    q, k, v = rand64(*qkv_shapes(2, 2, 2, 20, 20), seed=14)
    ref = attention(q, k, v, seqs=base, backend="reference")
    out = attention(q.float(), k.float(), v.float(), seqs=seqs, backend="triton")
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("bad", ["int64", "not-from-0", "short-of-total", "non-monotone", "max_seqlen-small"])
def test_bad_seqs_through_triton_are_refused(bad):
    """cu_seqlens that do not describe the tokens are refused with one line (or, for int64, used
    correctly), never silently wrong."""
    doc_ids = torch.tensor([[0] * 5 + [1] * 15], device=DEVICE)
    good = Seqs.from_doc_ids(doc_ids)
    cu, mx = good.cu_seqlens, good.max_seqlen
    cu = {"int64": cu.long(), "not-from-0": cu + 1, "short-of-total": torch.tensor([0, 5, 19]),
          "non-monotone": torch.tensor([0, 12, 5, 20]), "max_seqlen-small": cu}[bad]
    if bad != "int64":
        cu = cu.to(torch.int32).to(DEVICE)
    seqs = Seqs(good.doc_ids, good.positions, cu, 10 if bad == "max_seqlen-small" else mx)
    q, k, v = rand64(*qkv_shapes(1, 2, 1, 20, 20), seed=15)
    if bad == "int64":
        try:
            out = attention(q.float(), k.float(), v.float(), seqs=seqs, backend="triton")
        except ValueError as e:
            assert "int32" in str(e) and "\n" not in str(e)
            return
        assert rel_err(out, attention(q, k, v, seqs=good, backend="reference")) < 1e-5
        return
    if DEVICE != "cpu":
        pytest.skip("values of cu_seqlens are checked off the GPU only")
    with pytest.raises(ValueError, match="cu_seqlens") as e:
        attention(q.float(), k.float(), v.float(), seqs=seqs, backend="triton")
    assert "\n" not in str(e.value)


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: takes flash_attn_varlen_func's GPU branch (which
    skips the value checks) while the interpreter still runs the kernels."""

    @property
    def is_cuda(self):
        return True


def test_varlen_max_seqlen_below_a_document_on_the_gpu_path():
    """On a GPU flash_attn_varlen_func does not check max_seqlen (a device sync); the launch grid is
    sized from it, so the queries of a longer document past max_seqlen's blocks are never written
    and the output there is whatever torch.empty left in memory. It should be refused or computed
    correctly (e.g. the kernels stepping over query blocks grid-stride), never silently garbage."""
    lens = [3, 37]  # the second document spans three 16-query blocks; max_seqlen 8 launches one
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)
    q64, k64, v64 = rand64((40, 2, 16), (40, 1, 16), (40, 1, 16), seed=16)
    ref = flash_attn_varlen_func(q64.float(), k64.float(), v64.float(), cu, cu, 37, 37, causal=True)
    wrap = (lambda t: t) if DEVICE != "cpu" else (lambda t: t.as_subclass(_ReportsCuda))
    try:
        out = flash_attn_varlen_func(*(wrap(t.float()) for t in (q64, k64, v64)), wrap(cu), wrap(cu), 8, 8,
                                     causal=True)
    except (ValueError, RuntimeError):
        return  # refused: fine
    torch.testing.assert_close(out.as_subclass(torch.Tensor), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "reference", "triton"])
def test_seqs_for_another_batch_shape_is_refused(backend):
    """A Seqs built for one row used with a batch of two: the SDPA and reference backends broadcast
    row 0's documents over both rows and return an answer; on a GPU the varlen kernel would read
    cu_seqlens for fewer tokens than it was given (no value checks there). A shape check against
    (B, T) is free, so every backend should refuse it with one line."""
    seqs = Seqs.from_doc_ids(torch.tensor([[0] * 8 + [1] * 12], device=DEVICE))
    q, k, v = rand64(*qkv_shapes(2, 2, 1, 20, 20), seed=18)
    with pytest.raises(ValueError) as e:
        attention(q.float(), k.float(), v.float(), seqs=seqs, backend=backend)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0)])
def test_seqs_from_an_empty_batch(shape):
    """attention() takes zero-length batches and sequences on every backend; Seqs.from_doc_ids
    crashed on them with torch's 'max(): Expected reduction dim' instead."""
    s = Seqs.from_doc_ids(torch.zeros(shape, dtype=torch.long, device=DEVICE))
    assert s.positions.shape == shape and s.max_seqlen == 0
    assert s.cu_seqlens.tolist() == [0]
    q = torch.randn(shape[0], 2, shape[1], 16, device=DEVICE)
    assert attention(q, q, q, seqs=s, backend="sdpa").shape == q.shape


# -- the flash-attn call signature ------------------------------------------------------------------


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("option", ["alibi_slopes", "softcap", "dropout_positional", "return_attn_probs"])
def test_flash_attn_options_not_supported_are_refused(varlen, option):
    """flash-attn options the kernels do not implement are refused with one line, never silently
    ignored (a swapped-in caller that passes alibi_slopes would get attention without the bias)."""
    x = torch.randn(1, 20, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 8, 20], dtype=torch.int32, device=DEVICE)
    args = (x[0], x[0], x[0], cu, cu, 12, 12) if varlen else (x, x, x)
    kw = {"alibi_slopes": {"alibi_slopes": torch.ones(2, device=DEVICE)}, "softcap": {"softcap": 30.0},
          "return_attn_probs": {"return_attn_probs": True}, "dropout_positional": {}}[option]
    if option == "dropout_positional":
        args = args + (0.1,)
    with pytest.raises((TypeError, ValueError, NotImplementedError)) as e:
        flash_attn_varlen_func(*args, **kw) if varlen else flash_attn_func(*args, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["head_dim_4", "head_dim_264", "backend_case", "window_0"])
def test_dispatch_errors_are_one_line(bad):
    D = {"head_dim_4": 4, "head_dim_264": 264}.get(bad, 16)
    q = torch.randn(1, 2, 6, D, device=DEVICE)
    kw = {"backend": "triton"}
    if bad == "backend_case":
        kw["backend"] = "Triton"
    if bad == "window_0":
        kw["window"] = 0
    with pytest.raises(ValueError) as e:
        attention(q, q, q, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("D", [48, 80])
def test_triton_padded_head_dims(D):
    """Head dims that are multiples of 8 but not powers of two are padded inside the block."""
    q, k, v = rand64((1, 2, 18, D), (1, 1, 18, D), (1, 1, 18, D), seed=17, grad=True)
    ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention(q, k, v, backend="reference")
    out = attention(*ins, backend="triton")
    assert rel_err(out, ref) < 1e-5
    ref.sum().backward()  # an expanded (stride-0) cotangent
    out.sum().backward()
    for n, a, b in zip("qkv", ins, (q, k, v)):
        assert rel_err(a.grad, b.grad) < 1e-4, f"d{n}"


# -- the model ---------------------------------------------------------------------------------------


def test_tiny_transformer_backends_agree_window_and_documents():
    """A 1-layer GQA model with a sliding window of 3 on a packed batch: logits and every parameter
    gradient from sdpa and triton match the reference backend (fp32)."""
    torch.manual_seed(0)
    cfg = lmstack.ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48,
                              max_seq_len=64, sliding_window=3)  # head_dim 8
    m = lmstack.Transformer(cfg).to(DEVICE).train()
    x = torch.randint(0, 97, (2, 19), device=DEVICE)
    seqs = Seqs.from_doc_ids(torch.tensor([[0] * 5 + [1] * 9 + [2] * 5, [0] + [1] * 18], device=DEVICE))
    results = {}
    for backend in ("reference", "sdpa", "triton"):
        m.attn_backend = backend
        m.zero_grad()
        out = m(x, seqs=seqs)
        out.square().mean().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in m.parameters()])
    o_ref, g_ref = results["reference"]
    for backend in ("sdpa", "triton"):
        o, g = results[backend]
        torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) < 1e-3, backend
