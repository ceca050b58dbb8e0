"""Packed-sequence metadata shared by data packing, the model and the attention kernels.

Several documents share one row of a packed batch. Attention must never let a token see another
document, and RoPE positions restart at 0 for every document. Worked example, one row of 8 tokens
holding documents A (3 tokens), B (4 tokens) and the start of C (1 token)::

    tokens     a0 a1 a2 b0 b1 b2 b3 c0
    doc_ids     0  0  0  1  1  1  1  2
    positions   0  1  2  0  1  2  3  0

    block-causal mask (row = query, col = key, 1 = may attend)
        a0  1 . . . . . . .
        a1  1 1 . . . . . .
        a2  1 1 1 . . . . .
        b0  . . . 1 . . . .
        b1  . . . 1 1 . . .
        b2  . . . 1 1 1 . .
        b3  . . . 1 1 1 1 .
        c0  . . . . . . . 1

For the varlen kernels the batch is flattened to (B*T,) tokens and ``cu_seqlens`` holds the
cumulative document boundaries, ``[0, 3, 7, 8]`` here (a row boundary is always a document
boundary), with ``max_seqlen = 4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Seqs:
    doc_ids: torch.Tensor  # (B, T) int64, a new id wherever a document starts within a row
    positions: torch.Tensor  # (B, T) int64, restarts at 0 per document
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32, boundaries over the flattened B*T tokens
    max_seqlen: int

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> "Seqs":
        """Build everything from per-row document ids (B, T); ids only need to change at boundaries."""
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (batch, seq_len), got shape {tuple(doc_ids.shape)}")
        B, T = doc_ids.shape
        start = torch.ones_like(doc_ids, dtype=torch.bool)
        start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T) True at each document's first token
        flat_start = start.reshape(-1)
        idx = torch.arange(B * T, device=doc_ids.device)
        # Position = distance to the most recent document start.
        last_start = torch.cummax(torch.where(flat_start, idx, torch.zeros_like(idx)), dim=0).values
        positions = (idx - last_start).view(B, T)
        starts = idx[flat_start]
        cu = torch.cat([starts, idx.new_tensor([B * T])]).to(torch.int32)
        lens = cu[1:] - cu[:-1]
        max_seqlen = int(lens.max()) if lens.numel() else 0  # an empty batch has no documents
        # Renumber documents so ids are unique across the whole batch (row boundaries split docs).
        ids = torch.cumsum(flat_start.long(), 0).view(B, T) - 1
        return cls(doc_ids=ids, positions=positions, cu_seqlens=cu, max_seqlen=max_seqlen)

    @classmethod
    def from_eos(cls, tokens: torch.Tensor, eos_id: int) -> "Seqs":
        """Documents end at (and include) each EOS token: the token after an EOS starts a new one."""
        ends = tokens == eos_id  # (B, T)
        starts = torch.zeros_like(ends)
        starts[:, 1:] = ends[:, :-1]
        return cls.from_doc_ids(torch.cumsum(starts.long(), dim=1))

    def to(self, device: torch.device | str) -> "Seqs":
        return Seqs(
            self.doc_ids.to(device, non_blocking=True),
            self.positions.to(device, non_blocking=True),
            self.cu_seqlens.to(device, non_blocking=True),
            self.max_seqlen,
        )
