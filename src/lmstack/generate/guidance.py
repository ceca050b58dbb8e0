"""Classifier-free guidance for language models (Sanchez et al. 2023, "Stay on topic with
Classifier-Free Guidance"), as HF transformers' ``generate(guidance_scale=...)``.

Each step mixes the next-token log-probs given the prompt (conditional) with those given a
second, unconditional context, decoded alongside on a KV cache of its own:

    scores = log p(x | uncond) + scale * (log p(x | prompt) - log p(x | uncond))

``scale > 1`` pushes the text toward what the prompt makes likelier than the unconditional
context does; ``scale < 1`` toward the unconditional context (so a negative prompt then acts as a
positive one); ``scale = 1`` is plain decoding. The unconditional context is
``negative_prompt_ids`` when given, else each prompt's last token alone (HF's default). Every
token chosen (or the padding of a finished row) is fed to both contexts, and under beam search
the unconditional rows follow their beams. HF's are never reordered: its row i is guided by what
was fed to row i step after step, whatever beam the row holds now, and with a negative prompt its
beam search fails on a shape mismatch (transformers 5.25). The mixed scores then pass through the
other processors: HF applies this one first.

The cost is a second forward pass per step, on the unconditional rows (compiled with
``compile=True``, on the usual cache: not CUDA graphs).
"""

from __future__ import annotations

import math
import numbers

import torch

from .decode import Steps, check_ids, check_length, padded_positions, prefill, prepare_inputs


def check_guidance_scale(guidance_scale) -> bool:
    """True when ``guidance_scale`` turns guidance on (a finite number other than 1; None = off)."""
    if guidance_scale is None:
        return False
    if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool) or \
            not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number (1 or None = no guidance; "
                         f"> 1 follows the prompt more closely, HF's typical 1.5)")
    return guidance_scale != 1


class Guidance:
    """The unconditional branch of one ``generate`` call: ``guide(logits (R, V), ids so far (R, t))``
    returns the guided scores (R, V) fp32. Its first call prefills the unconditional context, each
    later one feeds it ``ids``' last column (the token chosen at the step before). ``copies``:
    rows per prompt (sampling's ``num_return_sequences``, beam search's beams), each prompt's
    negative prompt repeated to its rows. ``compile``: its steps through ``compiled_decode_step``."""

    def __init__(self, model: torch.nn.Module, scale: float, negative: torch.Tensor | None,
                 negative_mask: torch.Tensor | None, copies: int, max_new_tokens: int, compile: bool = False):
        self.model, self.scale, self.max_new_tokens = model, float(scale), max_new_tokens
        self.step = Steps(compile=compile)
        if negative is not None:
            negative = negative.repeat_interleave(copies, dim=0)
            negative_mask = None if negative_mask is None else negative_mask.repeat_interleave(copies, dim=0)
        self.negative, self.negative_mask = negative, negative_mask
        self.cache = None
        self.pos: torch.Tensor | None = None  # (R, 1) the next RoPE positions of a padded negative prompt

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            context = ids[:, -1:] if self.negative is None else self.negative  # (R, L)
            self.cache = self.model.setup_cache(ids.shape[0], context.shape[1] + self.max_new_tokens)
            positions = None if self.negative_mask is None else padded_positions(self.negative_mask)
            uncond = prefill(self.model, context, self.cache, positions, self.negative_mask)
            self.pos = None if positions is None else positions[:, -1:] + 1
        else:
            token = ids[:, -1:]  # a finished row's padding may lie outside the vocabulary: feed it 0 then
            token = token.masked_fill((token < 0) | (token >= self.model.config.vocab_size), 0)
            uncond = self.step(self.model, token, self.cache, self.pos)
            if self.pos is not None:
                self.pos += 1
        cond = torch.log_softmax(logits.float(), dim=-1)
        uncond = torch.log_softmax(uncond.float(), dim=-1)
        return uncond + self.scale * (cond - uncond)

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: the unconditional rows follow the beams (row i becomes row ``rows[i]``)."""
        if self.cache is not None:
            self.cache.reorder(rows)
            if self.pos is not None:
                self.pos = self.pos[rows]


def guidance_for(model: torch.nn.Module, guidance_scale, negative_prompt_ids, negative_prompt_attention_mask,
                 *, prompts: int, copies: int, max_new_tokens: int, pad_value: int,
                 compile: bool = False) -> Guidance | None:
    """``generate``'s guidance keywords, checked, as a ``Guidance`` (None when off). The negative
    prompt(s) take the forms ``input_ids`` does (a tensor with an optional mask, or ragged lists,
    left-padded here with ``pad_value``); one negative prompt serves every prompt."""
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
    return Guidance(model, guidance_scale, negative, mask, copies, max_new_tokens, compile=compile)
