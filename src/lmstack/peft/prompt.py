"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

The only trainable weights are ``num_virtual_tokens`` embedding vectors, a "soft prompt" put in
front of every input sequence; every model weight stays frozen. Initialising the soft prompt from
the embeddings of real vocabulary tokens (e.g. a task description) trains faster and more stably
than random init. The virtual tokens occupy the first positions of every sequence: they go
through every layer like tokens, sit in the KV cache, and are dropped from the logits (the model's
``virtual_tokens`` / ``virtual_embeds`` extension point does that). This is HF peft's layout.

``position="end"`` puts the soft prompt at the end of the prompt instead, right before the answer,
as the continuous prompts of P-tuning (Liu et al. 2021, "GPT Understands, Too") sit inside the
template. The input then carries placeholder ids -1 ... -n there (``lmstack.peft.soft_prompt_ids``):
the data pipeline inserts them before every reply it trains on or generates, and the model's
``embed`` swaps in the learned vectors (the ``soft_tokens`` extension point). The frozen model reads them
next to the answer, after the whole input, instead of from the far end of the context, and they
are ordinary positions: packed rows, the KV cache and every decoding path work unchanged.

Trainable parameters: num_virtual_tokens * dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import AdapterModule, like

POSITIONS = ("start", "end")


class SoftPrompt(AdapterModule):
    def __init__(self, num_virtual_tokens: int, dim: int, ref: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_virtual_tokens, dim, **like(ref)))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, dim)


def init_ids(num_virtual_tokens: int, ids: list[int]) -> list[int]:
    """Token ids repeated/truncated to ``num_virtual_tokens`` (the text initialisation of peft)."""
    if not ids:
        raise ValueError("prompt initialisation text/ids are empty; pass at least one token")
    reps = -(-num_virtual_tokens // len(ids))
    return (ids * reps)[:num_virtual_tokens]


def token_ids_of(init_token_ids, init_text: str | None, tokenizer, vocab_size: int) -> list[int] | None:
    """The initialisation ids from ``init_token_ids`` or ``tokenizer.encode(init_text)``, checked
    against the vocabulary (None: neither was given)."""
    if init_text is not None:
        if init_token_ids is not None:
            raise ValueError("pass init_text or init_token_ids, not both")
        if tokenizer is None:
            raise ValueError("init_text needs tokenizer= (an lmstack.Tokenizer) to turn it into token ids")
        init_token_ids = tokenizer.encode(init_text)
    if init_token_ids is None:
        return None
    ids = [int(i) for i in init_token_ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"init token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
    return ids


def apply_prompt(
    model: nn.Module,
    *,
    num_virtual_tokens: int = 20,
    init_token_ids=None,
    init_text: str | None = None,
    tokenizer=None,
    position: str = "start",
) -> None:
    """Give the model a soft prompt of ``num_virtual_tokens`` vectors: copies of the embeddings of
    ``init_token_ids`` (or of ``tokenizer.encode(init_text)``), repeated to length, else random
    rows of the embedding matrix' scale (N(0, std of the embeddings)). ``position``: "start"
    (before the input) or "end" (before the answer; module docstring)."""
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens={num_virtual_tokens!r} must be an integer >= 1")
    if position not in POSITIONS:
        raise ValueError(f"position={position!r} is not one of {', '.join(map(repr, POSITIONS))}")
    emb = model.embed_tokens.weight  # (vocab, dim)
    init_token_ids = token_ids_of(init_token_ids, init_text, tokenizer, emb.shape[0])
    prompt = SoftPrompt(num_virtual_tokens, emb.shape[1], emb)
    with torch.no_grad():
        if init_token_ids is not None:
            ids = init_ids(num_virtual_tokens, init_token_ids)
            prompt.weight.copy_(emb[torch.tensor(ids, device=emb.device)])
        else:
            prompt.weight.normal_(0.0, float(emb.float().std()))
    if position == "end":
        model.soft_tokens = prompt
    else:
        model.virtual_embeds = prompt
        model.virtual_tokens = num_virtual_tokens
