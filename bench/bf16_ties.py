"""Why bf16 greedy tokens part from HF's: teacher-forced next-token logits of decode_vs_hf's batch-8
prompts (same weights, same prompts) in fp32 and in bf16, lmstack and HF.

For each row, at the first step where lmstack's and HF's bf16 greedy decodes differ (or the first
new token after one shared token), prints both picks, fp32's margin between them, fp32's gap
between its two best tokens, and each library's bf16 max-abs logit error against fp32. A bf16
error well above the top-two gap means the pick is a coin toss that accumulation order decides.

    python bench/bf16_ties.py [--model llama-1.1b] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import lmstack
from lmstack.generate import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hf_twin  # noqa: E402


def build(cfg, scale: float) -> lmstack.Transformer:
    """decode_vs_hf's weights: seed 0, every non-norm weight scaled by ``scale``."""
    torch.manual_seed(0)
    m = lmstack.Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return m.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1.1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weight-scale", type=float, default=3.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = lmstack.ModelConfig.from_preset(args.model)
    f32, b16 = build(cfg, args.weight_scale), build(cfg, args.weight_scale).to(torch.bfloat16)
    hf16 = hf_twin(b16).eval()
    g = torch.Generator().manual_seed(1)
    torch.randint(0, cfg.vocab_size, (1, 32), generator=g)  # decode_vs_hf's batch-1 prompt comes first
    ids = torch.randint(0, cfg.vocab_size, (8, 32), generator=g)
    with torch.inference_mode():
        ours = generate(b16, ids, 3).sequences
        theirs = hf16.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                               do_sample=False)
        prefix = ours[:, :33]  # prompt + the first new token (shared by both)
        ref = f32(prefix)[:, -1].double()
        lm = b16(prefix)[:, -1].double()
        hf = hf16(prefix).logits[:, -1].double()
    print("| row | lmstack bf16 pick | HF bf16 pick | fp32 margin between them | fp32 top-2 gap | "
          "bf16 error lmstack | bf16 error HF |")
    print("|---|---|---|---|---|---|---|")
    for r in range(ids.shape[0]):
        a, b = int(ours[r, 33]), int(theirs[r, 33])
        top = ref[r].topk(2).values
        print(f"| {r} | {a} | {b} | {(ref[r, a] - ref[r, b]).item():.3f} | {(top[0] - top[1]).item():.3f} | "
              f"{(lm[r] - ref[r]).abs().max().item():.3f} | {(hf[r] - ref[r]).abs().max().item():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
