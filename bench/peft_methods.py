"""Every PEFT method and full fine-tuning on the Shakespeare instruction task, one budget, one run.

The base is a pretraining checkpoint of the demo recipe: the published table uses it trained 1,500
steps (`lmstack train --recipe recipes/shakespeare-tiny.yaml max_steps=1500 time_limit=3000
out_dir=runs/shakespeare-base`), since on the 500-step `make demo` model the PEFT methods stay near
0%. The task is `lmstack prepare shakespeare-tasks` ("Which play is this passage from?" / "Who
speaks the lines marked ???", held out by passage). The budget is the same for every method:
``--epochs`` passes over the same 4,000 training questions with the "plain" prompt template. Methods
that keep the sequence as it is (full, lora, adapter, ia3, and prompt tuning, whose soft prompt sits
before the answer as P-tuning's templates place it, ``position="end"``) pack about two examples per
row, kept apart by document masks; prefix and ptuning_v2 add leading virtual tokens, which packed
rows cannot share, so they take one padded example per row, twice the optimizer steps on half-full
rows. Each method uses the learning rate and options in METHODS, then answers the held-out
questions greedily; the score is exact match. Each method runs in its own process so its peak
memory is its own: peak growth over the loaded base model and data, of RSS (CPU) or of allocated
memory (CUDA).

ABLATIONS are variants that are not a method's best setting, run only when named in ``--methods``
and shown in a table of their own: prompt tuning with the soft prompt before the input (Lester et
al.'s layout, the one HF peft loads), which on this 3M-parameter base scores 0% and gives one
answer to a quarter of the questions.

Writes bench/results/peft_methods.json and a table in docs/benchmarks.md after every method.
``--methods a,b --keep`` reruns only those methods and keeps the other rows of an earlier run with
the same budget (so an interrupted run can be finished). Besides exact match, each row has the
teacher-forced loss of the reference answers split by position (``lmstack.train.answer_loss``),
which shows where a method that scores 0% fails.

    python bench/peft_methods.py --base runs/shakespeare-base --epochs 3 [--batch 16]
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, meta, publish, update_docs  # noqa: E402

# row -> (method, learning rate, options for lmstack.peft.apply). Larger rates for the methods with
# fewer, more constrained parameters, as their papers use (LoRA at 3e-2 diverges on this model).
# Prompt, prefix and P-tuning v2 start from this text (lmstack.peft: the soft prompt from its token
# embeddings, the prefixes from the keys/values the base model computes for it), not from noise.
# Prompt tuning puts its soft prompt before the answer (position="end", where P-tuning's templates put
# continuous prompts); before the input (HF peft's layout) it is an ablation: 0% on this base.
INIT_TEXT = "Which play is this passage from? Who speaks these lines?"
METHODS: dict[str, tuple[str, float, dict]] = {
    "full": ("full", 1e-3, {}),
    "lora": ("lora", 1e-2, {"r": 16, "alpha": 32, "target_modules": "all-linear"}),
    "adapter": ("adapter", 5e-3, {"bottleneck": 32}),
    "prefix": ("prefix", 1e-2, {"num_virtual_tokens": 16, "init_text": INIT_TEXT}),
    "ptuning_v2": ("ptuning_v2", 1e-1, {"num_virtual_tokens": 16, "init_text": INIT_TEXT}),
    "prompt": ("prompt", 3e-2, {"num_virtual_tokens": 64, "init_text": INIT_TEXT, "position": "end"}),  # 16: 2.0%
    "ia3": ("ia3", 3e-2, {}),
}
ABLATIONS: dict[str, tuple[str, float, dict]] = {
    "prompt-start": ("prompt", 3e-2, {"num_virtual_tokens": 64, "init_text": INIT_TEXT}),  # lr 3e-3: 0% too
}
RUNS = {**METHODS, **ABLATIONS}  # every row the script can measure, by name
LABELS = {"prompt": "prompt, before the answer", "prompt-start": "prompt, before the input"}
BUDGET = ("epochs", "batch", "seq_len", "eval_n", "template")  # what must match for --keep


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(args) -> dict:
    """Fine-tune with one method (in this process) and score it; prints one JSON line."""
    from lmstack.data.instruct import load_split
    from lmstack.train.finetune import FinetuneConfig, Finetuner
    from lmstack.train.task_eval import answer_loss, evaluate_task

    torch.set_num_threads(args.threads)
    method, lr, options = RUNS[args.one]
    out = Path(tempfile.mkdtemp(prefix=f"peft-{args.one}-"))
    # the context holds leading virtual tokens too: rows get that much shorter (a soft prompt before the
    # answer is part of each example instead)
    leading = options.get("num_virtual_tokens", 0) if options.get("position") != "end" else 0
    cfg = FinetuneConfig(
        base=args.base, data=args.data, method=method, method_options=options, out_dir=str(out),
        epochs=args.epochs, batch_size=args.batch, seq_len=args.seq_len - leading, lr=lr, warmup_steps=10,
        template=args.template,
        eval_every=10**6, save_every=10**6, log_every=10, seed=0,
    )
    ft = Finetuner(cfg, progress=False)
    cuda = ft.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb("VmRSS")  # the loaded model and data
    t0 = time.perf_counter()
    ft.train()
    train_s = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM")) - before
    steps = [r for r in ft.read_metrics() if "tok_per_s" in r]
    # step time: elapsed between the logged steps after the first window (warm-up excluded)
    times = [(b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"]) for a, b in zip(steps[1:], steps[2:])]
    examples = load_split(args.data, "test")[: args.eval_n]
    acc = evaluate_task(ft.model, ft.tokenizer, examples, template=args.template)
    nll = answer_loss(ft.model, ft.tokenizer, examples, template=args.template)
    return {
        "method": args.one, "lr": lr, "options": {k: v for k, v in options.items() if k != "init_text"},
        "init_from_text": "init_text" in options, "commit": meta()["commit"],
        "packed": cfg.packing, "steps": ft.step, "train_s": train_s,
        "trainable_params": ft.model.num_params(trainable_only=True), "total_params": ft.model.num_params(),
        "peak_mem_mb": peak, "step_ms": 1e3 * statistics.median(times) if times else float("nan"),
        "final_loss": steps[-1]["loss"] if steps else float("nan"),
        "accuracy": acc["accuracy"], "by_kind": {k: v["accuracy"] for k, v in acc["by_kind"].items()},
        "answer_loss": nll, **answer_spread(acc["predictions"]),
    }


def answer_spread(predictions: list[dict]) -> dict:
    """How many different answers a model gave, and its most common one with its count: a model that
    answers every question alike has learned the answer format but nothing about the passage."""
    counts = collections.Counter(p["prediction"] for p in predictions)
    top, n = counts.most_common(1)[0]
    return {"distinct_answers": len(counts), "top_answer": top, "top_answer_count": n}


def base_accuracy(args) -> dict:
    from lmstack.data.instruct import load_split
    from lmstack.train import load_checkpoint
    from lmstack.train.checkpoint import resolve_checkpoint, training_history
    from lmstack.train.task_eval import answer_loss, evaluate_task

    torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(args.base)
    examples = load_split(args.data, "test")[: args.eval_n]
    acc = evaluate_task(model, tok, examples, template=args.template)
    return {"accuracy": acc["accuracy"], "by_kind": {k: v["accuracy"] for k, v in acc["by_kind"].items()},
            "answer_loss": answer_loss(model, tok, examples, template=args.template),
            **answer_spread(acc["predictions"]),
            "total_params": model.num_params(), "n_train": len(load_split(args.data, "train")),
            **pretraining(training_history(resolve_checkpoint(args.base)))}


def pretraining(history: dict) -> dict:
    """How the base was pretrained: its step and tokens, and the validation bits/byte at that step."""
    step = history.get("step")
    out = {"pretrain_steps": step, "pretrain_tokens": history.get("tokens_seen")}
    out.update({"val_bpb": r["val_bpb"] for r in history["evals"] if r.get("step") == step and "val_bpb" in r})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=str(ROOT / "runs" / "shakespeare-tiny"), help="base checkpoint or run dir")
    ap.add_argument("--data", default="shakespeare-tasks", help="task name (under $LMSTACK_HOME/data) or dir")
    ap.add_argument("--epochs", type=float, default=2.0, help="passes over the training questions, every method")
    ap.add_argument("--batch", type=int, default=16, help="rows per optimizer step")
    ap.add_argument("--seq-len", type=int, default=256, help="row length (the base context); methods with "
                    "virtual tokens use that many fewer")
    ap.add_argument("--template", default="plain", help="prompt template (lmstack.data.instruct.TEMPLATES)")
    ap.add_argument("--eval-n", type=int, default=400, help="held-out questions to score")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--keep", action="store_true", help="keep the other methods' rows of an earlier run with the "
                    "same budget")
    ap.add_argument("--redraw", action="store_true", help="only redo the docs table and plot from the JSON")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--base-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one or args.base_only:
        print("RESULT " + json.dumps(run_one(args) if args.one else base_accuracy(args)), flush=True)
        return 0

    def child(*extra: str) -> dict:
        cmd = [sys.executable, __file__, "--base", args.base, "--data", args.data, "--epochs", str(args.epochs),
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--eval-n", str(args.eval_n),
               "--template", args.template, "--threads", str(args.threads), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1].removeprefix("RESULT "))

    if args.redraw:
        results = json.loads((ROOT / "bench" / "results" / "peft_methods.json").read_text())
        update_docs("peft_methods", render(results))
        print(f"plot: {plot(results, ROOT / 'docs' / 'img' / 'peft_methods.png')}")
        return 0
    budget = {k: getattr(args, k) for k in BUDGET}
    torch.set_num_threads(args.threads)  # meta() records the thread count the children measure with
    results = {"meta": meta(), **budget, "base": None, "methods": {}, "ablations": {}}
    old = ROOT / "bench" / "results" / "peft_methods.json"
    if args.keep and old.exists():
        prev = json.loads(old.read_text())
        if {k: prev.get(k) for k in BUDGET} != budget:
            raise SystemExit(f"--keep: {old} has another budget ({ {k: prev.get(k) for k in BUDGET} }); run all methods")
        results.update(base=prev["base"], methods=prev["methods"], ablations=prev.get("ablations", {}))
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in RUNS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(RUNS)}")
    results["base"] = child("--base-only")  # a minute; always from this commit
    print(f"base: accuracy {results['base']['accuracy']:.3f}", flush=True)
    for m in methods:
        results["ablations" if m in ABLATIONS else "methods"][m] = r = child("--one", m)
        print(f"{m}: accuracy {r['accuracy']:.3f}, {r['trainable_params']:,} trainable, "
              f"{r['step_ms']:.0f} ms/step, peak +{r['peak_mem_mb']:.0f} MB", flush=True)
        # after every method, so an interrupted run keeps what it finished (rerun the rest with --keep)
        publish("peft_methods", results, render(results))
    print(f"plot: {plot(results, ROOT / 'docs' / 'img' / 'peft_methods.png')}")
    return 0


def render(r: dict) -> str:
    m, b = r["meta"], r["base"]
    lines = [
        f"device: {m['device']} | torch {m['torch']} | {m['date']} | commit {m['commit']}",
        f"base: the `make demo` recipe's model ({b['total_params'] / 1e6:.2f}M params{_pretrained(b)}); budget {r['epochs']:g} epochs of the "
        f"{b['n_train']:,} training questions, {r['batch']} rows of {r['seq_len']} tokens per step, \"{r['template']}\" template; "
        f"exact match on {r['eval_n']} held-out questions (before: {b['accuracy']:.1%}, "
        f"which play {b['by_kind'].get('play', 0):.1%}, who speaks {b['by_kind'].get('speaker', 0):.1%})",
        *(["rows measured at more than one commit (--keep): "
           + ", ".join(f"{n} {x.get('commit', '?')}" for n, x in rows(r))]
          if len({x.get("commit") for _, x in rows(r)}) > 1 else []),
        "",
        *table(r, r["methods"]),
        "",
        f"Answer loss: teacher-forced loss of the held-out reference answers in nats per token "
        f"(`lmstack.train.answer_loss`): the first answer token, the rest of the answer, and the end-of-text "
        f"token that stops generation. Base model: {_losses(b)}.",
    ]
    if r.get("ablations"):
        lines += ["", "Ablations (same budget and base; not a method's best setting):", "",
                  *table(r, r["ablations"])]
    return "\n".join(lines)


def table(r: dict, named: dict) -> list[str]:
    """The markdown table of the rows in ``named``, least accurate first."""
    b = r["base"]
    lines = [
        "| method | lr | rows | trainable params | % of model | peak memory (MB over the loaded model) "
        "| steps | step time (ms) | train time (s) | accuracy before | accuracy after | which play | who speaks "
        "| answer loss: first / rest / end token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in ranked(named):
        lines.append(
            f"| {LABELS.get(name, name)}{' (init from text)' if x.get('init_from_text') else ''} | {x['lr']:g} "
            f"| {'packed' if x['packed'] else 'padded'} | {x['trainable_params']:,} "
            f"| {100 * x['trainable_params'] / b['total_params']:.2f}% | {x['peak_mem_mb']:.0f} | {x['steps']} "
            f"| {x['step_ms']:.0f} | {x['train_s']:.0f} | {b['accuracy']:.1%} | **{x['accuracy']:.1%}** "
            f"| {x['by_kind'].get('play', float('nan')):.1%} | {x['by_kind'].get('speaker', float('nan')):.1%} "
            f"| {_losses(x)} |")
    return lines


def rows(r: dict) -> list[tuple[str, dict]]:
    """Every measured row, methods and ablations."""
    return [*r["methods"].items(), *r.get("ablations", {}).items()]


def ranked(named: dict) -> list[tuple[str, dict]]:
    """The rows from the least to the most accurate."""
    return sorted(named.items(), key=lambda kv: kv[1]["accuracy"])


def _pretrained(b: dict) -> str:
    if b.get("pretrain_steps") is None:
        return ""
    bpb = f", validation {b['val_bpb']:.3f} bits/byte" if "val_bpb" in b else ""
    return f", pretrained {b['pretrain_steps']:,} steps on {b['pretrain_tokens'] / 1e6:.1f}M tokens{bpb}"


def _losses(x: dict) -> str:
    a = x.get("answer_loss")
    return "—" if a is None else f"{a['first']:.2f} / {a['rest']:.2f} / {a['end']:.2f}"


def plot(r: dict, path: Path) -> Path:
    """Bar chart: held-out accuracy per method (overall and per question kind), the base as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = ranked(r["methods"])
    total = r["base"]["total_params"]
    series = [("all", "accuracy", None), ("which play", "by_kind", "play"), ("who speaks", "by_kind", "speaker")]
    fig, ax = plt.subplots(figsize=(1.4 * len(bars) + 1.5, 4.2))
    width = 0.27
    for i, (label, key, kind) in enumerate(series):
        vals = [100 * (x[key] if kind is None else x[key].get(kind, 0.0)) for _, x in bars]
        ax.bar([j + (i - 1) * width for j in range(len(bars))], vals, width, label=label)
    ax.axhline(100 * r["base"]["accuracy"], color="black", lw=1, ls="--", label="base model")
    ticks = [LABELS.get(n, n).replace(", ", "\n") + f"\n{100 * x['trainable_params'] / total:.3g}% trained"
             for n, x in bars]
    ax.set_xticks(range(len(bars)), ticks, fontsize=8)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(f"{r['epochs']:g} epochs of the Shakespeare task, {r['base']['total_params'] / 1e6:.1f}M-parameter base")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
