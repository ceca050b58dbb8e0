"""Decoding speed, lmstack vs Hugging Face transformers, same weights, one run.

Three workloads, each with every library's own ``generate`` and no EOS (every row decodes all
``--new-tokens`` tokens after a ``--prompt-len``-token prompt):
  greedy batch 1, greedy batch 8, and beam search with 4 beams (batch 1); on the CPU a fourth, beam
  sampling with 4 beams (temperature 1, top-k 50, both libraries seeded alike, so the tokens agree
  with a transformers that sorts the drawn candidates, 5.24).
tokens/s counts generated positions per prompt row: batch 8 counts 8 per step, beam search 1 per
step however many beams it keeps. Timings are the best of ``--repeats`` rounds after a warm-up
(compilation excluded), the libraries taking turns within each round. The script also reports
whether both libraries produced the same tokens.

``--guidance S`` times classifier-free guidance instead (HF's ``guidance_scale=S`` with a
negative prompt of half ``--prompt-len`` random tokens, in both libraries): greedy batch 1 and
batch 8 with it and, in the same run for its cost, without; written to
decode_vs_hf_guidance[...].json.

``--return-sequences K`` times sampling (temperature 1, top-k 50) of 1 and of K samples per
prompt (HF's ``num_return_sequences``: it repeats the prompt K times before its prefill, lmstack
prefills it once and copies its cache rows), at batch 1; tokens/s counts every sample's tokens.
Written to decode_vs_hf_samples[...].json. Use a long ``--prompt-len``: the prefill is what differs.

CPU (default): the ``tiny`` preset in fp32. GPU: ``--device cuda --model llama-1.1b --dtype bf16``
also runs transformers with its static cache (``cache_implementation="static"``), the setting its
docs recommend for speed (generate then compiles the forward); there "lmstack+compile" is our
static cache with CUDA graphs (``generate(compile=True)``'s default on CUDA), and the JSON records
how many compiled graphs fell back from CUDA graphs (``cudagraph_skips``, 0 expected). Weights are
random, scaled up so the next-token distributions are peaked like a trained model's (no near-ties
between the libraries).

Writes bench/results/decode_vs_hf[_<device>][_<dtype>][_<model>][_<tag>].json (no suffixes for
``tiny`` on the CPU in fp32 or ``llama-1.1b`` on CUDA in bf16; ``--tag`` names another host) and a
table in docs/benchmarks.md (``--redraw`` redoes every such table from its JSON).

    python bench/decode_vs_hf.py [--threads 2] [--new-tokens 200] [--repeats 5]
    python bench/decode_vs_hf.py --device cuda --model llama-1.1b --dtype bf16
    python bench/decode_vs_hf.py --guidance 1.5 [--tag avx512]
    python bench/decode_vs_hf.py --return-sequences 8 --prompt-len 192 --new-tokens 32 [--tag avx512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lmstack
from lmstack.generate import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, hf_twin, meta, publish, update_docs  # noqa: E402

WORKLOADS = {"greedy batch 1": (1, 1), "greedy batch 8": (8, 1), "beam search, 4 beams": (1, 4)}
CPU_WORKLOADS = {"beam sampling, 4 beams": (1, 4)}  # not on the GPU: its session script has a fixed budget
SAMPLING = {"temperature": 1.0, "top_k": 50}  # HF's generate(do_sample=True) defaults, given to both
SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fns: dict, repeats: int, device: torch.device, optional: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Best wall time of each of ``fns`` over ``repeats`` rounds, after one warm-up call each, and
    its last output. The contenders take turns within each round, so a slow spell of a shared
    machine hits all of them instead of whichever ran then. A contender named in ``optional`` whose
    warm-up raises is left out (reported, timed as None) instead of ending the run."""
    fns, outs = dict(fns), {}  # the caller's dict stays as it was
    for name, fn in list(fns.items()):
        try:
            outs[name] = fn()
        except Exception as e:  # noqa: BLE001 - another library's optional mode; ours must not fail
            if name not in optional:
                raise
            print(f"  {name} left out: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            del fns[name]
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t)
    return best, outs


def build(args, device, dtype):
    cfg = lmstack.ModelConfig.from_preset(args.model)
    torch.manual_seed(0)
    with torch.device(device):
        ours = lmstack.Transformer(cfg)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" not in name:
                p.mul_(args.weight_scale)
    ours = ours.to(dtype).eval()
    return cfg, ours, hf_twin(ours).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="ModelConfig preset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weight-scale", type=float, default=3.0)
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--tag", default="", help="suffix for the result's name (another host: _<tag>)")
    ap.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                    help="time greedy batch 1 and 8 with classifier-free guidance at this scale (and a negative "
                         "prompt), and without, instead of the usual workloads")
    ap.add_argument("--return-sequences", type=int, default=None, metavar="K",
                    help="time sampling 1 and K samples per prompt (num_return_sequences) instead of the usual "
                         "workloads")
    ap.add_argument("--redraw", action="store_true",
                    help="measure nothing: redo the docs tables of every bench/results/decode_vs_hf*.json")
    args = ap.parse_args()
    if args.redraw:
        for path in sorted((ROOT / "bench" / "results").glob("decode_vs_hf*.json")):
            update_docs(path.stem, render(json.loads(path.read_text())))
            print(f"redrew {path.stem}")
        return 0
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; nothing measured")
        return 0
    torch.set_num_threads(args.threads)
    cfg, ours, theirs = build(args, device, dtype)
    N = args.new_tokens
    if args.prompt_len + N > cfg.max_seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens = {args.prompt_len + N} exceeds the context {cfg.max_seq_len}")
    g = torch.Generator().manual_seed(1)

    # decode_vs_hf.json is tiny on the CPU in fp32, decode_vs_hf_cuda.json llama-1.1b on the GPU in
    # bf16; another dtype or model adds its name
    cpu = device.type == "cpu"
    result_name = "decode_vs_hf" + ("" if cpu else f"_{device.type}")
    result_name += "" if args.dtype == ("fp32" if cpu else "bf16") else f"_{args.dtype}"
    result_name += "" if args.model == ("tiny" if cpu else "llama-1.1b") else f"_{args.model}"
    if args.guidance is not None and args.return_sequences is not None:
        raise SystemExit("pass --guidance or --return-sequences, not both")
    if args.return_sequences is not None and args.return_sequences < 2:
        raise SystemExit(f"--return-sequences {args.return_sequences}: pass K >= 2 (it is timed against 1)")
    result_name += "_guidance" if args.guidance is not None else ""
    result_name += "_samples" if args.return_sequences is not None else ""
    result_name += f"_{args.tag}" if args.tag else ""
    variants = {"lmstack": {}, "lmstack+compile": {"compile": True}}
    results = {"meta": meta(), "model": args.model, "dtype": args.dtype, "prompt_len": args.prompt_len,
               "new_tokens": N, "repeats": args.repeats, "weight_scale": args.weight_scale, "threads": args.threads,
               "workloads": {}}
    workloads = {**WORKLOADS, **(CPU_WORKLOADS if cpu else {})}
    if args.guidance is not None:
        results["guidance_scale"], results["negative_prompt_len"] = args.guidance, max(1, args.prompt_len // 2)
        workloads = {}
        for B in (1, 8):
            workloads[f"greedy batch {B}"] = (B, 1)
            workloads[f"greedy batch {B}, guidance {args.guidance:g}"] = (B, 1)
    samples = {}  # workload: samples per prompt (num_return_sequences)
    if args.return_sequences is not None:
        results["return_sequences"] = args.return_sequences
        samples = {"sampling, 1 sample": 1, f"sampling, {args.return_sequences} samples": args.return_sequences}
        workloads = dict.fromkeys(samples, (1, 1))
    for wl, (B, beams) in workloads.items():
        ids = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).to(device)
        sampled = wl in CPU_WORKLOADS or wl in samples
        K = samples.get(wl, 1)
        shared = {} if "guidance" not in wl else dict(  # keywords of HF's that both libraries take
            guidance_scale=args.guidance,
            negative_prompt_ids=torch.randint(0, cfg.vocab_size, (B, results["negative_prompt_len"]), generator=g).to(device))
        ours_kw = dict(SAMPLING, seed=SEED) if sampled else {}
        if K > 1:
            shared["num_return_sequences"] = K
        ours_kw.update(shared)
        fns = {name: (lambda kw=kw: generate(ours, ids, N, num_beams=beams, **ours_kw, **kw).sequences)
               for name, kw in variants.items()}
        hf_runs = {"hf": {}}
        if device.type == "cuda":
            # transformers compiles the forward itself when the cache is static (on CUDA)
            hf_runs["hf static cache"] = {"cache_implementation": "static"}
        for name, kw in hf_runs.items():
            def hf(kw=kw):
                if sampled:
                    torch.manual_seed(SEED)  # HF draws from the global generator; lmstack's seed=SEED is the same stream
                return theirs.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                    do_sample=sampled, num_beams=beams, early_stopping=False, **(SAMPLING if sampled else {}), **shared,
                    **kw)
            fns[name] = hf
        with torch.inference_mode():
            best, outs = timed(fns, args.repeats, device, optional=("hf static cache",))
        for name, out in outs.items():  # tokens/s credits B x K x N tokens: each side must have made them all
            if tuple(out.shape) != (B * K, args.prompt_len + N):
                raise SystemExit(f"{wl}: {name} returned {tuple(out.shape)} tokens, not ({B * K}, {args.prompt_len} + "
                                 f"{N}); its tokens/s would count tokens it did not generate")
        row: dict = {name: B * K * N / best[name] if name in best else None for name in [*variants, *hf_runs]}
        print(f"{wl}: " + ", ".join(f"{name} {rate(v)} tok/s" for name, v in row.items() if v is not None), flush=True)
        row["same_tokens"] = all(torch.equal(o, outs["hf"]) for o in outs.values())
        # per row of each lmstack variant: the first new token that differs from HF's (None: none does)
        row["first_difference"] = {name: first_differences(outs[name], outs["hf"], args.prompt_len) for name in variants}
        results["workloads"][wl] = row
        publish(result_name, results, render(results), docs=not args.no_docs, echo=False)  # a run cut short keeps these

    if device.type == "cuda":
        from torch._dynamo.utils import counters

        results["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        print(f"compiled graphs that fell back from CUDA graphs: {results['cudagraph_skips']}")
    publish(result_name, results, render(results), docs=not args.no_docs)
    return 0


def first_differences(ours: torch.Tensor, theirs: torch.Tensor, prompt_len: int) -> list[int | None]:
    differ = ours[:, prompt_len:] != theirs[:, prompt_len:]
    return [int(d.nonzero()[0]) + 1 if d.any() else None for d in differ]  # 1 = the first new token


def same_cell(row: dict) -> str:
    """"True", or "False" with how many rows part from HF's tokens, and where (over both variants)."""
    if row["same_tokens"] or "first_difference" not in row:
        return str(row["same_tokens"])
    firsts = [min((f for f in col if f is not None), default=None) for col in zip(*row["first_difference"].values())]
    parted = [f for f in firsts if f is not None]
    where = f"token {parted[0]}" if len(set(parted)) == 1 else f"tokens {min(parted)}-{max(parted)}"
    return f"False ({len(parted)}/{len(firsts)} rows part at new {where})"


def rate(v: float) -> str:
    """tokens/s for a table: whole numbers from 100 up, three significant digits below (a 1B model on a CPU)."""
    return f"{v:,.0f}" if v >= 99.95 else f"{v:#.3g}"


def render(r: dict) -> str:
    m = r["meta"]
    names = [k for k in next(iter(r["workloads"].values())) if k not in ("same_tokens", "first_difference")]
    theirs = [n for n in names if n.startswith("hf")]
    lines = [
        f"device: {m['device']} | torch {m['torch']} | transformers {m['transformers']} | {m['date']} | "
        f"commit {m['commit']}",
        f"model: `{r['model']}` preset, {r['dtype']}, {r['prompt_len']}-token prompts, {r['new_tokens']} new tokens; "
        "tokens/s = generated positions per prompt row per second"
        + (f", best of {r['repeats']} rounds" if "repeats" in r else "")
        + (f"; \"guidance\" rows: guidance_scale {r['guidance_scale']:g}, a {r['negative_prompt_len']}-token negative "
           "prompt per row"
           if "guidance_scale" in r else "")
        + ("; every sample's tokens counted" if "return_sequences" in r else ""),
        "",
        "| workload | " + " | ".join(names) + " | lmstack / HF | lmstack+compile / HF | same tokens |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for wl, row in r["workloads"].items():
        cells = ["—" if row[n] is None else rate(row[n]) for n in names]
        ratios = [f"{row['lmstack'] / row['hf']:.2f}x", f"{row['lmstack+compile'] / row['hf']:.2f}x"]
        lines.append(f"| {wl} | " + " | ".join(cells + ratios) + f" | {same_cell(row)} |")
    if len(theirs) > 1:
        lines.append("\nHF's static cache row is transformers' fastest documented setting; ratios are against its default.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
