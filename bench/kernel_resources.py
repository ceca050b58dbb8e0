"""Registers, spills and shared memory of every FlashAttention autotune config, compiled for a
Hopper GPU (sm_90a) on any machine, no GPU needed.

Triton compiles ahead of time for a named target and ships its own ptxas and cuobjdump, so a CPU
machine can build the exact binary an H100 would run and read its resource use. A config that needs
more than the 255 registers a thread can hold spills them to local memory (the stack frame
cuobjdump reports) and pays for the round trips; one whose shared memory passes 227 KiB cannot
launch. The autotune lists in ``lmstack.kernels.flash_attention._CONFIGS`` were chosen with this
before any GPU time, so that the autotuner picks among configs that do not spill.

The kernels' arguments are the ones the real host code passes: ``_FlashAttn`` runs forward and
backward on meta-device tensors of each workload's shape, with the launches captured instead of
run, and each is compiled through the JIT's own warm-up path, specialised as on a GPU.

    python bench/kernel_resources.py            # the configs in _CONFIGS, on the workloads below
    python bench/kernel_resources.py --sweep    # a grid of block sizes / warps / stages instead

Writes bench/results/kernel_resources.json and the "kernel_resources" section of docs/benchmarks.md
(--sweep: bench/results/kernel_resources_sweep.json only; --json PATH: that file only). Needs
triton with its bundled CUDA tools, not CUDA or a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, not interpret (read when the kernels are decorated)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from lmstack.kernels import flash_attention as fa  # noqa: E402

fa.check_compile_ahead()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, publish  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
# (name, B, S, Hq, Hkv, D, causal, varlen): bench/attention.py's grid (B, H, S, D; 32 heads) and
# its training run (llama-1.1b: 32 query / 4 KV heads of 64, packed documents), plus head dim 256
WORKLOADS = [
    ("causal d128", 2, 4096, 32, 32, 128, True, False),
    ("full d128", 2, 4096, 32, 32, 128, False, False),
    ("causal d64", 2, 4096, 32, 32, 64, True, False),
    ("GQA 32/4 varlen d64", 8, 2048, 32, 4, 64, True, True),
    ("causal d256", 2, 4096, 16, 16, 256, True, False),
]


def record_launches(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left=-1, right=-1) -> list[tuple[str, dict, dict]]:
    """(kernel name, runtime args by name, meta) of every launch ``_FlashAttn``'s forward and backward
    make on these (meta-device) inputs, in order; "delta" is the backward's untuned preprocessing
    kernel. Nothing is launched."""
    calls = []

    def capture(name, grid, *args, **meta):
        calls.append((name, dict(zip(fa._KERNELS[name].arg_names, args)), meta))

    delta_args = fa._bwd_delta_kernel.arg_names

    class Delta:  # fa._bwd_delta_kernel[grid](*args, **meta), recorded
        def __getitem__(self, grid):
            return lambda *a, **m: calls.append(("delta", dict(zip(delta_args, a)), m))

    saved = fa._launch, fa._bwd_delta_kernel
    fa._launch, fa._bwd_delta_kernel = capture, Delta()
    try:
        o, _ = fa._FlashAttn.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right)
        o.backward(torch.empty_like(o))
    finally:
        fa._launch, fa._bwd_delta_kernel = saved
    return calls


def meta_launches(shape_q, shape_k, dtype, causal, window=(-1, -1), lens_q=None, lens_k=None):
    """``record_launches`` for q (shape_q) and k/v (shape_k) on the meta device (no memory): fixed
    lengths (B, S, H, D), or packed (total, H, D) sequences of lengths ``lens_q`` / ``lens_k``."""
    q = torch.empty(shape_q, device="meta", dtype=dtype, requires_grad=True)
    k, v = (torch.empty(shape_k, device="meta", dtype=dtype, requires_grad=True) for _ in range(2))
    if lens_q is None:
        cu_q = cu_k = None
        max_q, max_k = shape_q[1], shape_k[1]
    else:
        cu_q, cu_k = (torch.empty(len(lens_q) + 1, device="meta", dtype=torch.int32) for _ in range(2))
        max_q, max_k = max(lens_q), max(lens_k)
    return record_launches(q, k, v, cu_q, cu_k, max_q, max_k, causal, shape_q[-1] ** -0.5, *window)


def captured_launches(B, S, Hq, Hkv, D, causal, varlen, window=(-1, -1),
                      dtype=torch.bfloat16) -> list[tuple[str, dict, dict]]:
    """The autotuned kernels' launches (forward, dK/dV, dQ) for one workload shape."""
    if varlen:
        calls = meta_launches((B * S, Hq, D), (B * S, Hkv, D), dtype, causal, window, [S] * B, [S] * B)
    else:
        calls = meta_launches((B, S, Hq, D), (B, S, Hkv, D), dtype, causal, window)
    return [c for c in calls if c[0] != "delta"]


class CompileOnlyDriver:
    """What Triton's JIT asks the CUDA driver for when it compiles without launching (warmup): the
    device and stream (unused) and the target, an H100/H200."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


def compile_launch(name: str, args: dict, meta: dict, cfg: triton.Config | None = None):
    """Compile one captured launch for sm_90a exactly as the JIT does on a GPU: its warm-up path
    (specialisation, the EVEN heuristic, the cache), with a compile-only driver. ``cfg``: the
    autotune config (None for "delta", which has none). Returns Triton's compiled kernel."""
    triton.runtime.driver.set_active(CompileOnlyDriver())
    if name == "delta":
        return fa._bwd_delta_kernel.warmup(*args.values(), grid=(1,), **meta)
    return fa._KERNELS[name].warmup(*args.values(), grid=(1,), **meta, **cfg.all_kwargs())


def resources(name: str, args: dict, meta: dict, cfg: triton.Config) -> dict:
    """Compile one launch with one config for sm_90a; registers, stack (spill) bytes, shared memory."""
    kernel = compile_launch(name, args, meta, cfg)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    smem = kernel.metadata.shared
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "smem": smem, "fits": smem <= SMEM_LIMIT,
            "wgmma": "wgmma" in kernel.asm["ptx"]}


def configs_for(name: str, d_pad: int, sweep: bool) -> list[triton.Config]:
    if not sweep:
        return fa._configs(name, d_pad)
    grid = itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4))
    return [fa._cfg(bm, bn, w, s) for bm, bn, w, s in grid if not (name == "kv" and bm > 64)]


def cfg_name(cfg: triton.Config) -> str:
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def render(r: dict) -> str:
    """One table per kernel and config list: a row per config, a column per workload using it."""
    lines = [
        f"target: sm_90a (H100/H200) | triton {r['triton']} | {r['date']} | commit {r['commit']} | compiled on a CPU",
        "",
        "Cells: registers per thread / spilled bytes per thread (stack frame; 0 = no spill) / shared memory "
        "in KiB (over 227 cannot launch); `mma` marks a config without Hopper's wgmma instructions. "
        "Configs: BLOCK_M x BLOCK_N, warps, pipeline stages.",
    ]
    groups: dict = {}  # (kernel, config list) -> {config: {workload: cell}}
    for row in r["rows"]:
        groups.setdefault((row["kernel"], row["list"]), {}).setdefault(row["config"], {})[row["workload"]] = row
    titles = {"fwd": "forward", "kv": "backward dK/dV", "q": "backward dQ"}
    for (kernel, clist), configs in groups.items():
        workloads = list(dict.fromkeys(w for cells in configs.values() for w in cells))
        lines += ["", f"{titles[kernel]}, {clist}:", "",
                  "| config | " + " | ".join(workloads) + " |", "|---|" + "---|" * len(workloads)]
        for config, cells in configs.items():
            out = []
            for w in workloads:
                c = cells.get(w, {"error": "not compiled"})
                if "error" in c:
                    out.append(f"error: {c['error']}")
                else:
                    out.append(f"{c['regs']} / {c['stack']} / {c['smem'] / 1024:.0f}{'' if c['fits'] else ' (too big)'}"
                               + ("" if c["wgmma"] else " mma"))
            lines.append(f"| {config} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="a grid of configs instead of the autotune lists")
    ap.add_argument("--workloads", default="", help="comma-separated indices into WORKLOADS (default: all)")
    ap.add_argument("--kernels", default="fwd,kv,q")
    ap.add_argument("--json", type=Path, help="write the results here instead of bench/results/")
    args = ap.parse_args()
    picked = [WORKLOADS[int(i)] for i in args.workloads.split(",")] if args.workloads else WORKLOADS
    rows = []
    for wname, *shape in picked:
        for name, kargs, meta in captured_launches(*shape):
            if name not in args.kernels.split(","):
                continue
            for cfg in configs_for(name, meta["D_PAD"], args.sweep):
                row = {"workload": wname, "kernel": name, "config": cfg_name(cfg),
                       "list": "head dim > 128" if meta["D_PAD"] > 128 else "head dim <= 128"}
                try:
                    row.update(resources(name, kargs, meta, cfg))
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a result too
                    row["error"] = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
                rows.append(row)
                print(row, flush=True)
    result = {"triton": triton.__version__, "date": datetime.date.today().isoformat(), "commit": commit(),
              "target": "sm_90a", "sweep": args.sweep, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(render(result))
    else:  # the docs show the autotune lists on every workload
        publish("kernel_resources_sweep" if args.sweep else "kernel_resources", result, render(result),
                docs=not args.sweep and not args.workloads and args.kernels == "fwd,kv,q")
    return 0


if __name__ == "__main__":
    sys.exit(main())
