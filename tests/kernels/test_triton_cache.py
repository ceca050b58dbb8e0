"""bench/triton_cache.py: kernels compiled ahead on a CPU load from the cache instead of compiling.

The tool compiles through the JIT's own warm-up path with a compile-only stand-in for the CUDA
driver, prunes each cache entry to its metadata and binary, and packs the cache. Here it runs on
one workload under this machine's Triton (keys as this installation computes them), the archive is
unpacked into an emptied cache directory as on the GPU machine, and the same launches are warmed
again in a fresh process: every one must be a cache hit (no new entry, no compile), and each loaded
kernel must still carry its binary; the host code's own launches (``_launch``) must hit the same
entries. Subprocesses: the interpreter must be off when the kernels are decorated.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

from . import require_kernels  # noqa: E402

require_kernels(tools=True)

ROOT = Path(__file__).resolve().parents[2]
LABEL = "test backend"  # fp32, head dim 16: the quickest workload to compile

REWARM = """
import json, sys
sys.path.insert(0, "bench")
import triton_cache as tc

work = next(w for w in tc.test_work() if w.label == sys.argv[1])
calls = tc.launches(work)
kernels = [k for call in calls for k in tc.warm(*call)]
# the host code's own launch (fp32: one fixed config) finds its kernel in the cache too, and gets as
# far as the launch itself, which the compile-only driver warm() left active cannot do
reached_launch = []
for name, args, meta in calls:
    if name != "delta":
        try:
            tc.fa._launch(name, (1, 1, 1), *args.values(), **meta)
        except AttributeError as e:
            reached_launch.append("launcher_cls" in str(e))
print("RESULT " + json.dumps({"kernels": len(kernels), "with_binary": sum(bool(k.asm.get("cubin")) for k in kernels),
                              "reached_launch": reached_launch}))
"""


def _env(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    return env


def _entries(cache_dir):
    return sorted(p.parent.name for p in Path(cache_dir).glob("*/*.cubin"))


def test_kernels_compiled_ahead_load_from_the_cache(tmp_path):
    cache, archive = tmp_path / "cache", tmp_path / "cache.tar.gz"
    r = subprocess.run([sys.executable, "bench/triton_cache.py", "--same-python", "--only", "tests", "--only-label", LABEL,
                        "--jobs", "1", "--cache-dir", str(cache), "--out", str(archive)],
                       cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((cache / "manifest.json").read_text())
    built = _entries(cache)
    assert manifest["entries"] == len(built) > 0 and manifest["workloads"] == 1
    assert {p.suffix for p in cache.glob("*/*")} == {".json", ".cubin"}  # the IR text is pruned

    # the GPU machine's side: an emptied cache directory, the archive unpacked into it
    for p in sorted(cache.glob("**/*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    with tarfile.open(archive) as tar:
        tar.extractall(cache, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    assert _entries(cache) == built

    r = subprocess.run([sys.executable, "-c", REWARM, LABEL], cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["kernels"] == out["with_binary"] > 0, out
    assert out["reached_launch"] == [True, True, True], out  # forward, dK/dV, dQ
    assert _entries(cache) == built, "a kernel compiled again instead of loading from the cache"
