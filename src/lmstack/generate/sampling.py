"""Logits processors and sampling: repetition penalty (Keskar et al. 2019), the n-gram ban (Paulus
et al. 2017), EOS held back for a minimum length, temperature, top-k (Fan et al. 2018), nucleus /
top-p (Holtzman et al. 2019), min-p (Nguyen et al. 2024) and locally typical sampling (Meister et
al. 2022), then a draw by the exponential race.

Each processor is a pure function on float logits (B, V) that returns new logits with the removed
tokens at -inf. ``process_logits`` chains them in the order HF ``generate(do_sample=True)`` does:
repetition penalty, n-gram ban, held-back EOS, temperature, top-k, top-p, min-p, typical, with HF's tie and
``min_tokens_to_keep`` rules, so the same settings keep the same tokens. Sampling draws
``argmax(p / E)`` with ``E ~ Exponential(1)`` i.i.d. per token, which picks token i with probability
p_i (the smallest of independent exponentials E_i / p_i wins with probability p_i / sum p): no
cumulative sum, no ``multinomial``, no host sync, and a seeded ``torch.Generator`` makes it
reproducible.
"""

from __future__ import annotations

import numbers

import torch

NEG_INF = float("-inf")


def apply_repetition_penalty(
    logits: torch.Tensor, input_ids: torch.Tensor, penalty: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Penalise every token that occurs in ``input_ids`` (B, T): divide positive logits by
    ``penalty``, multiply negative ones (CTRL; HF ``RepetitionPenaltyLogitsProcessor``).

    Prompt tokens count; ``mask`` (B, T) False marks positions that do not (left padding, as HF
    ignores the leading padding its attention mask shows), and so do soft-prompt placeholders (ids
    < 0). A token is penalised once however often it occurs.
    """
    V = logits.shape[-1]
    ids = input_ids.clamp(max=V).masked_fill(input_ids < 0, V)  # ids >= V, < 0 (and masked) land in a spare column
    if mask is not None:
        ids = ids.masked_fill(~mask.bool(), V)
    padded = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1)
    seen = torch.gather(padded, 1, ids)  # (B, T)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :V]


def no_repeat_ngram_filter(
    logits: torch.Tensor, input_ids: torch.Tensor, n: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Remove every token that would complete an ``n``-gram already in ``input_ids`` (B, T)
    (fairseq's and HF's ``no_repeat_ngram_size``): the tokens that followed each earlier occurrence
    of the last ``n - 1`` tokens. ``mask`` (B, T) False marks positions that are not text (left
    padding): an n-gram through one does not count (HF counts them, which differs only when the
    padding id is also generated)."""
    B, T = input_ids.shape
    V = logits.shape[-1]
    if T < n:  # no complete n-gram yet
        return logits
    grams = input_ids.unfold(1, n, 1)  # (B, T - n + 1, n): every n-gram so far
    # the next token completes an n-gram like one of these if their first n - 1 tokens are the last n - 1
    hit = (grams[..., :-1] == input_ids[:, None, T - n + 1:]).all(dim=-1)  # (B, T - n + 1)
    if mask is not None:
        mask = mask.bool()
        hit &= mask.unfold(1, n, 1).all(dim=-1) & mask[:, T - n + 1:].all(dim=-1, keepdim=True)
    nxt = grams[..., -1]  # (B, T - n + 1) the token that completed each n-gram
    banned = torch.where(hit & (nxt >= 0) & (nxt < V), nxt, V)  # others land in a spare column
    remove = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, banned, True)
    return logits.masked_fill(remove[:, :V], NEG_INF)


def suppress(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set the logits of token ids (a 1-D tensor; ids past the vocabulary are ignored) to -inf: the
    EOS ids until ``min_new_tokens`` are out."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(torch.isin(vocab, ids), NEG_INF)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by ``temperature`` (> 0): below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the ``k`` largest logits per row; tokens tied with the k-th are kept too."""
    k = min(max(k, min_tokens_to_keep), logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (nucleus).

    Walking up from the least likely token, a token is removed while the cumulative probability
    including it is <= 1 - p; the ``min_tokens_to_keep`` most likely tokens always stay.
    """
    sorted_logits, order = torch.sort(logits, descending=False)  # ascending, (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -min_tokens_to_keep:] = False
    return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Remove tokens whose probability is below ``min_p`` times the most likely token's."""
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return logits.masked_fill(remove, NEG_INF)


def typical_filter(logits: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy until
    their probability reaches ``mass``."""
    logp = torch.log_softmax(logits, dim=-1)  # (B, V)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)  # -inf * 0 = nan at removed tokens
    distance = (-logp - entropy).abs()
    sorted_dist, order = torch.sort(distance, descending=False)
    cum = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=1).clamp_(max=sorted_dist.shape[-1] - 1)  # (B,) last kept rank
    remove = sorted_dist > sorted_dist.gather(1, last.view(-1, 1))
    remove[..., :min_tokens_to_keep] = False
    return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def is_greedy(temperature: float | None) -> bool:
    return temperature is None or temperature == 0


def process_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    *,
    temperature: float | None = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    suppress_ids: torch.Tensor | None = None,
    input_mask: torch.Tensor | None = None,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """All processors in HF ``generate``'s order; ``None`` (or a neutral value) skips one.

    Greedy (``temperature`` 0 or None) applies only the repetition penalty, the n-gram ban and
    ``suppress_ids`` (1-D, the EOS ids while ``min_new_tokens`` are not out), as HF does with
    ``do_sample=False``: the others cannot change the argmax (typical could, and HF skips it too).
    ``input_ids`` (B, T) is the sequence so far, needed for the repetition penalty and the n-gram
    ban; ``input_mask`` (B, T) False where a position must not count (padding).
    """
    if (repetition_penalty not in (None, 1.0) or no_repeat_ngram_size) and input_ids is None:
        raise ValueError("repetition_penalty and no_repeat_ngram_size need input_ids, the sequence generated so far")
    if repetition_penalty is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, input_ids, repetition_penalty, input_mask)
    if no_repeat_ngram_size:
        logits = no_repeat_ngram_filter(logits, input_ids, no_repeat_ngram_size, input_mask)
    if suppress_ids is not None:
        logits = suppress(logits, suppress_ids)
    if is_greedy(temperature):
        return logits
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k is not None and top_k != 0:
        logits = top_k_filter(logits, top_k, min_tokens_to_keep)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p, min_tokens_to_keep)
    if min_p is not None:
        logits = min_p_filter(logits, min_p, min_tokens_to_keep)
    if typical_p is not None and typical_p < 1.0:
        logits = typical_filter(logits, typical_p, min_tokens_to_keep)
    return logits


def sample(logits: torch.Tensor, generator: torch.Generator | None = None,
           invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) (B, V) -> (B,), without a host sync.

    Exponential race: argmax(p / E), E ~ Exp(1). -inf logits have p = 0 and are never drawn.
    ``invalid``, a bool tensor of shape (), is set in place (still without a sync) when some row
    has no distribution to draw from (a NaN or +inf logit, or all -inf): that row's draw means
    nothing, and the caller should raise, as ``torch.multinomial`` (so HF) does.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if invalid is not None:
        invalid |= probs[:, 0].isnan().any()  # any NaN/inf logit, or none finite, makes the whole row NaN
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # Some backends can draw E = 0 exactly; 0 / 0 = nan would make argmax pick a removed token.
    race.clamp_(min=torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def check_sampling_args(
    *,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    typical_p: float | None,
    repetition_penalty: float | None,
    no_repeat_ngram_size: int | None = None,
    min_new_tokens: int | None = None,
    min_length: int | None = None,
) -> None:
    """Raise a one-line ValueError for a setting HF would reject too."""
    for name, value in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_new_tokens", min_new_tokens),
                        ("min_length", min_length)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name}={value!r} must be a non-negative integer (None or 0 = off)")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p), ("typical_p", typical_p),
                        ("repetition_penalty", repetition_penalty)):
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool)):
            raise ValueError(f"{name}={value!r} must be a number (None = off)")
    if top_k is not None and isinstance(top_k, bool):
        raise ValueError(f"top_k={top_k!r} must be a non-negative integer (None or 0 = off)")
    if temperature is not None and not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 or None = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be a non-negative integer (None or 0 = off)")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in [0, 1] (None or 1 = off)")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p={min_p} must be in [0, 1] (None = off)")
    if typical_p is not None and not 0 < typical_p <= 1:
        raise ValueError(f"typical_p={typical_p} must be in (0, 1] (None or 1 = off)")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (None or 1 = off)")
