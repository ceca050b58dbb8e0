"""Logits processors and sampling: sequence biases and banned words, repetition penalty (Keskar et
al. 2019), the n-gram ban (Paulus et al. 2017), step rules (EOS held back for a minimum length,
tokens banned at the first step, a forced last token, an EOS boost that grows with length), then for
sampling temperature, top-k (Fan et al. 2018), nucleus / top-p (Holtzman et al. 2019), min-p (Nguyen
et al. 2024), locally typical (Meister et al. 2022), epsilon and eta sampling (Hewitt et al. 2022),
top-H (arXiv 2509.02510, 2025), and a draw by the exponential race.

Each processor is a pure function on float logits (B, V) that returns new logits with the removed
tokens at -inf. ``process_logits`` chains them in the order HF ``generate`` does, with HF's tie and
``min_tokens_to_keep`` rules, so the same settings keep the same tokens (each is checked against
HF's processor of the same name). Sampling draws
``argmax(p / E)`` with ``E ~ Exponential(1)`` i.i.d. per token, which picks token i with probability
p_i (the smallest of independent exponentials E_i / p_i wins with probability p_i / sum p): no
cumulative sum, no ``multinomial``, no host sync, and a seeded ``torch.Generator`` makes it
reproducible.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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


class StepRules:
    """Processors that depend on the step (0-based count of new tokens): the EOS ids banned until
    ``min_new_tokens`` are out (HF's ``min_new_tokens`` / ``min_length``), ``begin_suppress_tokens``
    banned at the first step, ``forced_eos_token_id`` forced at ``last_step`` (the step that reaches
    the length limit), and the EOS logits raised by ``|logit| * (factor ** (step - start) - 1)``
    after step ``start`` (HF's ``exponential_decay_length_penalty`` = (start, factor)).
    ``rules(step, device)`` gives ``process_logits``' keywords for that step ({} when none apply)."""

    def __init__(self, eos: Sequence[int] = (), min_new_tokens: int = 0, begin: Sequence[int] | None = None,
                 forced_eos: int | Sequence[int] | None = None, last_step: int | None = None,
                 decay: Sequence[float] | None = None):
        if begin is not None and not _token_list(begin, empty=True):
            raise ValueError(f"begin_suppress_tokens={begin!r} must be a list of token ids")
        forced = [forced_eos] if isinstance(forced_eos, numbers.Integral) else forced_eos
        if forced is not None and (isinstance(forced_eos, bool) or not _token_list(forced)):
            raise ValueError(f"forced_eos_token_id={forced_eos!r} must be a token id or a list of them")
        if decay is not None and not (isinstance(decay, (list, tuple)) and len(decay) == 2
                                      and isinstance(decay[0], numbers.Integral) and decay[0] >= 0
                                      and isinstance(decay[1], numbers.Real) and not isinstance(decay[1], bool)):
            raise ValueError(f"exponential_decay_length_penalty={decay!r} must be (start index, decay factor), e.g. "
                             f"(10, 1.05)")
        self.eos, self.begin, self.forced = list(eos), list(begin or []), list(forced or [])
        self.min_new_tokens = min_new_tokens if self.eos else 0  # (HF: no EOS, nothing to hold back)
        self.last_step = last_step if self.forced else None
        self.decay = tuple(decay) if decay is not None and self.eos else None
        self._tensors: dict = {}

    def __bool__(self) -> bool:
        return bool(self.min_new_tokens or self.begin or self.last_step is not None or self.decay)

    def _ids(self, ids: list[int], device: torch.device) -> torch.Tensor:
        key = (tuple(ids), device)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._tensors[key]

    def __call__(self, step: int, device: torch.device) -> dict:
        rules = {}
        if step < self.min_new_tokens:
            rules["hold_ids"] = self._ids(self.eos, device)
        if step == 0 and self.begin:
            rules["suppress_ids"] = self._ids(self.begin, device)
        if step == self.last_step:
            rules["force_ids"] = self._ids(self.forced, device)
        if self.decay is not None and step > self.decay[0]:
            rules["eos_boost"] = (self._ids(self.eos, device), float(self.decay[1]) ** (step - self.decay[0]))
        return rules


def suppress(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set the logits of token ids (a 1-D tensor; ids past the vocabulary are ignored) to -inf: the
    EOS ids until ``min_new_tokens`` are out."""
    return logits.masked_fill(_among(logits, ids), NEG_INF)


def force(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Only token ids (1-D) stay possible, at logit 0 (HF's forced EOS)."""
    return torch.full_like(logits, NEG_INF).masked_fill(_among(logits, ids), 0.0)


def boost(logits: torch.Tensor, ids: torch.Tensor, factor: float) -> torch.Tensor:
    """Raise the finite logits of token ids (1-D) by ``|logit| * (factor - 1)`` (HF's exponential decay
    length penalty, ``factor`` = decay ** steps past its start)."""
    up = (logits.abs() * (factor - 1)).masked_fill(~(_among(logits, ids) & torch.isfinite(logits)), 0.0)
    return logits + up


def _among(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(V,) True at the columns of token ids ``ids`` (1-D); ids past the vocabulary match none."""
    return torch.isin(torch.arange(logits.shape[-1], device=logits.device), ids)


@dataclass
class SequenceBias:
    """Additive biases on the token that would complete given token sequences (HF's
    ``sequence_bias``; ``bad_words_ids`` and ``suppress_tokens`` are biases of -inf), compiled for one
    vocabulary and device: per sequence length L, the sequences' first L - 1 tokens (S, L - 1), their
    last tokens (S,) and biases (S,). A one-token sequence always applies; a longer one when the
    text so far ends with its first L - 1 tokens. Biases of several matching sequences add up."""

    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def build(cls, entries: Iterable[tuple[Sequence[int], float]], vocab_size: int,
              device: torch.device) -> SequenceBias | None:
        """From (token ids, bias) pairs (a later pair for the same ids replaces an earlier one, as a
        dict would); None when there are none."""
        table = {tuple(int(t) for t in ids): float(bias) for ids, bias in entries}
        outside = sorted({t for ids in table for t in ids if t >= vocab_size})
        if outside:
            raise ValueError(f"sequence_bias / bad_words_ids name token ids {outside[:5]} outside the vocabulary of "
                             f"{vocab_size}; use ids of the model's own tokenizer")
        by_len: dict[int, list[tuple[tuple[int, ...], float]]] = {}
        for ids, bias in table.items():
            by_len.setdefault(len(ids), []).append((ids, bias))
        groups = []
        for _, items in sorted(by_len.items()):
            seqs = torch.tensor([ids for ids, _ in items], dtype=torch.long, device=device)  # (S, L)
            bias = torch.tensor([b for _, b in items], dtype=torch.float32, device=device)
            groups.append((seqs[:, :-1], seqs[:, -1], bias))
        return cls(groups) if groups else None

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, V) biased for the text so far ``input_ids`` (B, T); ``mask`` (B, T) False at
        positions that are not text (left padding), which no prefix matches."""
        B, T = input_ids.shape
        add = torch.zeros_like(logits)
        for prefix, last, bias in self.groups:
            m = prefix.shape[1]
            if m > T:
                continue
            hit = (input_ids[:, None, T - m:] == prefix[None]).all(dim=-1)  # (B, S)
            if mask is not None and m:
                hit &= mask[:, T - m:].bool().all(dim=-1, keepdim=True)
            values = torch.where(hit, bias.to(logits.dtype), torch.zeros((), dtype=logits.dtype, device=logits.device))
            add.scatter_add_(1, last.expand(B, -1), values)
        return logits + add


def token_biases(
    *, sequence_bias=None, bad_words_ids=None, suppress_tokens=None, eos: Sequence[int] = (), vocab_size: int,
    device: torch.device,
) -> SequenceBias | None:
    """One ``SequenceBias`` for HF's three keywords, checked: ``sequence_bias`` a dict {token-id
    tuple: bias} or a list of [token ids, bias] pairs (generation_config.json's spelling),
    ``bad_words_ids`` a list of token-id lists (banned; a lone EOS id is not, as in HF),
    ``suppress_tokens`` a list of ids (banned; ids past the vocabulary ignored, as in HF)."""
    entries: list[tuple[Sequence[int], float]] = []
    if sequence_bias is not None:
        pairs = list(sequence_bias.items()) if isinstance(sequence_bias, dict) else sequence_bias
        ok = isinstance(pairs, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and _token_list(p[0]) and isinstance(p[1], numbers.Real)
            and not isinstance(p[1], bool) for p in pairs)
        if not ok:
            raise ValueError(f"sequence_bias={sequence_bias!r} must map token-id sequences to numbers: "
                             f"{{(id, ...): bias}} or [[[id, ...], bias], ...]")
        entries += [(list(ids), float(b)) for ids, b in pairs]
    if bad_words_ids is not None:
        if not (isinstance(bad_words_ids, (list, tuple)) and bad_words_ids and all(map(_token_list, bad_words_ids))):
            raise ValueError(f"bad_words_ids={bad_words_ids!r} must be a non-empty list of non-empty token-id lists")
        entries += [(list(ids), -math.inf) for ids in bad_words_ids if not (len(ids) == 1 and ids[0] in eos)]
    if suppress_tokens is not None:
        if not _token_list(suppress_tokens, empty=True):
            raise ValueError(f"suppress_tokens={suppress_tokens!r} must be a list of token ids")
        entries += [([t], -math.inf) for t in suppress_tokens if t < vocab_size]
    return SequenceBias.build(entries, vocab_size, device)


def _token_list(ids, *, empty: bool = False) -> bool:
    """A list or tuple of token ids (non-negative integers), non-empty unless ``empty``."""
    return (isinstance(ids, (list, tuple)) and (empty or len(ids) > 0)
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in ids))


def reads_text(processors: dict) -> bool:
    """Whether ``process_logits``' keywords ``processors`` hold one that reads the text so far (the
    repetition penalty, the n-gram ban, sequence biases, a prefix constraint, the caller's own
    processors), so needs input_ids and a padding mask."""
    return (processors.get("repetition_penalty") not in (None, 1.0) or bool(processors.get("no_repeat_ngram_size"))
            or processors.get("bias") is not None or processors.get("allowed") is not None
            or bool(processors.get("custom")))


def callables(fns, name: str, signature: str) -> tuple:
    """A caller's list of functions (HF's ``logits_processor``, ``stopping_criteria``: a list, HF's
    list types included, or one function) as a tuple, checked: a one-line error names ``name`` and
    the ``signature`` expected."""
    if callable(fns) and not isinstance(fns, (list, tuple)):
        fns = [fns]
    if not isinstance(fns, (list, tuple)) or not all(callable(f) for f in fns):
        raise ValueError(f"{name}={fns!r} must be a list of callables {signature}")
    return tuple(fns)


class PrefixConstraint:
    """HF's ``prefix_allowed_tokens_fn`` (``PrefixConstrainedLogitsProcessor``): ``fn(prompt index,
    row's ids so far (t,))`` returns the ids the row may take next; every other token goes to -inf.
    ``group``: rows per prompt (its beams, or its ``num_return_sequences`` samples). When no row of
    a group has an allowed token left finite, the group gets its allowed tokens at 0, so the
    constraint still holds (HF's rule)."""

    def __init__(self, fn, group: int = 1):
        if not callable(fn):
            raise ValueError(f"prefix_allowed_tokens_fn={fn!r} must be a function (prompt index, ids so far) -> "
                             f"allowed token ids")
        self.fn, self.group = fn, group

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(logits, NEG_INF)
        for row in range(input_ids.shape[0]):
            allowed = self.fn(row // self.group, input_ids[row])
            if isinstance(allowed, (list, tuple, torch.Tensor)) and len(allowed) == 0:
                raise ValueError(f"prefix_allowed_tokens_fn returned no token ids for prompt {row // self.group} "
                                 f"(row {row}): the constraint cannot be met; return at least one id")
            try:
                if not isinstance(allowed, (list, tuple, torch.Tensor)):
                    raise TypeError
                mask[row, allowed] = 0.0
            except (IndexError, TypeError, RuntimeError):
                raise ValueError(f"prefix_allowed_tokens_fn returned {allowed!r} for prompt {row // self.group}: it "
                                 f"must return ids in [0, {logits.shape[-1]})") from None
        out = logits + mask
        stuck = out.amax(dim=-1).isneginf().view(-1, self.group).all(dim=-1).repeat_interleave(self.group)
        return torch.where(stuck[:, None], mask, out)


def apply_custom(logits: torch.Tensor, input_ids: torch.Tensor, custom: Sequence) -> torch.Tensor:
    """The caller's processors (HF's ``logits_processor``: callables ``(input_ids, scores) -> scores``,
    HF ``LogitsProcessor`` objects included), in order, each given the output of the one before."""
    for i, fn in enumerate(custom):
        out = fn(input_ids, logits)
        if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"logits_processor[{i}] ({type(fn).__name__}) returned {got}; it must return scores "
                             f"shaped like the ones it was given, {tuple(logits.shape)}")
        logits = out
    return logits


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by ``temperature`` (> 0): below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


TOP_H_CANDIDATES = 100  # top-H looks at this many of the most likely tokens (HF's cap)


def top_h_filter(logits: torch.Tensor, h: float) -> torch.Tensor:
    """Top-H ("Top-H Decoding", arXiv 2509.02510; HF's ``top_h``): renormalize the
    ``TOP_H_CANDIDATES`` most likely tokens to q, then keep them most likely first for as long as
    their entropy terms ``-q log q`` add up to at most ``h`` times q's entropy (0 < h <= 1); the
    most likely token always stays. A flat distribution keeps many tokens, a peaked one few. As HF,
    ``min_tokens_to_keep`` does not apply, and a token whose q underflows to 0 ends the run.
    """
    top, order = torch.topk(logits, min(TOP_H_CANDIDATES, logits.shape[-1]), dim=-1)  # descending, (B, n)
    log_q = top - top.logsumexp(dim=-1, keepdim=True)
    q = log_q.softmax(dim=-1)
    entropy = -(log_q.clamp(min=torch.finfo(log_q.dtype).min) * q).sum(dim=-1, keepdim=True)  # (B, 1)
    # q = 0 gives 0 * -inf = nan: the comparison fails from there on, as HF's
    keep = torch.cumsum(-q * q.log(), dim=-1) <= h * entropy
    keep[:, 0] = True
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, keep)
    return logits.masked_fill(~kept, NEG_INF)


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


def epsilon_filter(logits: torch.Tensor, epsilon: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Truncation sampling (Hewitt et al. 2022): remove tokens whose probability is below ``epsilon``;
    the ``min_tokens_to_keep`` most likely ones always stay."""
    return _below(logits, torch.full((), epsilon, device=logits.device), min_tokens_to_keep)


def eta_filter(logits: torch.Tensor, epsilon: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Eta sampling (Hewitt et al. 2022): the cut-off adapts to the distribution's entropy H,
    ``min(epsilon, sqrt(epsilon) * exp(-H))``; otherwise as ``epsilon_filter``."""
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)  # (B, 1); removed tokens: -inf * 0 = nan, skipped
    eta = torch.minimum(torch.full_like(entropy, epsilon), math.sqrt(epsilon) * torch.exp(-entropy))
    return _below(logits, eta, min_tokens_to_keep)


def _below(logits: torch.Tensor, cut: torch.Tensor, min_tokens_to_keep: int) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    kth = torch.topk(logits, min(min_tokens_to_keep, logits.shape[-1]))[0][..., -1:]  # ties with the k-th stay
    return logits.masked_fill((probs < cut) & (logits < kth), NEG_INF)


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
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    top_h: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    bias: SequenceBias | None = None,
    hold_ids: torch.Tensor | None = None,
    allowed: PrefixConstraint | None = None,
    force_ids: torch.Tensor | None = None,
    eos_boost: tuple[torch.Tensor, float] | None = None,
    suppress_ids: torch.Tensor | None = None,
    custom: Sequence = (),
    renormalize_logits: bool = False,
    input_mask: torch.Tensor | None = None,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """All processors in HF ``generate``'s order; ``None`` (or a neutral value) skips one.

    Greedy (``temperature`` 0 or None) applies only the sequence biases (``bias``: sequence_bias,
    bad words, suppressed tokens), the repetition penalty, the n-gram ban, ``StepRules``' keywords
    of this step (``hold_ids``, EOS held back; ``force_ids``; ``eos_boost``; ``suppress_ids``, the
    begin tokens), the prefix constraint (``allowed``) and the caller's processors (``custom``,
    after all of those), as HF does with ``do_sample=False``: the others cannot change the argmax
    (typical could, and HF skips it too). ``renormalize_logits`` ends with a log-softmax (HF's, for
    beam scores after the processors). ``input_ids`` (B, T) is the sequence so far, needed for the
    penalty, the n-gram ban, the biases, the constraint and ``custom``; ``input_mask`` (B, T) False
    where a position must not count (padding).
    """
    if input_ids is None and reads_text(dict(repetition_penalty=repetition_penalty, bias=bias, allowed=allowed,
                                             no_repeat_ngram_size=no_repeat_ngram_size, custom=custom)):
        raise ValueError("repetition_penalty, no_repeat_ngram_size, sequence biases, prefix_allowed_tokens_fn and "
                         "logits_processor need input_ids, the sequence generated so far")
    if bias is not None:
        logits = bias(logits, input_ids, input_mask)
    if repetition_penalty is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, input_ids, repetition_penalty, input_mask)
    if no_repeat_ngram_size:
        logits = no_repeat_ngram_filter(logits, input_ids, no_repeat_ngram_size, input_mask)
    if hold_ids is not None:
        logits = suppress(logits, hold_ids)
    if allowed is not None:
        logits = allowed(logits, input_ids)
    if force_ids is not None:
        logits = force(logits, force_ids)
    if eos_boost is not None:
        logits = boost(logits, *eos_boost)
    if suppress_ids is not None:
        logits = suppress(logits, suppress_ids)
    if custom:
        logits = apply_custom(logits, input_ids, custom)
    if not is_greedy(temperature):
        logits = warp(logits, temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff,
                      min_tokens_to_keep, top_h)
    return torch.log_softmax(logits, dim=-1) if renormalize_logits else logits


def warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
         typical_p: float | None, epsilon_cutoff: float | None, eta_cutoff: float | None,
         min_tokens_to_keep: int, top_h: float | None = None) -> torch.Tensor:
    """The sampling processors (HF's former "warpers"), in HF's order."""
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_h is not None:
        logits = top_h_filter(logits, top_h)
    if top_k is not None and top_k != 0:
        logits = top_k_filter(logits, top_k, min_tokens_to_keep)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p, min_tokens_to_keep)
    if min_p is not None:
        logits = min_p_filter(logits, min_p, min_tokens_to_keep)
    if typical_p is not None and typical_p < 1.0:
        logits = typical_filter(logits, typical_p, min_tokens_to_keep)
    if epsilon_cutoff is not None and 0 < epsilon_cutoff < 1:
        logits = epsilon_filter(logits, epsilon_cutoff, min_tokens_to_keep)
    if eta_cutoff is not None and 0 < eta_cutoff < 1:
        logits = eta_filter(logits, eta_cutoff, min_tokens_to_keep)
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
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    top_h: float | None = None,
    **rest,
) -> None:
    """Raise a one-line ValueError for a setting HF would reject too (``rest``: the biases, banned and
    forced ids, checked where they are compiled, ``token_biases`` and ``StepRules``)."""
    for name, value in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1):
            raise ValueError(f"{name}={value!r} must be a number in [0, 1) (None or 0 = off)")
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
    if top_h is not None and (not isinstance(top_h, numbers.Real) or isinstance(top_h, bool) or not 0 < top_h <= 1):
        raise ValueError(f"top_h={top_h!r} must be a number in (0, 1] (None = off; smaller keeps fewer tokens)")
    if typical_p is not None and not 0 < typical_p <= 1:
        raise ValueError(f"typical_p={typical_p} must be in (0, 1] (None or 1 = off)")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (None or 1 = off)")
