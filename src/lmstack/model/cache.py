"""Preallocated KV cache (gpt-fast / torchtune style): one K and one V buffer per layer.

``Transformer.setup_cache(batch_size, max_len)`` allocates it once; every forward writes the new
keys/values at ``[length, length + T)`` and attention reads ``[0, length + T)``, so decoding never
reallocates or concatenates. ``reset()`` empties it for the next prompt, ``reorder(index)``
permutes the batch (beam search). ``key_valid`` marks padding keys of left-padded batches; it is
only allocated once a batch has padding, so the common case builds no mask at all.

Static-shape steps (for CUDA graphs, as HF's ``StaticCache``): ``update(..., slots=...)`` writes
at slot indices given as a tensor and returns the whole buffers, so a decode step's shapes and
code are the same at every length; attention masks the slots past the query (``query_pos``).
``static_slot()`` pins the buffers' addresses for ``torch.compile`` and gives the ``slot`` tensor
those steps write at; the caller advances ``length`` after each one.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0  # tokens already stored (the same for every row: padding is on the left)
        self.key_valid: torch.Tensor | None = None  # (B, max_len) bool, only when there is padding
        self.slot: torch.Tensor | None = None  # (1,) int64, the next slot of static-shape steps

    def reset(self, *, zero: bool = False) -> None:
        """Empty the cache for the next prompt; its buffers keep their addresses. ``zero``: also
        zero them, so a reused cache is the same as a new one (a static step attends over every
        slot, masked, and a stale NaN would survive its zero weight)."""
        self.length = 0
        self.key_valid = None
        if zero:
            for t in (*self.k, *self.v):
                t.zero_()

    def fits(self, n_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache has ``n_layers`` buffers of ``shape`` (batch, kv heads, max_len, head
        dim), ``dtype`` and ``device`` each."""
        k = self.k[0]
        return len(self.k) == n_layers and tuple(k.shape) == shape and k.dtype == dtype and k.device == device

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) after the cached ones; return all keys/values so far. With
        ``slots`` (T,) int64, store them there instead and return the whole buffers (max_len keys)."""
        if slots is not None:
            # under autocast k arrives in fp32 (RoPE's tables) and v in bf16: store both in the cache's
            # dtype, as slice assignment does below
            self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def mark(self, B: int, T: int, pad_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Record which of the next T keys are real; return key validity (B, length + T) or None."""
        if B != self.batch_size:
            raise ValueError(f"batch of {B} rows fed to a KV cache set up for {self.batch_size}; set up a new cache")
        end = self.length + T
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {T} new tokens > max_len={self.max_len}; "
                "set up a larger cache"
            )
        if pad_mask is not None and self.key_valid is None and not bool(pad_mask.all()):
            self.key_valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=pad_mask.device)
        if self.key_valid is None:
            return None
        self.key_valid[:, self.length : end] = True if pad_mask is None else pad_mask.bool()
        return self.key_valid[:, :end]

    def advance(self, T: int) -> None:
        self.length += T

    def static_slot(self) -> torch.Tensor:
        """The slot of the next static-shape step: ``slot`` (1,) int64, set to ``length``.

        The first call marks every buffer as having a fixed address
        (``torch._dynamo.mark_static_address``), so compiled steps with CUDA graphs write them in
        place instead of copying them in and out."""
        if self.slot is None:
            from torch._dynamo import mark_static_address  # imports dynamo: only here

            for t in (*self.k, *self.v):
                mark_static_address(t)
            self.slot = torch.zeros(1, dtype=torch.long, device=self.k[0].device)
            mark_static_address(self.slot)
        self.slot.fill_(self.length)
        return self.slot

    def reorder(self, index: torch.Tensor) -> None:
        """Regather the rows in place (beam search): row ``i`` becomes row ``index[i]``, one index
        per row. Copies only the filled ``[0, length)`` part, into the same buffers."""
        if index.numel() != self.batch_size:
            raise ValueError(
                f"reorder takes one index per cache row ({self.batch_size}), got {index.numel()}; "
                "for another batch size set up a new cache and copy_rows into it"
            )
        L = self.length
        for t in (*self.k, *self.v):
            t[:, :, :L] = t[:, :, :L].index_select(0, index)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)

    def copy_rows(self, src: KVCache, index: torch.Tensor) -> None:
        """Fill this empty cache with rows ``index`` (one per row of this cache) of ``src``'s
        filled part: beam search prefills each prompt once and copies it to its beams."""
        L = src.length
        if self.length or index.numel() != self.batch_size or L > self.max_len:
            raise ValueError(
                f"copy_rows fills an empty cache of {self.batch_size} rows x {self.max_len} slots; got "
                f"{index.numel()} rows of {L} tokens into one holding {self.length}"
            )
        for dst, s in zip((*self.k, *self.v), (*src.k, *src.v)):
            dst[:, :, :L] = s[:, :, :L].index_select(0, index)
        if src.key_valid is not None:
            self.key_valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=src.key_valid.device)
            self.key_valid[:, :L] = src.key_valid[:, :L].index_select(0, index)
        self.length = L
