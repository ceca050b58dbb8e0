"""lmstack vs Hugging Face transformers on the same tiny model, same weights, same data, one run.

Measures, on whatever device this runs on (CPU by default):
  1. training throughput (tokens/s): forward + backward + AdamW step, batch 16 x 256;
  2. greedy batch-1 decode throughput (tokens/s): 200 new tokens after a 32-token prompt, with each
     library's own ``generate`` (and checks that both produce the same tokens);
  3. validation bits per byte reached in the same wall-clock training budget (time-based
     warmup + cosine schedule, identical initial weights and batch order).

Writes bench/results/cpu_vs_hf.json and updates the table in docs/benchmarks.md.

    python bench/cpu_vs_hf.py [--budget 120] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lmstack
from lmstack.data.corpus import load_dataset, prepare_shakespeare
from lmstack.data.packing import get_windows, sample_batch
from lmstack.generate import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, hf_twin, meta, publish  # noqa: E402


def lm_loss(model, x, y):
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def hf_loss(model, x, y):
    # What an HF user writes: labels = inputs, the model shifts internally. We pass the unshifted
    # window (x plus the last target) so both see exactly the same prediction problems.
    ids = torch.cat([x, y[:, -1:]], dim=1)
    return model(input_ids=ids, labels=ids).loss


def train_throughput(model, loss_fn, data, B, T, steps=8, warmup=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for i in range(steps + warmup):
        x, y = sample_batch(data.train, B, T, g)
        t = time.perf_counter()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    return B * T / times[len(times) // 2]  # median step


def decode_throughput(run, repeats=3):
    best = 0.0
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = run()
        best = max(best, NEW_TOKENS / (time.perf_counter() - t))
    return best, out


@torch.no_grad()
def val_bpb(forward, data, T, token_bytes, batch=16):
    val = data.val
    n = (len(val) - 1) // T
    nats, nbytes = 0.0, 0
    for i in range(0, n, batch):
        x, y = get_windows(val, [j * T for j in range(i, min(n, i + batch))], T)
        nll = F.cross_entropy(forward(x).float().flatten(0, 1), y.flatten(), reduction="none")
        b = token_bytes[y.flatten()]
        nats += (nll * (b > 0)).sum().item()
        nbytes += b.sum().item()
    return nats / math.log(2) / nbytes


def train_for_budget(model, loss_fn, data, B, T, budget, lr=3e-3, warmup_frac=0.05):
    """Train for `budget` seconds with a time-based warmup + cosine schedule; return steps taken."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    model.train()
    start, steps = time.perf_counter(), 0
    while (frac := (time.perf_counter() - start) / budget) < 1.0:
        scale = frac / warmup_frac if frac < warmup_frac else 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, scale)
        x, y = sample_batch(data.train, B, T, g)
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    model.eval()
    return steps


NEW_TOKENS = 200


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of training per library for the bpb race")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-hf-compile", action="store_true", help="skip the HF + torch.compile training row")
    ap.add_argument("--skip-race", action="store_true", help="keep the race result already in the JSON")
    ap.add_argument("--race-only", action="store_true", help="only the bits-per-byte race (keeps the other results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        data = load_dataset("shakespeare")
    except Exception:
        prepare_shakespeare()
        data = load_dataset("shakespeare")
    token_bytes = torch.from_numpy(data.tokenizer().token_bytes().astype("int64"))
    B, T = args.batch, args.seq
    cfg = lmstack.ModelConfig.from_preset("tiny", vocab_size=data.vocab_size)
    results: dict = {"config": cfg.to_dict(), "batch": B, "seq_len": T, "threads": args.threads}

    out = ROOT / "bench" / "results" / "cpu_vs_hf.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.race_only:  # the speed rows (and their meta: device, date, commit) stay the earlier run's
        if not {"train_tok_s", "decode_tok_s", "meta"} <= previous.keys():
            raise SystemExit(f"--race-only keeps the speed rows of an earlier run, and {out} holds none; run without it")
        results = previous
    else:
        results.update(measure_speed(cfg, data, B, T, args))
        results["meta"] = meta()
    if not args.skip_race:
        results["race"] = {**race(cfg, data, B, T, token_bytes, args.budget), "meta": meta()}
    elif "race" in previous:  # keep the last race, with its own meta (older files: that of the run that wrote it)
        results["race"] = {"meta": previous.get("meta"), **previous["race"]}
    publish("cpu_vs_hf", results, render(results))


def measure_speed(cfg, data, B, T, args) -> dict:
    results = {}
    # 1. training throughput (median step after warm-up; compile time excluded)
    torch.manual_seed(0)
    ours = lmstack.Transformer(cfg)
    theirs = hf_twin(ours)
    runs = {"lmstack": (ours, lm_loss), "hf": (theirs, hf_loss), "lmstack+compile": (ours, torch.compile(lm_loss))}
    if not args.no_hf_compile:
        runs["hf+compile"] = (theirs, torch.compile(hf_loss))
    tp: dict[str, float] = {}
    for rnd in range(2):  # two interleaved rounds, best of each: machine noise hits every library alike
        for name, (model, fn) in runs.items():
            t = time.perf_counter()
            tp[name] = max(tp.get(name, 0.0), train_throughput(model, fn, data, B, T))
            print(f"train {name} round {rnd}: {tp[name]:,.0f} tok/s ({time.perf_counter() - t:.0f}s)", flush=True)
    results["train_tok_s"] = tp

    # 2. greedy batch-1 decode (fresh identical weights so the outputs can be compared)
    torch.manual_seed(0)
    ours = lmstack.Transformer(cfg).eval()
    theirs = hf_twin(ours).eval()
    prompt = torch.from_numpy(data.val[:32].astype("int64"))[None]
    dec, outs = {}, {}
    for name, kw in (("lmstack", {}), ("lmstack+compile", {"compile": True})):
        generate(ours, prompt, max_new_tokens=8, **kw)  # warm-up (compiles once)
        dec[name], outs[name] = decode_throughput(
            lambda: generate(ours, prompt, max_new_tokens=NEW_TOKENS, temperature=0.0, **kw).sequences)
    with torch.inference_mode():
        dec["hf"], outs["hf"] = decode_throughput(lambda: theirs.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False))
    results["decode_tok_s"] = dec
    results["decode_same_tokens"] = all(torch.equal(o, outs["hf"]) for o in outs.values())
    print(f"decode: {dec}", flush=True)
    return results


def race(cfg, data, B, T, token_bytes, budget) -> dict:
    """Bits per byte after the same wall-clock budget, each library as its user runs it by default
    (lmstack's recipe compiles, compile time counted inside the budget; HF eager)."""
    result = {"budget_s": budget}
    for name in ("hf", "lmstack+compile"):
        torch.manual_seed(0)
        m = lmstack.Transformer(cfg)
        if name == "hf":
            m = hf_twin(m)
            steps = train_for_budget(m, hf_loss, data, B, T, budget)
            bpb = val_bpb(lambda x: m(input_ids=x).logits, data, T, token_bytes)
        else:
            steps = train_for_budget(m, torch.compile(lm_loss), data, B, T, budget)
            bpb = val_bpb(m, data, T, token_bytes)
        result[name] = {"steps": steps, "val_bpb": bpb}
        print(f"race {name}: {result[name]}", flush=True)
    return result


def render(r: dict) -> str:
    m = r["meta"]
    tr, de = r["train_tok_s"], r["decode_tok_s"]
    hf_compile = f"{tr['hf+compile']:,.0f}" if "hf+compile" in tr else "—"  # --no-hf-compile
    lines = [
        f"device: {m['device']} | torch {m['torch']} | transformers {m['transformers']} | {m['date']} | "
        f"commit {m['commit']}",
        f"model: tiny preset ({lmstack.ModelConfig.from_dict(r['config']).n_params / 1e6:.2f}M params), "
        f"batch {r['batch']} x {r['seq_len']}, fp32; ratios are against HF transformers eager (its default)",
        "",
        "| measure | HF eager | HF + compile | lmstack eager | lmstack + compile | lmstack eager / HF | lmstack + compile / HF |",
        "|---|---|---|---|---|---|---|",
        f"| training tokens/s | {tr['hf']:,.0f} | {hf_compile} | {tr['lmstack']:,.0f} | "
        f"{tr['lmstack+compile']:,.0f} | {tr['lmstack'] / tr['hf']:.2f}x | {tr['lmstack+compile'] / tr['hf']:.2f}x |",
        f"| greedy batch-1 decode tokens/s | {de['hf']:,.0f} | — | {de['lmstack']:,.0f} | {de['lmstack+compile']:,.0f} | "
        f"{de['lmstack'] / de['hf']:.2f}x | {de['lmstack+compile'] / de['hf']:.2f}x |",
    ]
    if "race" in r:
        a, b = r["race"]["lmstack+compile"], r["race"]["hf"]
        lines.append(
            f"| val bits/byte after {r['race']['budget_s']:.0f}s of training (lower is better) | {b['val_bpb']:.3f} "
            f"({b['steps']} steps) | — | — | {a['val_bpb']:.3f} ({a['steps']} steps, compile included) | — | "
            f"{'lower' if a['val_bpb'] < b['val_bpb'] else 'HIGHER'} |")
    race_meta = r.get("race", {}).get("meta")
    if race_meta and (race_meta["commit"], race_meta["date"]) != (m["commit"], m["date"]):
        lines.append(f"\nThe bits-per-byte race is from another run: commit {race_meta['commit']}, {race_meta['date']}, "
                     f"{race_meta['device']}.")
    lines.append(f"\ngreedy outputs identical to HF's: {r['decode_same_tokens']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
