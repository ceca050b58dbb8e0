"""Loading an HF checkpoint, lmstack vs Hugging Face transformers, and why lmstack copies the weights.

``lmstack.from_hf`` streams each tensor into a model allocated once in the target dtype (its own
memory). transformers 5's ``from_pretrained`` keeps the tensors safetensors returns, which are
copy-on-write views of the mapped file: nearly no anonymous memory and a quick load. This script
measures both on the same checkpoint (a random ``--model`` preset written with ``lmstack.to_hf``):
seconds to load and to the first forward pass, anonymous memory and peak resident set, each in a
fresh process (page cache warm: the file is read once first), best of ``--repeats`` alternating
runs; then greedy batch-1 decoding with lmstack on its copied weights and on the same weights
mapped from the file, alternating, best of ``--repeats``.

    python bench/load_vs_hf.py [--model llama-1.1b] [--dtype bf16] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import meta, publish  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def memory_mb() -> tuple[int, int]:
    """(anonymous resident memory, peak resident set) of this process, MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def child(which: str, folder: str) -> None:
    """One load in this fresh process; prints a JSON line."""
    import importlib

    import lmstack
    from transformers import AutoModelForCausalLM

    importlib.import_module("transformers.models.llama.modeling_llama")  # imported before the clock starts, as lmstack is

    t = time.perf_counter()
    model = lmstack.from_hf(folder) if which == "lmstack" else AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    load = time.perf_counter() - t
    anon, _ = memory_mb()
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 8)))
    first = time.perf_counter() - t
    print(json.dumps({"load_s": load, "first_forward_s": first, "anon_mb": anon, "peak_rss_mb": memory_mb()[1]}))


def write_checkpoint(preset: str, dtype: torch.dtype, folder: Path) -> int:
    import lmstack

    model = lmstack.Transformer.empty(lmstack.ModelConfig.from_preset(preset), dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lmstack.to_hf(model, folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_layouts(model, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each parameter's tensor as ``from_hf`` loaded it ("copied") and as the file's mapped view ("mapped")."""
    from lmstack.interop.hf import _hf_name
    from lmstack.io import open_safetensors

    where = {k: h for h in map(open_safetensors, sorted(folder.glob("*.safetensors"))) for k in h.keys()}
    params = dict(model.named_parameters())
    return {"copied": {n: p.data for n, p in params.items()},
            "mapped": {n: where[_hf_name(n)].get_tensor(_hf_name(n)) for n in params}}


def decode_rates(folder: Path, tokens: int, repeats: int) -> dict:
    """Greedy batch-1 tokens/s of lmstack with its own copy of the weights and with the file's mapped
    views, and whether both decoded the same tokens."""
    import lmstack

    model = lmstack.from_hf(folder)
    params = dict(model.named_parameters())
    layouts = weight_layouts(model, folder)
    prompt = [list(range(1, 33))]
    best, outs = {k: 0.0 for k in layouts}, {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, tensors in layouts.items():
            for n, t in tensors.items():
                params[n].data = t
            t0 = time.perf_counter()
            outs[name] = lmstack.generate(model, prompt, max_new_tokens=tokens).sequences
            best[name] = max(best[name], tokens / (time.perf_counter() - t0))
    return {**best, "same_tokens": torch.equal(outs["copied"], outs["mapped"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1.1b")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=20)
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("LIBRARY", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(*args.child)
        return 0
    results = {**meta(), "model": args.model, "dtype": args.dtype, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        results["weights_mb"] = write_checkpoint(args.model, DTYPES[args.dtype], folder) // 2**20
        for f in folder.glob("*.safetensors"):  # into the page cache, for both alike
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        runs = {"lmstack": [], "hf": []}
        for _ in range(args.repeats):
            for lib in runs:
                out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", lib, str(folder)],
                                     capture_output=True, text=True, check=True)
                runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(lib, runs[lib][-1], flush=True)
        results["load"] = {lib: {k: min(r[k] for r in rs) for k in rs[0]} for lib, rs in runs.items()}
        results["decode_tok_s"] = decode_rates(folder, args.decode_tokens, args.repeats)
    publish("load_vs_hf", results, render(results), docs=not args.no_docs)
    return 0


def render(r: dict) -> str:
    rows = [f"device: {r['device']} | torch {r['torch']} | transformers {r['transformers']} | {r['date']} | commit {r['commit']}",
            f"model: `{r['model']}` shape, {r['dtype']}, {r['weights_mb']:,} MB of weights; best of {r['repeats']} fresh "
            f"processes each, page cache warm", "",
            "| library | load s | load + first forward s | anonymous memory MB | peak resident MB |", "|---|---|---|---|---|"]
    for lib, v in r["load"].items():
        rows.append(f"| {lib} | {v['load_s']:.2f} | {v['first_forward_s']:.2f} | {v['anon_mb']:,} | {v['peak_rss_mb']:,} |")
    d = r["decode_tok_s"]
    rows += ["", f"lmstack greedy batch-1 decode, {r['dtype']}: {d['copied']:.2f} tok/s on its own copy of the weights, "
                 f"{d['mapped']:.2f} on the file's mapped pages ({d['mapped'] / d['copied'] - 1:+.0%})"]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
