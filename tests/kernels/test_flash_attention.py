"""The Triton FlashAttention kernels against float64 references, forward and backward.

On a machine without CUDA they run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), with 16 x 16 blocks, so sequence lengths of a few
dozen already cover several blocks, partial blocks and the masked/unmasked tile split.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from . import require_kernels  # noqa: E402

require_kernels()

import lmstack  # noqa: E402
from lmstack.kernels import Seqs, attention, attention_ref, window_mask  # noqa: E402
from lmstack.kernels.flash_attention import flash_attn_func, flash_attn_varlen_func  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ref_attention(q, k, v, *, causal=False, window_size=(-1, -1), scale=None):
    """float64 reference on flash-attn layouts: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D).
    Returns (out, lse); rows that see no key output 0 (and pass no gradient)."""
    Sq, Sk = q.shape[1], k.shape[1]
    mask = window_mask(Sq, Sk, causal=causal, window_size=window_size, device=q.device)  # (Sq, Sk)
    empty = ~mask.any(-1)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out = attention_ref(qt, kt, vt, mask=(mask | empty[:, None])[None, None], scale=scale)
    out = out * ~empty[:, None]
    G = q.shape[2] // k.shape[2]
    s = qt @ kt.repeat_interleave(G, 1).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)  # (B, Hq, Sq)
    return out.transpose(1, 2), lse


def leaves(*shapes):
    return [torch.randn(*s, dtype=F64, device=DEVICE, requires_grad=True) for s in shapes]


def as_fp32(*ts):
    return [t.detach().float().requires_grad_() for t in ts]


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close(ours, ref, what):
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = rel_err(ours, ref)
    assert err < 1e-3, f"{what}: relative error {err:.2e}"


def check_grads(ours, ref, ins32, ins64):
    """Backpropagate the same random cotangent through both; compare dq, dk, dv."""
    do = torch.randn_like(ref)
    ours.backward(do.float())
    ref.backward(do)
    for name, a, b in zip("qkv", ins32, ins64):
        assert_close(a.grad, b.grad, f"d{name}")


# (B, Sq, Sk, Hq, Hkv, D, causal, window_size)
CASES = {
    "causal-odd-len": (2, 37, 37, 1, 1, 32, True, (-1, -1)),
    "causal-q<k-gqa2": (1, 19, 45, 4, 2, 64, True, (-1, -1)),
    "causal-q>k-mqa4": (1, 45, 19, 4, 1, 32, True, (-1, -1)),  # first 26 rows see no key
    "full-gqa8": (1, 20, 20, 8, 1, 32, False, (-1, -1)),
    "causal-d96": (1, 40, 40, 2, 1, 96, True, (-1, -1)),
    "causal-d128": (1, 24, 24, 2, 2, 128, True, (-1, -1)),
    "window-two-sided": (1, 35, 35, 2, 1, 32, False, (5, 3)),
    "window-causal-q<k": (1, 30, 41, 2, 2, 32, True, (7, -1)),
    "window-empty-rows": (1, 26, 20, 2, 2, 32, False, (1, 1)),
    # Lengths that are block multiples (16 in the interpreter) compile the masked tail loops away
    # (EVEN): keys only, queries only, both, with and without a window or a causal mask.
    "even-causal": (2, 32, 32, 2, 1, 32, True, (-1, -1)),
    "even-full-gqa2": (1, 48, 48, 4, 2, 64, False, (-1, -1)),
    "even-k-causal-q<k": (1, 21, 48, 2, 2, 32, True, (-1, -1)),
    "even-q-causal-q>k-mqa2": (1, 48, 13, 2, 1, 32, True, (-1, -1)),  # first 35 rows see no key
    "even-window-two-sided": (1, 32, 32, 2, 1, 32, False, (5, 3)),
    "even-window-causal-q<k": (1, 16, 48, 2, 2, 32, True, (7, -1)),
}


@pytest.mark.parametrize("case", CASES)
def test_flash_attn_func_matches_reference(seed, case):
    B, Sq, Sk, Hq, Hkv, D, causal, window_size = CASES[case]
    q, k, v = leaves((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D))
    q32, k32, v32 = as_fp32(q, k, v)
    out, lse = flash_attn_func(q32, k32, v32, causal=causal, window_size=window_size, return_lse=True)
    ref, ref_lse = ref_attention(q, k, v, causal=causal, window_size=window_size)
    assert out.shape == (B, Sq, Hq, D) and out.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    assert_close(out, ref, "out")
    seen = torch.isfinite(ref_lse)  # lse is -inf exactly on the rows without keys
    assert torch.equal(torch.isfinite(lse), seen)
    assert_close(lse[seen], ref_lse[seen], "lse")
    check_grads(out, ref, (q32, k32, v32), (q, k, v))
    blind = ~seen  # (B, Hq, Sq) rows without keys: exactly 0 output and 0 gradient
    assert (out.detach().transpose(1, 2)[blind] == 0).all() and (q32.grad.transpose(1, 2)[blind] == 0).all()


def test_softmax_scale_and_strided_inputs(seed):
    # (B, H, S, D) memory viewed as (B, S, H, D): the kernels read through the strides.
    q, k, v = leaves((2, 4, 21, 32), (2, 2, 21, 32), (2, 2, 21, 32))
    q32, k32, v32 = as_fp32(q, k, v)
    out = flash_attn_func(q32.transpose(1, 2), k32.transpose(1, 2), v32.transpose(1, 2), causal=True,
                          softmax_scale=0.37)
    ref, _ = ref_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, scale=0.37)
    assert_close(out, ref, "out")
    check_grads(out, ref, (q32, k32, v32), (q, k, v))


def ref_varlen(q, k, v, cu_q, cu_k, **kw):
    """Each packed sequence through ref_attention on its own."""
    outs = []
    for i in range(len(cu_q) - 1):
        sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if cu_k[i + 1] == cu_k[i]:  # a sequence without keys: every row outputs 0
            outs.append(q[sq] * 0)
            continue
        outs.append(ref_attention(q[None, sq], k[None, sk], v[None, sk], **kw)[0][0])
    return torch.cat(outs)


VARLEN_CASES = {
    "self-causal-gqa2": ([1, 17, 5, 33, 2], None, 2, 1, True, (-1, -1)),
    "self-full-mqa": ([3, 1, 20, 16], None, 2, 1, False, (-1, -1)),
    "self-window": ([18, 1, 35], None, 2, 2, True, (4, -1)),
    "cross-lengths": ([3, 1, 20, 4], [10, 1, 16, 0], 2, 2, True, (-1, -1)),  # q>k rows and a keyless sequence
}


@pytest.mark.parametrize("case", VARLEN_CASES)
def test_varlen_matches_per_sequence_reference(seed, case):
    lens_q, lens_k, Hq, Hkv, causal, window_size = VARLEN_CASES[case]
    lens_k = lens_k or lens_q
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    D = 32
    q, k, v = leaves((sum(lens_q), Hq, D), (sum(lens_k), Hkv, D), (sum(lens_k), Hkv, D))
    q32, k32, v32 = as_fp32(q, k, v)
    out = flash_attn_varlen_func(q32, k32, v32, cu_q.to(DEVICE), cu_k.to(DEVICE), max(lens_q), max(lens_k),
                                 causal=causal, window_size=window_size)
    ref = ref_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), causal=causal, window_size=window_size)
    assert out.shape == q.shape
    assert_close(out, ref, "out")
    check_grads(out, ref, (q32, k32, v32), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16 in the interpreter: kernels in fp32
def test_half_precision_inputs(seed, dtype):
    q, k, v = leaves((1, 40, 2, 64), (1, 40, 1, 64), (1, 40, 1, 64))
    qh, kh, vh = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = flash_attn_func(qh, kh, vh, causal=True)
    assert out.dtype == dtype
    ref, _ = ref_attention(q, k, v, causal=True)
    do = torch.randn_like(ref)
    out.backward(do.to(dtype))
    ref.backward(do)
    for a, b in ((out, ref), (qh.grad, q.grad), (kh.grad, k.grad), (vh.grad, v.grad)):
        assert a.dtype == dtype and rel_err(a, b) < 3e-2


def test_bad_inputs_raise_one_line_errors():
    x = torch.randn(1, 8, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="must have 4 dims"):
        flash_attn_func(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attn_func(x, x[:, :, :3], x[:, :, :3])
    with pytest.raises(ValueError, match="unsupported head_dim 36"):
        y = torch.randn(1, 8, 4, 36, device=DEVICE)
        flash_attn_func(y, y, y)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attn_func(x.double(), x.double(), x.double())
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(x, x, x, window_size=(-2, 0))
    with pytest.raises(ValueError, match="dropout"):
        flash_attn_func(x, x, x, dropout_p=0.1)
    t = torch.randn(10, 4, 32, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="different numbers of sequences"):
        flash_attn_varlen_func(t, t, t, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="int32"):
        flash_attn_varlen_func(t, t, t, cu.long(), cu, 6, 6)
    if DEVICE == "cpu":  # value checks cost a device sync, so they only run off the GPU
        with pytest.raises(ValueError, match="must rise from 0 to 10"):
            flash_attn_varlen_func(t, t, t, torch.tensor([0, 4, 9], dtype=torch.int32), cu, 6, 6)
        with pytest.raises(ValueError, match="max_seqlen_q=5"):
            flash_attn_varlen_func(t, t, t, cu, cu, 5, 6)


# -- through lmstack.kernels.attention ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["causal", "window", "docs", "docs-window", "decode-cache", "padding"])
def test_attention_backend_triton(seed, mode):
    B, Hq, Hkv, D = 2, 2, 1, 16
    Tq, Tk = (5, 21) if mode == "decode-cache" else (21, 21)
    kw = {}
    if "window" in mode:
        kw["window"] = 6
    if "docs" in mode:
        kw["seqs"] = Seqs.from_doc_ids(torch.tensor([[0] * 4 + [1] * 16 + [2], [0] * 21]))
    if mode == "padding":  # falls back to SDPA with the mask
        kw["key_valid"] = torch.tensor([[False] * 3 + [True] * 18, [True] * 21])
    q, k, v = leaves((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D))
    q32, k32, v32 = as_fp32(q, k, v)
    out = attention(q32, k32, v32, backend="triton", **kw)
    ref = attention(q, k, v, backend="reference", **kw)
    assert out.shape == (B, Hq, Tq, D)
    assert_close(out, ref, "out")
    check_grads(out, ref, (q32, k32, v32), (q, k, v))


@pytest.mark.parametrize("docs", [False, True])
def test_triton_backend_follows_autocast(seed, docs):
    """Under autocast (here the CPU's, bf16) q/k/v arrive in fp32: the triton backend casts them as
    autocast does for SDPA, so both give bf16 outputs and fp32 leaves get gradients."""
    kw = {"seqs": Seqs.from_doc_ids(torch.tensor([[0] * 7 + [1] * 10]).to(DEVICE))} if docs else {}
    q, k, v = leaves((1, 4, 17, 32), (1, 2, 17, 32), (1, 2, 17, 32))
    ref = attention(q, k, v, backend="reference", **kw)
    outs, grads = [], []
    for backend in ("triton", "sdpa"):
        x = [t.detach().float().requires_grad_() for t in (q, k, v)]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            o = attention(*x, backend=backend, **kw)
        assert o.dtype == torch.bfloat16
        o.float().square().sum().backward()
        outs.append(o)
        grads.append([t.grad for t in x])
    for o in outs:
        assert rel_err(o, ref) < 2e-2
    for a, b in zip(*grads):
        assert a.dtype == torch.float32 and rel_err(a, b.double()) < 5e-2


def test_auto_backend_is_sdpa_off_gpu():
    from lmstack.kernels import _auto_backend

    q = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)
    assert _auto_backend(q, None) == ("triton" if q.is_cuda else "sdpa")


def test_tiny_transformer_triton_equals_sdpa(seed):
    cfg = lmstack.ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48,
                              max_seq_len=64)  # head_dim 16, GQA
    m = lmstack.Transformer(cfg).to(DEVICE).train()
    x = torch.randint(0, 97, (2, 21), device=DEVICE)
    seqs = Seqs.from_doc_ids(torch.tensor([[0] * 5 + [1] * 9 + [2] * 7, [0] * 1 + [1] * 20])).to(DEVICE)
    for kw in ({}, {"seqs": seqs}):
        results = []
        for backend in ("sdpa", "triton"):
            m.attn_backend = backend
            m.zero_grad()
            out = m(x, **kw)
            out.square().mean().backward()
            results.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
        (o_sdpa, g_sdpa), (o_tri, g_tri) = results
        torch.testing.assert_close(o_tri, o_sdpa, rtol=1e-4, atol=1e-5)
        for a, b in zip(g_tri, g_sdpa):
            assert rel_err(a, b.double()) < 1e-3


# -- bf16 at real sizes, on a GPU ---------------------------------------------------------------

# (B, Sq, Sk, Hq, Hkv, D, causal, window_size)
GPU_CASES = {
    "causal-2k-d128": (2, 2048, 2048, 16, 16, 128, True, (-1, -1)),
    "causal-4k-gqa4-d128": (1, 4096, 4096, 32, 8, 128, True, (-1, -1)),
    "full-1k-d64": (4, 1024, 1024, 16, 16, 64, False, (-1, -1)),
    "causal-q<k-gqa3-d96": (2, 500, 1700, 12, 4, 96, True, (-1, -1)),
    "causal-mqa-d32": (2, 2048, 2048, 16, 1, 32, True, (-1, -1)),
    "window-odd-len-d128": (2, 3001, 3001, 8, 2, 128, True, (1023, -1)),
    "causal-d256": (1, 1024, 1024, 8, 8, 256, True, (-1, -1)),
}
GPU_VARLEN_LENGTHS = [1, 7, 64, 300, 2048, 513, 1000, 90, 1500, 33, 4, 1200]  # 6,760 tokens, mixed


def naive_bf16(q, k, v, *, causal, window_size):
    """Attention step by step in bf16 (scores, probabilities and products each rounded to bf16), on
    flash layouts: the baseline flash-attn's own tests hold their kernels to."""
    Sq, Sk, D = q.shape[1], k.shape[1], q.shape[-1]
    G = q.shape[2] // k.shape[2]
    mask = window_mask(Sq, Sk, causal=causal, window_size=window_size, device=q.device)
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2), v.repeat_interleave(G, 2).transpose(1, 2)
    p = torch.softmax((qt @ kt.transpose(-1, -2) * D**-0.5).masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ vt).transpose(1, 2)


def assert_within_twice_naive_error(attend, reference, shapes):
    """bf16 output and dq/dk/dv against a float32 reference: errors at most twice those of the naive
    bf16 computation on the same inputs (plus 1e-4 of the values' scale), flash-attn's criterion."""
    x32 = [torch.randn(*s, device=DEVICE, requires_grad=True) for s in shapes]
    ours_in = [t.detach().bfloat16().requires_grad_() for t in x32]
    naive_in = [t.detach().bfloat16().requires_grad_() for t in x32]
    outs = [reference(*x32), attend(*ours_in), reference(*naive_in, naive=True)]
    do = torch.randn_like(outs[0])
    for o in outs:
        o.backward(do.to(o.dtype))
    assert outs[1].dtype == torch.bfloat16
    for name, ref, ours, naive in zip(["out", "dq", "dk", "dv"], [outs[0]] + [t.grad for t in x32],
                                      [outs[1]] + [t.grad for t in ours_in], [outs[2]] + [t.grad for t in naive_in]):
        assert torch.isfinite(ours).all(), f"{name}: non-finite values"
        err, naive_err = ((t.float() - ref).abs().max().item() for t in (ours, naive))
        bound = 2 * naive_err + 1e-4 * ref.abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g}, naive bf16's {naive_err:.3g}"


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 at real sizes: GPU only (hours in the interpreter)")
@pytest.mark.parametrize("case", GPU_CASES)
def test_bf16_real_sizes(seed, case):
    B, Sq, Sk, Hq, Hkv, D, causal, window_size = GPU_CASES[case]

    def reference(q, k, v, naive=False):
        if naive:
            return naive_bf16(q, k, v, causal=causal, window_size=window_size)
        return ref_attention(q, k, v, causal=causal, window_size=window_size)[0]

    assert_within_twice_naive_error(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, window_size=window_size),
                               reference, [(B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D)])


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 at real sizes: GPU only (hours in the interpreter)")
def test_bf16_varlen_real_sizes(seed):
    lens = GPU_VARLEN_LENGTHS
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    Hq, Hkv, D = 16, 4, 128

    def reference(q, k, v, naive=False):
        if not naive:
            return ref_varlen(q, k, v, cu.tolist(), cu.tolist(), causal=True)
        parts = [naive_bf16(q[None, a:b], k[None, a:b], v[None, a:b], causal=True, window_size=(-1, -1))[0]
                 for a, b in zip(cu.tolist(), cu.tolist()[1:])]
        return torch.cat(parts)

    cu_dev = cu.to(DEVICE)
    assert_within_twice_naive_error(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_dev, cu_dev, max(lens), max(lens), causal=True),
        reference, [(sum(lens), Hq, D), (sum(lens), Hkv, D), (sum(lens), Hkv, D)])


def test_bf16_criterion_accepts_bf16_attention_and_rejects_an_error(seed):
    """The GPU tests' yardstick, run here on small shapes with SDPA standing in for the kernels:
    SDPA in bf16 passes it, and the same with queries scaled by 1.05 fails it."""
    B, Sq, Sk, Hq, Hkv, D, causal, window_size = 2, 50, 70, 4, 2, 32, True, (9, -1)
    mask = window_mask(Sq, Sk, causal=causal, window_size=window_size, device=DEVICE)

    def sdpa(q, k, v, q_scale=1.0):
        G = Hq // Hkv
        o = torch.nn.functional.scaled_dot_product_attention(
            (q * q_scale).transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2),
            v.repeat_interleave(G, 2).transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2)

    def reference(q, k, v, naive=False):
        if naive:
            return naive_bf16(q, k, v, causal=causal, window_size=window_size)
        return ref_attention(q, k, v, causal=causal, window_size=window_size)[0]

    shapes = [(B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D)]
    assert_within_twice_naive_error(sdpa, reference, shapes)
    with pytest.raises(AssertionError, match="max error"):
        assert_within_twice_naive_error(lambda q, k, v: sdpa(q, k, v, q_scale=1.05), reference, shapes)


def test_gpu_launch_tunes_half_precision_and_fixes_fp32(monkeypatch):
    """On a GPU (simulated: the launch is recorded, not run) fp16/bf16 go through the autotuner with
    the kernel's config list; fp32 launches the list's last config directly, untuned."""
    import lmstack.kernels.flash_attention as fa

    launched, tuned = [], []

    class Recorder:
        def __init__(self, configs=None):
            self.configs = configs

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((self.configs, grid(meta), meta))

    monkeypatch.setattr(fa, "INTERPRET", False)
    monkeypatch.setattr(fa, "_TUNED", {})
    monkeypatch.setitem(fa._KERNELS, "kv", Recorder())
    monkeypatch.setattr(fa.triton, "autotune", lambda configs, key: tuned.append(key) or (lambda k: Recorder(configs)))
    grid = lambda m: (m.get("BLOCK_N"),)  # noqa: E731

    fa._launch("kv", grid, "arg", D_PAD=128, PRECISION="ieee")
    last = fa._CONFIGS[("kv", False)][-1]
    assert launched.pop() == (None, (last.kwargs["BLOCK_N"],), {"D_PAD": 128, "PRECISION": "ieee", **last.kwargs,
                                                                 "num_warps": last.num_warps,
                                                                 "num_stages": last.num_stages})
    assert tuned == []
    fa._launch("kv", grid, "arg", D_PAD=256, PRECISION="tf32")
    configs, _, meta = launched.pop()
    assert configs is fa._CONFIGS[("kv", True)] and meta == {"D_PAD": 256, "PRECISION": "tf32"}
    assert tuned == [fa._TUNE_KEY]
