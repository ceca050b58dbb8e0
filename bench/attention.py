"""lmstack's Triton FlashAttention vs PyTorch SDPA's FlashAttention-2 and cuDNN backends, on one GPU.

1. Kernel throughput, bf16, forward and forward+backward, TFLOP/s on the grid GRID below.
   FLOPs: forward = 4*B*H*S*S*D (halved when causal); forward+backward counts 3.5x the forward.
   Each number is the median of CUDA-event timed repetitions after warm-up (triton.testing.do_bench);
   the first call (compilation, autotuning) is outside the timing. The max |difference| of our
   output to SDPA-flash's is recorded as a sanity check.
2. Training tokens/s of the llama-1.1b shape (fewer layers so it fits the time; bf16 autocast,
   AdamW) on documents with log-uniform lengths in 64..2048: packed rows with per-document
   attention (Seqs -> our varlen kernel) vs one document per row, right-padded to the longest in
   the batch. Only trained tokens (real tokens with a next-token target) count.

Writes bench/results/attention.json and the "attention" section of docs/benchmarks.md.

    python bench/attention.py [--layers 4] [--steps 10]

Needs CUDA: without it, prints a message and exits 0.
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
from lmstack.kernels import Seqs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, meta, publish  # noqa: E402

# (batch, heads, seq_len, head_dim, causal)
GRID = [
    (4, 32, 2048, 128, True),
    (2, 32, 4096, 128, True),
    (1, 32, 8192, 128, True),
    (2, 32, 4096, 128, False),
    (2, 32, 4096, 64, True),
]
IMPLS = ("lmstack-triton", "sdpa-flash", "sdpa-cudnn")
DEVICE, DTYPE = "cuda", torch.bfloat16  # tests/kernels/test_bench_attention.py runs the plumbing on the CPU in fp32


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def attention_fns() -> dict:
    """name -> f(q, k, v, causal) on (B, S, H, D) tensors returning (B, S, H, D)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def ours(q, k, v, causal):  # imported when called: the SDPA rows need no Triton
        from lmstack.kernels.flash_attention import flash_attn_func

        return flash_attn_func(q, k, v, causal=causal)

    def sdpa(backend):
        def f(q, k, v, causal):
            with sdpa_kernel(backend):  # only this backend: an unsupported case raises
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=causal)
            return o.transpose(1, 2)
        return f

    return {
        "lmstack-triton": ours,
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }


def median_ms(fn, **kw) -> float:
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timing
    sync()
    return do_bench(fn, warmup=25, rep=100, return_mode="median", **kw)


def outputs_and_grads(f, q, k, v, do, causal) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of ``f`` (float32 copies), leaving q/k/v without gradients."""
    out = f(q, k, v, causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return [t.detach().float() for t in (out, *grads)]


def kernel_bench(on_row=lambda rows: None) -> list[dict]:
    """The grid's rows; ``on_row(rows so far)`` after each (a run cut short keeps what it measured)."""
    fns = attention_fns()
    rows = []
    for B, H, S, D, causal in GRID:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops = 4 * B * H * S * S * D / (2 if causal else 1)
        row = {"B": B, "H": H, "S": S, "D": D, "causal": causal, "fwd_tflops": {}, "fwd_bwd_tflops": {}}
        # the published fwd and fwd+bwd figures stand only if both passes are right: compare the output
        # and dq/dk/dv with SDPA's flash backend on the same inputs and upstream gradient
        try:
            (o, *g), (o_ref, *g_ref) = (outputs_and_grads(fns[n], q, k, v, do, causal)
                                        for n in ("lmstack-triton", "sdpa-flash"))
            row["max_abs_diff_vs_sdpa_flash"] = (o - o_ref).abs().max().item()
            row["max_abs_grad_diff_vs_sdpa_flash"] = max((a - b).abs().max().item() for a, b in zip(g, g_ref))
        except RuntimeError as e:  # SDPA's flash backend does not take this case here
            print(f"  no comparison with sdpa-flash: {str(e).splitlines()[0]}", flush=True)
            row["max_abs_diff_vs_sdpa_flash"] = row["max_abs_grad_diff_vs_sdpa_flash"] = None
        for name, f in fns.items():
            try:
                with torch.no_grad():
                    ms = median_ms(lambda: f(q, k, v, causal))
                row["fwd_tflops"][name] = flops / ms / 1e9  # flops / (ms * 1e-3) / 1e12
                ms = median_ms(lambda: f(q, k, v, causal).backward(do), grad_to_none=[q, k, v])
                row["fwd_bwd_tflops"][name] = 3.5 * flops / ms / 1e9
            except RuntimeError as e:  # a backend that does not take this case on this GPU / torch
                print(f"  {name} skipped: {str(e).splitlines()[0]}", flush=True)
                row["fwd_tflops"].setdefault(name, None)
                row["fwd_bwd_tflops"].setdefault(name, None)
        print(f"B={B} H={H} S={S} D={D} causal={causal}: fwd {fmt(row['fwd_tflops'])} | "
              f"fwd+bwd {fmt(row['fwd_bwd_tflops'])}", flush=True)
        rows.append(row)
        on_row(rows)
        del q, k, v, do
    return rows


def diff(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def cell(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def fmt(d: dict) -> str:
    return ", ".join(f"{k} {cell(x)}" for k, x in d.items())


# -- training tokens/s: packed (varlen) vs padded ------------------------------------------------


def doc_lengths(n: int, g: torch.Generator, lo: int = 64, hi: int = 2048) -> list[int]:
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return [int(x) for x in torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).round()]


def packed_batch(g, B, T, vocab):
    """B rows of T tokens filled with documents back to back (a document cut by a row end continues
    as a new one on the next row). Returns input ids, targets (-100 at each document's last token:
    no prediction across documents) and Seqs."""
    doc_ids = torch.empty(B * T, dtype=torch.long)
    pos, d = 0, 0
    while pos < B * T:
        n = doc_lengths(1, g)[0]
        doc_ids[pos : pos + n] = d
        pos, d = pos + n, d + 1
    seqs = Seqs.from_doc_ids(doc_ids.view(B, T))
    x = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    last = torch.ones(B, T, dtype=torch.bool)
    last[:, :-1] = seqs.doc_ids[:, 1:] != seqs.doc_ids[:, :-1]
    y[last] = -100
    return x, y, seqs, B * T - int(last.sum())


def padded_batch(g, B, vocab):
    """B documents, one per row, right-padded to the longest (causal attention never looks right,
    so padding needs no mask; its targets are -100)."""
    lens = doc_lengths(B, g)
    L = max(lens)
    x = torch.randint(0, vocab, (B, L), generator=g)
    y = torch.randint(0, vocab, (B, L), generator=g)
    for i, n in enumerate(lens):
        y[i, n - 1 :] = -100  # the last real token has no next token; the rest is padding
    return x, y, None, sum(n - 1 for n in lens)


def training_batches(B: int, T: int, vocab: int, n: int = 8) -> tuple[list, list]:
    """The training part's n packed and n padded batches (on the CPU), the same in every run."""
    g = torch.Generator().manual_seed(0)
    packed = [packed_batch(g, B, T, vocab) for _ in range(n)]
    return packed, [padded_batch(g, B, vocab) for _ in range(n)]


def train_tokens_per_s(model, batches, steps, warmup=3) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times, tokens = [], []
    for i in range(warmup + steps):
        x, y, seqs, n_tok = batches[i % len(batches)]
        sync()
        t = time.perf_counter()
        with torch.autocast(DEVICE, dtype=DTYPE, enabled=DTYPE != torch.float32):
            logits = model(x, seqs=seqs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
            tokens.append(n_tok)
    return sum(tokens) / sum(times)


def training_bench(layers: int, steps: int, B: int = 8, T: int = 2048, on_config=lambda result: None,
                   preset: str = "llama-1.1b") -> dict:
    """Trained tokens/s of each (batching, attention) pair; ``on_config(result so far)`` after each."""
    cfg = lmstack.ModelConfig.from_preset(preset, n_layers=layers)
    torch.manual_seed(0)
    model = lmstack.Transformer(cfg).to(DEVICE).train()
    moved = lambda b: (b[0].to(DEVICE), b[1].to(DEVICE), None if b[2] is None else b[2].to(DEVICE), b[3])  # noqa: E731
    packed, padded = ([moved(b) for b in batches] for batches in training_batches(B, T, cfg.vocab_size))
    slots = sum(b[0].numel() for b in padded)
    result = {"preset": preset, "n_layers": layers, "rows": B, "packed_row_len": T,
              "padded_fill": sum(b[3] for b in padded) / slots, "tok_s": {}}
    for name, backend, batches in (("packed varlen, triton", "triton", packed),
                                   ("padded, triton", "triton", padded),
                                   ("padded, sdpa", "sdpa", padded),
                                   ("packed doc-mask, sdpa", "sdpa", packed)):
        model.attn_backend = backend
        result["tok_s"][name] = train_tokens_per_s(model, batches, steps)
        print(f"train {name}: {result['tok_s'][name]:,.0f} tok/s", flush=True)
        on_config(result)
    return result


def render(r: dict) -> str:
    m = r["meta"]
    lines = [
        f"device: {m['device']} | torch {m['torch']} | {m['date']} | commit {m['commit']}",
        "",
        "Attention kernels, bf16, TFLOP/s (forward = 4·B·H·S²·D, halved when causal; forward+backward "
        "= 3.5x forward), median of timed repetitions:",
        "",
        "| B | H | S | D | causal | " + " | ".join(f"fwd {n}" for n in IMPLS) + " | "
        + " | ".join(f"fwd+bwd {n}" for n in IMPLS) + " | max abs diff vs sdpa-flash: out | dq, dk, dv |",
        "|" + "---|" * (7 + 2 * len(IMPLS)),
    ]
    for row in r["kernels"]:
        cells = [cell(row["fwd_tflops"].get(n)) for n in IMPLS] + [cell(row["fwd_bwd_tflops"].get(n)) for n in IMPLS]
        lines.append(f"| {row['B']} | {row['H']} | {row['S']} | {row['D']} | {'yes' if row['causal'] else 'no'} | "
                     + " | ".join(cells) + f" | {diff(row.get('max_abs_diff_vs_sdpa_flash'))} | "
                     f"{diff(row.get('max_abs_grad_diff_vs_sdpa_flash'))} |")
    t = r["training"]
    if t is None:
        return "\n".join(lines + ["", "Training step: not measured in this run."])
    lines += [
        "",
        f"Training step, {t['preset']} shape with {t['n_layers']} layers, bf16 autocast, AdamW; documents of "
        f"log-uniform length 64..2048; packed: {t['rows']} rows x {t['packed_row_len']} tokens; padded: "
        f"{t['rows']} documents per batch, {t['padded_fill']:.0%} of the padded slots are real tokens. "
        "Trained tokens/s (tokens with a target; padding excluded):",
        "",
        "| batches | attention | tokens/s |",
        "|---|---|---|",
    ]
    for name, tok_s in t["tok_s"].items():
        batching, backend = name.split(", ")
        lines.append(f"| {batching} | {backend} | {tok_s:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU (Triton kernels vs SDPA flash/cuDNN); none found, nothing to do.")
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4, help="layers of the llama-1.1b shape in the training part")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    ap.add_argument("--part", choices=("all", "kernels", "training"), default="all",
                    help="kernels or training alone; training keeps the kernel rows this commit measured before")
    args = ap.parse_args()
    results = {"kernels": [], "training": None, "meta": meta()}
    saved = ROOT / "bench" / "results" / "attention.json"
    if args.part == "training" and saved.exists():
        before = json.loads(saved.read_text())
        if before["meta"]["commit"] == results["meta"]["commit"] and before["meta"]["device"] == results["meta"]["device"]:
            results["kernels"] = before["kernels"]

    def partial(**part):  # after each grid row and training configuration: the JSON and docs so far
        publish("attention", {**results, **part}, render({**results, **part}), echo=False)

    if args.part != "training":
        results["kernels"] = kernel_bench(lambda rows: partial(kernels=rows))
    if args.part != "kernels":
        results["training"] = training_bench(args.layers, args.steps, on_config=lambda t: partial(training=t))
    publish("attention", results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
