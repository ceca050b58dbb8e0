"""Packing without padding: documents joined with EOS, cut into fixed-length rows.

Pretraining never pads: the corpus is one token stream in which every document ends with EOS,
and a batch is B windows of T+1 tokens from it (inputs are the first T, targets the last T).
A window usually spans several documents. With ``doc_mask`` the model is told where they start
(``lmstack.kernels.Seqs``, built from the EOS positions): attention stays inside each document and
RoPE positions restart at 0 — see the worked example in ``lmstack/kernels/seqs.py``. Without it,
tokens attend across the EOS as in GPT-2/nanoGPT training.
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels import Seqs


def window_starts(n_tokens: int, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random window offsets (batch_size,) so that each window of seq_len + 1 tokens fits."""
    if n_tokens < seq_len + 1:
        raise ValueError(f"the token file has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; use a smaller seq_len")
    return torch.randint(0, n_tokens - seq_len, (batch_size,), generator=generator)


def get_windows(tokens: np.ndarray, starts: torch.Tensor | list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) int64 from windows of a 1-D token array (a memmap is fine)."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in map(int, starts)])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


def sample_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    return get_windows(tokens, window_starts(len(tokens), seq_len, batch_size, generator), seq_len)


def doc_seqs(inputs: torch.Tensor, eos_id: int) -> Seqs:
    """Document boundaries of a packed batch: a new document starts after every EOS."""
    return Seqs.from_eos(inputs, eos_id)


def pack_documents(docs: list[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Join token lists with EOS after each and cut into rows of seq_len tokens (the tail that
    does not fill a row is dropped). Returns (n_rows, seq_len) int64."""
    stream = [t for d in docs for t in (*d, eos_id)]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one row of seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.int64).view(n, seq_len)
