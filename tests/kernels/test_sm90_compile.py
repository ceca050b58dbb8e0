"""The Triton kernels compile for a Hopper GPU (sm_90a) on any machine.

CI has no GPU and the numerical tests run the kernels through Triton's interpreter, which never
invokes the compiler: a kernel the interpreter accepts but the compiler rejects (a layout, a
constexpr, a dtype it cannot lower) would first fail on a GPU. Here each kernel is compiled ahead
of time for sm_90a with the arguments the host code really passes (bench/kernel_resources.py
captures them from ``_FlashAttn`` on meta tensors), one case per code path: causal and full, fixed
and packed lengths, a window, a padded head dim, GQA, bf16 / fp16 / fp32. It runs in a subprocess
because the interpreter must be off when the kernels are decorated.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from . import require_kernels  # noqa: E402

require_kernels(tools=True)

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys, torch
sys.path.insert(0, "bench")
import kernel_resources as kr
cases = [  # (B, S, Hq, Hkv, D, causal, varlen, window, dtype)
    (2, 256, 4, 4, 128, True, False, (-1, -1), torch.bfloat16),
    (2, 200, 8, 2, 64, False, True, (-1, -1), torch.bfloat16),
    (1, 130, 4, 1, 96, True, False, (31, -1), torch.float16),
    (3, 77, 4, 2, 32, False, True, (5, 3), torch.float32),
]
out = []
for i, (*shape, window, dtype) in enumerate(cases):
    for name, args, meta in kr.captured_launches(*shape, window=window, dtype=dtype):
        cfg = kr.fa._configs(name, meta["D_PAD"])[-1]  # the small config every dtype fits
        out.append({"case": i, "kernel": name, **kr.resources(name, args, meta, cfg)})
print("RESULT " + json.dumps(out))
"""


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert [(row["case"], row["kernel"]) for row in rows] == [(i, k) for i in range(4) for k in ("fwd", "kv", "q")]
    for row in rows:
        assert 0 < row["regs"] <= 255 and row["smem"] > 0 and row["fits"], row
