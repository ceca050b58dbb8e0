"""Compile, on a CPU, every FlashAttention kernel the GPU session will launch, into a Triton cache
the GPU machine loads instead of compiling.

A lent GPU comes with 15 minutes of device time, and Triton compiles each kernel variant there on
first use, about 2 s apiece: the autotuner alone compiles 16 configs per (head dim, mask) key, and
the GPU session's tests and benchmarks launch a few hundred variants, minutes of device time spent
compiling. Compilation needs no GPU (bench/kernel_resources.py already builds sm_90a binaries on
this machine), so this script builds them here, through the JIT's own warm-up path (a compile-only
stand-in for the CUDA driver), so each lands in the cache under exactly the key the GPU machine's
JIT computes. The key covers each kernel's source and its first line's number, so rebuild the
cache at the commit the GPU session runs (the manifest records it).

That key hashes Triton's own files, libtriton.so included, and libtriton.so differs between Python
versions: the GPU machine runs Python 3.12, so the key is taken from the cp312 wheel of the same
Triton version (its Python files must equal the installed ones; the script checks). Run it with
the GPU machine's Triton (3.6.0):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 -d .whl triton==3.6.0
    PYTHONPATH=src <python with triton 3.6.0> bench/triton_cache.py

It writes .triton-cache.tar.gz (git-ignored; carry it in the `run` call): binaries and metadata
only, under /tmp/lmstack-triton-cache, where bench/gpu_session.sh unpacks it and points
TRITON_CACHE_DIR. A stale or mismatched cache costs nothing but the compiles it would have saved;
gpu_session.sh reports how many kernels the GPU still had to compile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path("/tmp/lmstack-triton-cache")  # the same absolute path on both machines (the cache's
# group files name their members by absolute path)
ROOT = Path(__file__).resolve().parents[1]

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.cache as triton_cache  # noqa: E402

import lmstack  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import kernel_resources as kr  # noqa: E402
from common import commit  # noqa: E402

fa = kr.fa


@dataclass
class Work:
    """One call of the attention kernels (forward and backward). Packed (varlen) when lens_q is given:
    q is then (sum(lens_q), Hq, D) and k/v (sum(lens_k), Hkv, D)."""
    label: str
    q: tuple
    k: tuple
    dtype: torch.dtype
    causal: bool
    window: tuple = (-1, -1)
    lens_q: list | None = None
    lens_k: list | None = None


def _fixed(label, B, Sq, Sk, Hq, Hkv, D, causal, window, dtype):
    return Work(label, (B, Sq, Hq, D), (B, Sk, Hkv, D), dtype, causal, tuple(window))


def _packed(label, lens_q, lens_k, Hq, Hkv, D, causal, window, dtype):
    lens_k = lens_k or lens_q
    return Work(label, (sum(lens_q), Hq, D), (sum(lens_k), Hkv, D), dtype, causal, tuple(window), lens_q, lens_k)


def bench_work() -> list[Work]:
    """bench/attention.py: its kernel grid and every batch of its training part; the prefills of
    bench/decode_vs_hf.py."""
    import attention

    works = [_fixed(f"grid B={B} H={H} S={S} D={D} causal={causal}", B, S, S, H, H, D, causal, (-1, -1),
                    torch.bfloat16) for B, H, S, D, causal in attention.GRID]
    cfg = lmstack.ModelConfig.from_preset("llama-1.1b")
    Hq, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    packed, padded = attention.training_batches(8, 2048, cfg.vocab_size)
    for i, (_, _, seqs, _) in enumerate(packed):
        lens = (seqs.cu_seqlens[1:] - seqs.cu_seqlens[:-1]).tolist()
        works.append(_packed(f"train packed {i}", lens, None, Hq, Hkv, D, True, (-1, -1), torch.bfloat16))
    for i, (x, _, _, _) in enumerate(padded):
        B, L = x.shape
        works.append(_fixed(f"train padded {i}", B, L, L, Hq, Hkv, D, True, (-1, -1), torch.bfloat16))
    # bench/decode_vs_hf.py's prefills (32-token prompts; beam search prefills one row)
    works += [_fixed(f"decode prefill batch {B}", B, 32, 32, Hq, Hkv, D, True, (-1, -1), torch.bfloat16)
              for B in (1, 8)]
    return works


def test_work() -> list[Work]:
    """tests/kernels/test_flash_attention.py as it runs on a GPU: its case tables, plus the shapes
    its other tests write inline."""
    from tests.kernels import test_flash_attention as T

    works = [_fixed(f"test {n}", *c, torch.float32) for n, c in T.CASES.items()]
    works += [_packed(f"test varlen {n}", lq, lk, Hq, Hkv, 32, causal, w, torch.float32)
              for n, (lq, lk, Hq, Hkv, causal, w) in T.VARLEN_CASES.items()]
    works += [_fixed(f"test bf16 {n}", *c, torch.bfloat16) for n, c in T.GPU_CASES.items()]
    works.append(_packed("test bf16 varlen", T.GPU_VARLEN_LENGTHS, None, 16, 4, 128, True, (-1, -1), torch.bfloat16))
    works += [_fixed(f"test half {dt}", 1, 40, 40, 2, 1, 64, True, (-1, -1), dt) for dt in (torch.float16, torch.bfloat16)]
    works.append(_fixed("test strided", 2, 21, 21, 4, 2, 32, True, (-1, -1), torch.float32))
    # test_attention_backend_triton and the tiny transformer: head dim 16, 2 query heads, 1 KV head
    for label, causal_shape in (("backend", (2, 21, 21)), ("decode-cache", (2, 5, 21))):
        B, Sq, Sk = causal_shape
        works.append(_fixed(f"test {label}", B, Sq, Sk, 2, 1, 16, True, (-1, -1), torch.float32))
    works.append(_fixed("test backend window", 2, 21, 21, 2, 1, 16, True, (5, -1), torch.float32))
    for lens in ([4, 16, 1, 21], [5, 9, 7, 1, 20]):
        works.append(_packed(f"test docs {lens}", lens, None, 2, 1, 16, True, (-1, -1), torch.float32))
    works.append(_packed("test docs-window", [4, 16, 1, 21], None, 2, 1, 16, True, (5, -1), torch.float32))
    return works


def launches(w: Work) -> list[tuple[str, dict, dict]]:
    return kr.meta_launches(w.q, w.k, w.dtype, w.causal, w.window, w.lens_q, w.lens_k)


def warm(name: str, args: dict, meta: dict) -> list:
    """Compile one launch as a GPU would, every config its autotuner tries. Returns the compiled
    kernels (cache hits load instead)."""
    if name == "delta":
        return [kr.compile_launch(name, args, meta)]
    return [kr.compile_launch(name, args, meta, cfg) for cfg in fa._gpu_configs(name, meta)]


def warm_work(w: Work) -> tuple[str, int]:
    return w.label, sum(len(warm(*call)) for call in launches(w))


def _sha256(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def use_wheel_key(wheel: Path) -> str:
    """Make this process compute Triton cache keys as the installation from ``wheel`` does: the same
    key but for libtriton.so's hash (the Python files must be identical). Returns the key's sha256."""
    pkg = Path(triton.__file__).parent
    with zipfile.ZipFile(wheel) as z:
        version = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        version = version.split("-")[1].split(".dist")[0]
        if version != triton.__version__:
            raise SystemExit(f"{wheel.name} is triton {version}, this python has {triton.__version__}: "
                             "install the GPU machine's version here")
        differ = [n for n in z.namelist() if n.endswith(".py") and n.startswith("triton/")
                  and z.read(n) != (pkg.parent / n).read_bytes()]
        if differ:
            raise SystemExit(f"{len(differ)} Python files of {wheel.name} differ from the installed ones "
                             f"(first: {differ[0]}): install that wheel's build here")
        theirs = _sha256(z.open("triton/_C/libtriton.so"))
    with open(pkg / "_C" / "libtriton.so", "rb") as f:
        mine = _sha256(f)
    key = triton_cache.triton_key()
    if mine not in key:
        raise SystemExit("this triton's cache key does not contain libtriton.so's sha256: unknown key layout")
    key = key.replace(mine, theirs)
    triton_cache.triton_key = lambda: key  # read through the module by get_cache_key
    return hashlib.sha256(key.encode()).hexdigest()


def key_digest() -> str:
    """sha256 of this installation's Triton cache key (gpu_session.sh compares it with the manifest)."""
    return hashlib.sha256(triton_cache.triton_key().encode()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", type=Path, help="the GPU machine's Triton wheel (default: .whl/triton-<ver>-cp312-*.whl)")
    ap.add_argument("--same-python", action="store_true", help="keys as this installation computes them (no wheel)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    ap.add_argument("--out", type=Path, default=ROOT / ".triton-cache.tar.gz")
    ap.add_argument("--only", choices=("bench", "tests", "all"), default="all")
    ap.add_argument("--only-label", help="just the workloads whose label is this (a quick check)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = ap.parse_args()
    if args.same_python:
        digest = key_digest()
    else:
        wheel = args.wheel or next(iter(sorted((ROOT / ".whl").glob(f"triton-{triton.__version__}-cp312-*.whl"))), None)
        if wheel is None:
            raise SystemExit(f"no .whl/triton-{triton.__version__}-cp312-*.whl: download it (see this script's "
                             "docstring) or pass --wheel / --same-python")
        digest = use_wheel_key(wheel)
    works = (bench_work() if args.only != "tests" else []) + (test_work() if args.only != "bench" else [])
    if args.only_label:
        labels = [w.label for w in works]
        works = [w for w in works if w.label == args.only_label]
        if not works:
            raise SystemExit(f"no workload is labelled {args.only_label!r}; the labels: {', '.join(labels)}")
    if args.cache_dir.exists() and any(args.cache_dir.iterdir()):
        if not (args.cache_dir / "manifest.json").exists():  # never empty a directory this did not make
            raise SystemExit(f"{args.cache_dir} is not empty and holds no manifest.json from this script: "
                             "pass a new or empty --cache-dir")
        shutil.rmtree(args.cache_dir)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    (args.cache_dir / "manifest.json").write_text('{"complete": false}\n')  # marks the directory as this script's
    os.environ["TRITON_CACHE_DIR"] = str(args.cache_dir)

    t0, compiled = time.perf_counter(), 0
    # forked workers inherit the patched key; Triton's cache takes concurrent writers
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for i, (label, n) in enumerate(pool.imap_unordered(warm_work, works)):
            compiled += n
            print(f"[{i + 1}/{len(works)}] {label}: {n} compiles, {time.perf_counter() - t0:.0f} s", flush=True)
    entries = prune(args.cache_dir)
    manifest = {"complete": True, "triton": triton.__version__, "triton_key_sha256": digest, "commit": commit(),
                "entries": entries, "workloads": len(works), "compile_s": round(time.perf_counter() - t0)}
    (args.cache_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(args.cache_dir, arcname=".")
    tmp.replace(args.out)
    print(f"{compiled} launches compiled into {entries} cache entries in {manifest['compile_s']} s; "
          f"{args.out} is {args.out.stat().st_size / 2**20:.1f} MiB (key {digest[:12]})")
    return 0


def prune(cache_dir: Path) -> int:
    """Keep what loading a compiled kernel reads (its metadata and binary); drop the IR text."""
    entries = 0
    for d in filter(Path.is_dir, cache_dir.iterdir()):
        entries += any(f.suffix == ".cubin" for f in d.iterdir())
        for f in d.iterdir():
            if f.suffix not in (".json", ".cubin"):
                f.unlink()
    return entries


if __name__ == "__main__":
    sys.exit(main())
