"""Classifier-free guidance for language models (Sanchez et al. 2023, "Stay on topic with
Classifier-Free Guidance"), as HF transformers' ``generate(guidance_scale=...)``.

Each step mixes the next-token log-probs given the prompt (conditional) with those given a
second, unconditional context, decoded alongside:

    scores = log p(x | uncond) + scale * (log p(x | prompt) - log p(x | uncond))

``scale > 1`` pushes the text toward what the prompt makes likelier than the unconditional
context does; ``scale < 1`` toward the unconditional context (so a negative prompt then acts as a
positive one); ``scale = 1`` is plain decoding. The unconditional context is
``negative_prompt_ids`` when given, else each prompt's last token alone (HF's default). Every
token chosen (or what a finished row is fed) is fed to both contexts, and under beam search
the unconditional rows follow their beams. HF's are never reordered: its row i is guided by what
was fed to row i step after step, whatever beam the row holds now, and with a negative prompt its
beam search fails on a shape mismatch (transformers 5.25). The mixed scores then pass through the
other processors: HF applies this one first.

The unconditional rows decode as extra rows of the same batch: the prompts and their
unconditional contexts are prefilled together (left-padded to one length, each row with its own
positions) and every step feeds both halves in one forward pass, so the weights are read once a
step for both, and with ``compile`` on CUDA the pair is one CUDA graph. (HF runs a second forward
pass a step.) ``Guidance`` is the decode loops' ``Steps`` for this: it prefills, steps and reorders
the joint rows and hands the loop the prompts' half. The price: a context much shorter than the
prompts (the default one token) is left-padded to their length, and its rows' attention reads
those masked slots (measured in docs/benchmarks.md: on the CPU, 28% slower than a second pass at
batch 8 with 768-token prompts; faster with short ones).
"""

from __future__ import annotations

import math
import numbers

import torch

from .decode import Steps, check_ids, check_length, padded_positions, prepare_inputs


def check_guidance_scale(guidance_scale) -> bool:
    """True when ``guidance_scale`` turns guidance on (a finite number other than 1; None = off)."""
    if guidance_scale is None:
        return False
    if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool) or \
            not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number (1 or None = no guidance; "
                         f"> 1 follows the prompt more closely, HF's typical 1.5)")
    return guidance_scale != 1


def left_extend(x: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ids x (B, T) and their mask (None: all tokens) to ``length`` columns: (ids, bool mask)."""
    B, T = x.shape
    mask = torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
    if length == T:
        return x, mask
    return (torch.cat([x.new_zeros(B, length - T), x], 1),
            torch.cat([mask.new_zeros(B, length - T), mask], 1))


class Guidance:
    """Classifier-free guidance for one ``generate`` call, as the decode loop's ``Steps`` (``inner``
    runs the actual steps: eager, compiled, static). ``start`` prefills each prompt together with
    its unconditional context (its negative prompt, else its last token) as rows ``R ...`` of one
    cache; each call feeds the token given to both halves; ``reorder`` moves both under beam
    search. The loop sees the prompts' logits only, and ``scores(logits, ids)`` gives the guided
    log-probs (R, V) fp32 from them and the unconditional logits of the same step."""

    def __init__(self, scale: float, negative: torch.Tensor | None, negative_mask: torch.Tensor | None, inner: Steps):
        self.scale, self.inner = float(scale), inner
        self.negative, self.negative_mask = negative, negative_mask  # (B, L) per prompt, or None
        self.rows = 0  # R: the prompts' rows (prompts * copies); the unconditional ones follow
        self.pos: torch.Tensor | None = None  # (2R, 1) the next RoPE positions, when some row is padded
        self.uncond: torch.Tensor | None = None  # (R, V) the unconditional logits of the last step

    @property
    def compile(self) -> bool:
        return self.inner.compile

    def close(self) -> None:
        self.inner.close()

    def start(self, model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor | None,
              pad_mask: torch.Tensor | None, total: int, copies: int = 1):
        """``Steps.start`` on the joint rows; ``positions`` (the prompts') are recomputed with the rest."""
        T = ids.shape[1]
        context, context_mask = (ids[:, -1:], None) if self.negative is None else (self.negative, self.negative_mask)
        L = max(T, context.shape[1])
        (a, a_mask), (b, b_mask) = left_extend(ids, pad_mask, L), left_extend(context, context_mask, L)
        joint, mask = torch.cat([a, b]), torch.cat([a_mask, b_mask])
        mask = None if bool(mask.all()) else mask
        joint_positions = None if mask is None else padded_positions(mask)
        cache, logits = self.inner.start(model, joint, joint_positions, mask, total + L - T, copies)
        self.rows = ids.shape[0] * copies
        self.pos = None if mask is None else joint_positions[:, -1:].repeat_interleave(copies, dim=0) + 1
        self.uncond = logits[self.rows:]
        return cache, logits[: self.rows]

    def __call__(self, model: torch.nn.Module, token: torch.Tensor, cache, positions: torch.Tensor | None):
        """Feed ``token`` (R, 1) to both halves; return the prompts' next-token logits (R, V)
        (``positions``, the prompts', are the first half of this object's own)."""
        logits = self.inner(model, torch.cat([token, token]), cache, self.pos)
        if self.pos is not None:
            self.pos += 1
        self.uncond = logits[self.rows:]
        return logits[: self.rows]

    def reorder(self, cache, rows: torch.Tensor) -> None:
        """Beam search: the unconditional rows follow their beams (row i becomes row ``rows[i]``)."""
        joint = torch.cat([rows, rows + self.rows])
        self.inner.reorder(cache, joint)
        if self.pos is not None:
            self.pos = self.pos[joint]

    def scores(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The guided log-probs (R, V) fp32 of this step, from the prompts' ``logits`` (R, V)."""
        cond = torch.log_softmax(logits.float(), dim=-1)
        uncond = torch.log_softmax(self.uncond.float(), dim=-1)
        return uncond + self.scale * (cond - uncond)


def guidance_for(model: torch.nn.Module, guidance_scale, negative_prompt_ids, negative_prompt_attention_mask,
                 *, prompts: int, max_new_tokens: int, pad_value: int, steps: Steps) -> Guidance | None:
    """``generate``'s guidance keywords, checked, as a ``Guidance`` running its steps through
    ``steps`` (None when off). The negative prompt(s) take the forms ``input_ids`` does (a tensor
    with an optional mask, or ragged lists, left-padded here with ``pad_value``); one negative
    prompt serves every prompt."""
    on = check_guidance_scale(guidance_scale)
    given = negative_prompt_ids is not None
    if not on:
        if given or negative_prompt_attention_mask is not None:
            raise ValueError(f"negative_prompt_ids and negative_prompt_attention_mask apply only with guidance "
                             f"(guidance_scale={guidance_scale!r}); pass guidance_scale != 1, e.g. 1.5, or drop them")
        return None
    if negative_prompt_attention_mask is not None and not given:
        raise ValueError("negative_prompt_attention_mask was given without negative_prompt_ids; pass both, or neither "
                         "(the unconditional context is then each prompt's last token)")
    negative = mask = None
    device = next(model.parameters()).device
    if given:
        try:
            negative, mask = prepare_inputs(negative_prompt_ids, negative_prompt_attention_mask, pad_value, device)
        except ValueError as e:
            raise ValueError(f"negative_prompt_ids: {e}") from None
        if negative.shape[0] not in (1, prompts):
            raise ValueError(f"negative_prompt_ids holds {negative.shape[0]} prompts for {prompts} prompts; pass one "
                             f"negative prompt per prompt, or one for all")
        check_ids(model, negative, mask)
        check_length(model, negative.shape[1], max_new_tokens, what="negative prompt")
        if negative.shape[0] != prompts:
            negative = negative.expand(prompts, -1)
            mask = None if mask is None else mask.expand(prompts, -1)
    return Guidance(guidance_scale, negative, mask, steps)
