"""Task accuracy: greedy answers to held-out instruction prompts, scored by exact match.

Each prompt is tokenized exactly as in fine-tuning (``lmstack.data.instruct.encode_prompt``), the
prompts are decoded greedily in batches (ragged prompts left-padded by ``lmstack.generate``; sorted
by length so little is padding) until a stop id, and the decoded text is compared with the
reference after ``normalize_answer``: surrounding whitespace and punctuation stripped, runs of
whitespace made one space, case folded. Accuracy is reported overall and per question kind.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import torch

from ..data.instruct import IGNORE_INDEX, Example, encode_example, encode_prompt, pad_batch, pad_id_of
from ..data.tokenizer import Tokenizer
from ..model import eval_mode
from ..peft import soft_prompt_ids

_EDGE_PUNCT = " \t\n.,;:!?\"'`"


def normalize_answer(text: str) -> str:
    """'  The Tempest.\\n' -> 'the tempest': the form exact match compares."""
    return re.sub(r"\s+", " ", text.strip(_EDGE_PUNCT)).casefold()


def evaluate_task(model: torch.nn.Module, tokenizer: Tokenizer, examples: Sequence[Example], *,
                  template: str = "alpaca", batch_size: int = 32, max_new_tokens: int | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Greedy answers to ``examples`` and their exact-match accuracy.

    ``max_new_tokens`` defaults to the longest reference answer's token count + 4 (enough for the
    answer and its stop token, so a model that rambles is cut short and scored wrong). Prompts too
    long for the context keep their last tokens (with a warning). Returns ``accuracy``, ``correct``,
    ``total``, ``by_kind`` ({kind: {accuracy, correct, total}}; examples without a kind count as
    "other") and ``predictions`` (kind, answer, prediction, correct for each example, in order).
    """
    from ..generate import generate

    if not examples:
        raise ValueError("no examples to evaluate")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(ex.answer)) for ex in examples) + 4
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    room = model.config.max_seq_len - getattr(model, "virtual_tokens", 0) - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                         f"of {model.config.max_seq_len} tokens")
    soft = soft_prompt_ids(model)  # a soft prompt inside the text goes before every answer
    prompts = [encode_prompt(ex, tokenizer, template, soft) for ex in examples]
    cut = sum(len(p) > room for p in prompts)
    if cut:
        warnings.warn(f"{cut} of {len(prompts)} prompts are longer than the {room} tokens the context leaves after "
                      f"max_new_tokens={max_new_tokens}; they keep their last {room} tokens", stacklevel=2)
        prompts = [p[-room:] for p in prompts]
    stop = tokenizer.stop_ids or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    pad = pad_id_of(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, unit="batch", desc="eval", dynamic_ncols=True)
    with eval_mode(model):
        for start in batches:
            idx = order[start : start + batch_size]
            out = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=0.0,
                           eos_token_id=stop or None, pad_token_id=pad)
            T = max(len(prompts[i]) for i in idx)  # left-padded prompt width: new tokens start here
            for row, i in enumerate(idx):
                texts[i] = tokenizer.decode(_until_stop(out.sequences[row, T:].tolist(), stop))
    return score(examples, texts)


@torch.no_grad()
def answer_loss(model: torch.nn.Module, tokenizer: Tokenizer, examples: Sequence[Example], *,
                template: str = "alpaca", batch_size: int = 32) -> dict[str, float]:
    """Teacher-forced loss of the reference answers, in nats per token, by where the token sits.

    Each example is tokenized as in fine-tuning and its trained tokens (the reply and its stop
    token) are scored given everything before them. Returns the mean over all of them (``all``),
    over the first reply token of each example (``first``), the last one (``end``: the stop token
    that lets generation finish), and the ones in between (``rest``; NaN if every reply is one
    token). For a chat with several replies, first and end are those of the whole conversation.
    Exact match needs all three to be low; the split shows which part a method fails at.
    """
    if not examples:
        raise ValueError("no examples to score")
    soft = soft_prompt_ids(model)
    items = [encode_example(ex, tokenizer, template, soft) for ex in examples]
    room = model.config.max_seq_len - getattr(model, "virtual_tokens", 0)
    too_long = [i for i, t in enumerate(items) if t.n_inputs > room]
    if too_long:
        raise ValueError(f"{len(too_long)} examples (first: #{too_long[0]}) are longer than the {room} tokens the "
                         f"model's context leaves; score shorter ones")
    device, pad = next(model.parameters()).device, pad_id_of(tokenizer)
    parts: dict[str, list[torch.Tensor]] = {"all": [], "first": [], "rest": [], "end": []}
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            inputs, targets = pad_batch(items[start : start + batch_size], pad)
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs).float()  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                    reduction="none")  # (B, T), 0 where untrained
            trained = targets != IGNORE_INDEX
            if not bool(trained.any(dim=1).all()):
                raise ValueError("an example has no reply tokens to score")
            pos = torch.arange(targets.shape[1], device=device).expand_as(targets)
            first = torch.where(trained, pos, targets.shape[1]).min(dim=1, keepdim=True).values  # (B, 1)
            last = torch.where(trained, pos, -1).max(dim=1, keepdim=True).values
            parts["all"].append(nll[trained])
            parts["first"].append(nll.gather(1, first).flatten())
            parts["end"].append(nll.gather(1, last).flatten())
            parts["rest"].append(nll[trained & (pos > first) & (pos < last)])
    return {k: float(torch.cat(v).mean()) if sum(t.numel() for t in v) else float("nan") for k, v in parts.items()}


def _until_stop(ids: list[int], stop: list[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in stop:
            return ids[:j]
    return ids


def score(examples: Sequence[Example], predictions: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy of ``predictions`` (decoded answers) against the examples' references."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    rows, by_kind = [], {}
    for ex, pred in zip(examples, predictions):
        ok = normalize_answer(pred) == normalize_answer(ex.answer)
        kind = ex.kind or "other"
        rows.append({"kind": kind, "answer": ex.answer, "prediction": pred, "correct": ok})
        k = by_kind.setdefault(kind, {"correct": 0, "total": 0})
        k["correct"] += ok
        k["total"] += 1
    for k in by_kind.values():
        k["accuracy"] = k["correct"] / k["total"]
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows),
            "by_kind": dict(sorted(by_kind.items())), "predictions": rows}


def format_table(result: dict[str, Any]) -> str:
    """A small text table: one row per kind, then the overall accuracy."""
    lines = [f"{'kind':<12} {'correct':>8} {'total':>6} {'accuracy':>9}"]
    for kind, k in result["by_kind"].items():
        lines.append(f"{kind:<12} {k['correct']:>8} {k['total']:>6} {k['accuracy']:>9.1%}")
    lines.append(f"{'all':<12} {result['correct']:>8} {result['total']:>6} {result['accuracy']:>9.1%}")
    return "\n".join(lines)
