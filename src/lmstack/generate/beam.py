"""Beam search (Graves 2012, "Sequence Transduction with Recurrent Neural Networks"; the standard
NMT decoder of Sutskever et al. 2014 and Wu et al. 2016), with HF transformers' exact rules.

Instead of one continuation, keep the ``N`` most probable partial sequences (beams) per prompt.
Each step scores every one-token extension of every beam by its summed log-probability, keeps the
best ``N`` that do not end, and moves the ones that end (EOS, or the length limit) into a store of
``N`` finished hypotheses ranked by ``sum_logprob / L ** length_penalty``.

Beams are batch rows: row ``b * N + j`` is beam ``j`` of prompt ``b``, all in one KV cache of
``B * N`` rows. The prompt is prefilled once (``B`` rows) and its cache rows copied ``N`` times
(``copy_rows``); after each step ``cache.reorder`` gathers the rows of the beams that were
extended, so every beam's keys follow it. Positions and key padding are shared by the beams of
one prompt.

HF's rules (transformers 5.x ``GenerationMixin._beam_search``), all matched here:

- Candidates: top ``K = max(2, 1 + n_eos) * N`` of the ``N * V`` (beam, token) pairs scored
  ``beam score + log_softmax(logits)`` (the repetition penalty, if any, acts on these log-probs as
  HF's processors do). Only beam 0 is live at the first step (the others start at -1e9), so the
  ``N`` beams start distinct. ``K`` leaves at least ``N`` candidates that do not end in EOS.
- Running beams: the ``N`` best candidates that do not end in EOS.
- Finished: of the top ``N`` candidates only (not all ``K``), those ending in EOS, or all of them at
  the last step, are offered to the store with score ``sum / L ** length_penalty``. ``L`` counts the
  generated tokens including the EOS and *not* the prompt (``cur_len + 1 - decoder_prompt_len``).
  The store keeps its ``N`` best; it takes no offers once the prompt is done, nor once it is full
  when ``early_stopping is True``.
- Done: the store is full and the best running beam, scored with ``L_best``, cannot beat the worst
  stored hypothesis. ``L_best`` is the generated length so far, or ``max_new_tokens`` when
  ``early_stopping == "never"`` and ``length_penalty > 0`` (a longer beam could still score
  higher). So ``False`` and ``"never"`` with ``length_penalty <= 0`` are the same heuristic, and
  ``True`` adds the "store full" stop on top of it.
- Decoding stops when every prompt is done, when every store is full (``early_stopping=True``), or
  after ``max_new_tokens``. The ``num_return_sequences`` best hypotheses per prompt come back best
  first, cut to the longest of them; shorter ones are padded with ``pad_token_id``.

Beam sampling (HF ``generate(num_beams=N, do_sample=True)``) changes only the candidates: the
sampling processors (temperature, top-k, top-p, min-p, typical, keeping at least ``K / N`` tokens per
beam) act on the log-probs, and the ``K`` candidates are drawn without replacement from
``softmax(beam score + processed log-probs)`` over all ``N * V`` pairs (``torch.multinomial``, as HF,
so a seed gives HF's draws), then sorted by score. Scores stay the processed log-probs, summed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .decode import GenerateOutput, Steps, is_int, out_of_time, padded_positions
from .guidance import Guidance
from .sampling import StepRules, is_greedy, process_logits, reads_text
from .stops import StopStrings

# the filters named when they keep too few tokens
FILTERS = ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")

NEG_INF = float("-inf")
DEAD_BEAM = -1e9  # HF's start score for beams 1..N-1: they exist but lose every first-step comparison


def check_beam_args(
    num_beams: int, num_return_sequences: int, length_penalty: float, early_stopping
) -> None:
    """Raise a one-line ValueError for a setting HF would reject too."""
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be an integer >= 1")
    if not is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"num_return_sequences={num_return_sequences!r} must be between 1 and num_beams={num_beams}; "
            "raise num_beams or return fewer sequences"
        )
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping={early_stopping!r} must be True, False or 'never'")
    if not isinstance(length_penalty, numbers.Real) or isinstance(length_penalty, bool) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty!r} must be a finite number (1.0 = average log-prob per token)")


# -- the finished-hypotheses store -------------------------------------------------------------
@dataclass
class Hypotheses:
    """The ``N`` best finished hypotheses of each prompt, best first; -inf marks an empty slot."""

    scores: torch.Tensor  # (B, N) float32, length-penalised
    seqs: torch.Tensor  # (B, N, T + max_new) int64, pad after each hypothesis
    lengths: torch.Tensor  # (B, N) int64, generated tokens (EOS included)
    beams: torch.Tensor | None = None  # (B, N, max_new) int64: the running-beam row of each token, -1 past the end

    @classmethod
    def empty(cls, B: int, N: int, total: int, pad_id: int, device: torch.device, max_new: int = 0) -> Hypotheses:
        """``max_new`` > 0: keep each hypothesis's beam indices too."""
        return cls(
            scores=torch.full((B, N), NEG_INF, dtype=torch.float32, device=device),
            seqs=torch.full((B, N, total), pad_id, dtype=torch.long, device=device),
            lengths=torch.zeros(B, N, dtype=torch.long, device=device),
            beams=torch.full((B, N, max_new), -1, dtype=torch.long, device=device) if max_new else None,
        )

    def full(self) -> torch.Tensor:
        """(B,) True where every slot holds a hypothesis."""
        return torch.isfinite(self.scores).all(dim=1)

    def add(self, scores: torch.Tensor, seqs: torch.Tensor, length: int, beams: torch.Tensor | None = None) -> None:
        """Offer hypotheses scores (B, M) (-inf = no offer) with seqs (B, M, total) (and, if kept,
        their beam indices (B, M, max_new)); keep the N best.

        Stored ones go first in the merge, the order HF concatenates them in."""
        B, N = self.scores.shape
        merged = torch.cat([self.scores, scores], dim=1)  # (B, N + M)
        keep = merged.topk(N, dim=1).indices  # (B, N), best first
        self.scores = merged.gather(1, keep)
        seqs = torch.cat([self.seqs, seqs], dim=1)  # (B, N + M, total)
        self.seqs = seqs.gather(1, keep[..., None].expand(-1, -1, seqs.shape[-1]))
        if self.beams is not None:
            beams = torch.cat([self.beams, beams], dim=1)
            self.beams = beams.gather(1, keep[..., None].expand(-1, -1, beams.shape[-1]))
        lengths = torch.cat([self.lengths, self.lengths.new_full(scores.shape, length)], dim=1)
        self.lengths = lengths.gather(1, keep)


def can_improve(
    store: Hypotheses, best_running: torch.Tensor, generated: int, max_new_tokens: int,
    length_penalty: float, early_stopping,
) -> torch.Tensor:
    """(B,) False once the store is full and the best running beam (B,) cannot beat its worst entry."""
    if early_stopping == "never" and length_penalty > 0:
        best_length = max_new_tokens  # the score can still grow with length: assume the longest
    else:
        best_length = generated
    best_possible = best_running / (best_length**length_penalty)
    return ~store.full() | (best_possible > store.scores.amin(dim=1))


# -- one step ---------------------------------------------------------------------------------
def top_candidates(
    logp: torch.Tensor, beam_scores: torch.Tensor, k: int, *, sample: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k (beam, token) extensions per prompt, the best (or, with ``sample``, k drawn without
    replacement from the softmax of their scores): scores (B, k) best first, source beam, token."""
    B, N = beam_scores.shape
    V = logp.shape[-1]
    total = (logp.view(B, N, V) + beam_scores[..., None]).view(B, N * V)
    if not sample:
        scores, flat = total.topk(k, dim=1)  # (B, k)
        return scores, flat // V, flat % V
    try:
        flat = torch.multinomial(torch.softmax(total, dim=-1), k, generator=generator)  # (B, k), drawn
    except RuntimeError as e:  # NaN / inf scores: torch's message does not say where they came from
        raise ValueError(f"beam sampling met scores with no distribution to draw from ({str(e).splitlines()[0]}): "
                         f"the model's outputs are not finite (weights, fp16 overflow?) or logits / temperature "
                         f"overflowed; check the model, or raise the temperature") from None
    scores, order = total.gather(1, flat).sort(dim=-1, descending=True)
    flat = flat.gather(1, order)
    return scores, flat // V, flat % V


@torch.inference_mode()
def beam_search(
    model: torch.nn.Module,
    ids: torch.Tensor,
    pad_mask: torch.Tensor | None,
    max_new_tokens: int,
    *,
    num_beams: int,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos: list[int],
    pad_id: int,
    processors: dict | None = None,
    held: StepRules | None = None,
    generator: torch.Generator | None = None,
    steps: Steps | None = None,
    stops: StopStrings | None = None,
    criteria=None,
    deadline: float | None = None,
    output_scores: bool = False,
    output_logits: bool = False,
) -> GenerateOutput:
    """Beam search from prompts ids (B, T) (left-padded where ``pad_mask`` (B, T) is False), with
    ``process_logits``' ``processors`` (repetition penalty, n-gram ban, biases; none by default) on
    the log-probs and ``held``, the ``StepRules`` of each step; beam sampling when their ``temperature``
    is > 0, after the filters given, drawing from ``generator`` (None = torch's global one, as HF).
    A candidate that completes one of ``stops``, or that ``criteria`` (``stops.Criteria``) says is
    done, ends like one ending in EOS (HF's stopping criteria);
    a step that finishes past ``deadline`` is the last (HF's ``max_time``). ``output_scores`` /
    ``output_logits``: also return each step's processed log-probs / raw logits of the B * N running
    beams, and the hypotheses' ``beam_indices`` (HF's). ``steps`` may be classifier-free guidance
    (``lmstack.generate.guidance.Guidance``): it decodes the unconditional rows alongside the beams,
    moves them with the beams, and guides the log-probs.

    Returns ``GenerateOutput(sequences=(B * R, T + T_new), scores=(B * R,))``, R =
    ``num_return_sequences``: the R best hypotheses of prompt b at rows ``b * R ...``, best first.
    """
    check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping)
    N, R = num_beams, num_return_sequences
    processors = processors or {}
    sample = not is_greedy(processors.get("temperature"))
    uses_text = reads_text(processors)
    B, T = ids.shape
    total, dev = T + max_new_tokens, ids.device
    rows = torch.arange(B, device=dev).repeat_interleave(N)  # (B*N,) the prompt of each beam row
    base = torch.arange(B, device=dev)[:, None] * N  # (B, 1) first beam row of each prompt

    steps = steps or Steps()
    guide = steps if isinstance(steps, Guidance) else None
    positions = None if pad_mask is None else padded_positions(pad_mask)  # (B, T)
    cache, logits = steps.start(model, ids, positions, pad_mask, total, N)  # (B*N, V): one prefill per prompt
    pos = None if positions is None else positions[rows, -1:] + 1  # (B*N, 1), advanced in place

    seq = ids.new_full((B * N, total), pad_id)  # running beams; pad past the end (fills short hypotheses)
    seq[:, :T] = ids[rows]
    seq_mask = None  # those skip prompt padding (HF: the repetition penalty does)
    if uses_text and pad_mask is not None:
        seq_mask = torch.ones(B * N, total, dtype=torch.bool, device=dev)
        seq_mask[:, :T] = pad_mask[rows]

    eos_ids = torch.tensor(eos, dtype=torch.long, device=dev) if eos else None
    stop_states = None if stops is None else stops.start(ids, pad_mask)[rows]  # (B*N, n_strings)
    K = max(2, 1 + len(eos)) * N  # candidates per step; HF's filters keep K / N tokens per beam
    beam_scores = torch.zeros(B, N, dtype=torch.float32, device=dev)  # (B, N) summed log-probs of the running beams
    beam_scores[:, 1:] = DEAD_BEAM
    recording = output_scores or output_logits
    step_scores, raw = [], []
    store = Hypotheses.empty(B, N, total, pad_id, dev, max_new=max_new_tokens if recording else 0)
    beam_idx = torch.full((B * N, max_new_tokens), -1, dtype=torch.long, device=dev) if recording else None
    open_ = torch.ones(B, dtype=torch.bool, device=dev)  # prompts whose store can still improve

    t = T
    for step in range(max_new_tokens):
        generated = step + 1
        if output_logits:
            raw.append(logits.to(torch.float32, copy=True))
        # (B*N, V)
        logp = torch.log_softmax(logits.float(), dim=-1) if guide is None else guide.scores(logits, seq[:, :t])
        rules = held(step, dev) if held else {}  # EOS held back, begin tokens, forced EOS, EOS boost
        if uses_text or sample or rules or processors.get("renormalize_logits"):
            logp = process_logits(logp, seq[:, :t], input_mask=None if seq_mask is None else seq_mask[:, :t],
                                  min_tokens_to_keep=K // N, **rules, **processors)
        if output_scores:
            step_scores.append(logp.clone())
        cand, src, tok = top_candidates(logp, beam_scores, K, sample=sample, generator=generator)  # (B, K), best first
        ends = torch.isin(tok, eos_ids) if eos_ids is not None else torch.zeros_like(tok, dtype=torch.bool)
        if stops is not None:  # each candidate's states: its source beam's, after its token
            cand_states, hit = stops.step(stop_states[(base + src).flatten()], tok.flatten())
            ends |= hit.view(B, K)
        if criteria is not None:  # each candidate's text: its source beam's, then its token (HF's)
            cand_text = torch.cat([seq[(base + src).flatten(), :t], tok.flatten()[:, None]], dim=1)  # (B*K, t+1)
            ends |= criteria(cand_text, tuple(step_scores) if output_scores else None).view(B, K)
        last = step == max_new_tokens - 1 or out_of_time(deadline)
        if last:
            ends = torch.ones_like(tok, dtype=torch.bool)

        # Offer the top-N candidates that end to the store (decided on last step's state, as HF).
        accepting = (open_ & ~store.full()) if early_stopping is True else open_  # (B,)
        offered = ends[:, :N] & accepting[:, None]  # (B, N)
        fin_rows = (base + src[:, :N]).flatten()  # (B*N,) the running beam each top-N candidate extends
        fin_seqs = seq[fin_rows]  # (B*N, total)
        fin_seqs[:, t] = tok[:, :N].flatten()
        fin_scores = (cand[:, :N] / (generated**length_penalty)).masked_fill(~offered, NEG_INF)
        fin_beams = None
        if recording:  # each candidate's beam indices: its source beam's, then the source row itself
            fin_beams = beam_idx[fin_rows]
            fin_beams[:, step] = fin_rows
            fin_beams = fin_beams.view(B, N, -1)
        store.add(fin_scores, fin_seqs.view(B, N, total), generated, fin_beams)
        if last:
            break

        # The N best candidates that go on become the running beams. An ending one is pushed down by
        # 1e9, not removed, as HF: it still outranks a removed token (-inf) that sampling drew.
        alive = cand - 1e9 * ends
        keep = alive.topk(N, dim=1).indices  # (B, N), best first
        beam_scores = alive.gather(1, keep)
        beam_rows = (base + src.gather(1, keep)).flatten()  # (B*N,) cache row each new beam extends
        seq = seq[beam_rows]
        if recording:
            beam_idx = beam_idx[beam_rows]
            beam_idx[:, step] = beam_rows
        if stops is not None:
            stop_states = cand_states.view(B, K, -1)[torch.arange(B, device=dev)[:, None], keep].flatten(0, 1)
        seq[:, t] = tok.gather(1, keep).flatten()
        t += 1

        open_ &= can_improve(store, beam_scores[:, 0], generated, max_new_tokens, length_penalty, early_stopping)
        all_full = early_stopping is True and bool(store.full().all())
        if all_full or not bool(open_.any()):  # the one host sync per step
            break
        steps.reorder(cache, beam_rows)  # (guidance's steps: its rows follow the beams too)
        logits = steps(model, seq[:, t - 1 : t], cache, pos)  # (B*N, V)
        if pos is not None:
            pos += 1

    # A returned slot that is empty (-inf), or holds a hypothesis grown from a dead start beam (its log-prob sum
    # near DEAD_BEAM), is no real hypothesis: only filters or bans that keep too few tokens leave one.
    real = store.scores * store.lengths.float() ** length_penalty > DEAD_BEAM / 2  # (B, N)
    short = ~real[:, :R].all(dim=1)  # (B,)
    if bool(short.any()):
        b = int(short.nonzero()[0])
        found = int(real[b].sum())
        filters = ", ".join(f"{k}={processors.get(k)}" for k in FILTERS)
        raise ValueError(f"beam {'sampling' if sample else 'search'} found {found} hypotheses for prompt {b}, fewer "
                         f"than num_return_sequences={R}: the filters ({filters}) or banned tokens keep too few tokens "
                         f"for num_beams={N}; loosen them, or lower num_beams or num_return_sequences")
    new = int(store.lengths[:, :R].max())  # longest returned hypothesis
    sequences = store.seqs[:, :R, : T + new].reshape(B * R, T + new)
    return GenerateOutput(
        sequences=sequences, scores=store.scores[:, :R].reshape(B * R),
        step_scores=tuple(step_scores) if output_scores else None, logits=tuple(raw) if output_logits else None,
        beam_indices=store.beams[:, :R, :new].reshape(B * R, new) if recording else None)
