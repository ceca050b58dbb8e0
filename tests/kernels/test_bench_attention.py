"""bench/attention.py's plumbing on the CPU: its first run will be on a lent GPU with minutes to
spare, so everything but the CUDA timing runs here first. The kernel grid runs one tiny row in fp32
(the Triton kernels through the interpreter, SDPA's flash backend on the CPU; cuDNN has no CPU
kernel, so it is reported as skipped), with a wall-clock timer in place of CUDA-event timing; the
training part runs packed and padded batches of short documents through a one-layer tiny model.
Nothing is written to bench/results or the docs."""

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from . import require_kernels  # noqa: E402

require_kernels()

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "bench" / "attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "DTYPE", torch.float32)
    return mod


def test_kernel_grid_plumbing(bench, monkeypatch):
    monkeypatch.setattr(bench, "GRID", [(1, 2, 40, 32, True)])

    def wall_ms(fn, **kw):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    monkeypatch.setattr(bench, "median_ms", wall_ms)
    seen = []
    rows = bench.kernel_bench(lambda rows: seen.append(len(rows)))
    assert seen == [1] and len(rows) == 1
    row = rows[0]
    assert row["max_abs_diff_vs_sdpa_flash"] < 1e-4  # fp32: the kernel and SDPA agree
    for part in ("fwd_tflops", "fwd_bwd_tflops"):
        assert row[part]["lmstack-triton"] > 0 and row[part]["sdpa-flash"] > 0
        assert row[part]["sdpa-cudnn"] is None  # no CPU kernel: skipped, not fatal
    table = bench.render({"meta": {"device": "cpu", "torch": "t", "date": "d", "commit": "c"}, "kernels": rows,
                          "training": None})
    assert "| 1 | 2 | 40 | 32 | yes |" in table and "not measured" in table


def test_training_plumbing(bench, monkeypatch):
    short, timed = bench.doc_lengths, bench.train_tokens_per_s
    monkeypatch.setattr(bench, "doc_lengths", lambda n, g, lo=8, hi=48: short(n, g, lo, hi))
    monkeypatch.setattr(bench, "train_tokens_per_s", lambda model, batches, steps: timed(model, batches, steps, warmup=0))
    seen = []
    t = bench.training_bench(1, 1, B=2, T=64, on_config=lambda r: seen.append(len(r["tok_s"])), preset="tiny")
    assert seen == [1, 2, 3, 4]
    assert set(t["tok_s"]) == {"packed varlen, triton", "padded, triton", "padded, sdpa", "packed doc-mask, sdpa"}
    assert all(math.isfinite(v) and v > 0 for v in t["tok_s"].values()) and 0 < t["padded_fill"] <= 1
    table = bench.render({"meta": {"device": "cpu", "torch": "t", "date": "d", "commit": "c"}, "kernels": [],
                          "training": t})
    assert "| packed varlen | triton |" in table
