"""Byte-level BPE tokenizer (GPT-2, Radford et al. 2019) on HF `tokenizers`.

Every UTF-8 byte is mapped to one printable unicode character, so the base alphabet is the 256
bytes and any string round-trips exactly; BPE then merges frequent adjacent symbols up to the
vocabulary size. Special tokens (BOS/EOS/PAD) are only ever inserted by id: text that happens to
spell "<|eos|>" is encoded as ordinary bytes (`encode_special_tokens`).
"""

from __future__ import annotations

import json
import os

from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..io import atomic_write_text

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2 in a tokenizer we train


class Tokenizer:
    """A `tokenizers.Tokenizer` (`.hf`) plus the ids of its BOS/EOS/PAD tokens (None if absent)."""

    def __init__(self, hf: HFTokenizer, *, bos: str | None = BOS, eos: str | None = EOS,
                 pad: str | None = PAD):
        self.hf = hf
        self.hf.encode_special_tokens = True  # user text never becomes a special token
        self.bos_id = _id_or_none(hf, bos)
        self.eos_id = _id_or_none(hf, eos)
        self.pad_id = _id_or_none(hf, pad)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at "
                             f"least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` (or a directory holding one); special tokens come from a
        `tokenizer_config.json` beside it when there is one, else from our default names."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"tokenizer file not found: {file}; pass a tokenizer.json or a "
                             f"directory containing one")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"could not read tokenizer {file}: {_first_line(e)}; pass a valid "
                             f"HF tokenizers tokenizer.json") from None
        names = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                cfg = json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"could not read {config}: {_first_line(e)}; fix or delete "
                                 f"it") from None
            names = {k: _token_content(cfg.get(k, v)) for k, v in names.items()}
        return cls(hf, bos=names["bos_token"], eos=names["eos_token"], pad=names["pad_token"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` atomically; `path` is a directory or a file path."""
        path = Path(path)
        file = path if path.suffix == ".json" and not path.is_dir() else path / "tokenizer.json"
        atomic_write_text(file, self.hf.to_str())
        return file

    # ---- encode / decode ----------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(self.hf.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking we never use
        batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        encs = batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encs]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [_require(self.bos_id, "BOS"), *ids]
        if add_eos:
            ids = [*ids, _require(self.eos_id, "EOS")]
        return ids

    # ---- vocabulary ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.hf.token_to_id(s)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int32: UTF-8 bytes each token stands for, 0 for special/added tokens.
        Byte-level BPE writes each byte as one character, so it is the token's length."""
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        added = set(self.hf.get_added_tokens_decoder())
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            tok = self.hf.id_to_token(i)
            if i in added or tok is None:
                continue
            if not set(tok) <= alphabet:
                raise ValueError(f"token {i} ({tok!r}) is not byte-level BPE; token_bytes needs a "
                                 f"ByteLevel tokenizer")
            out[i] = len(tok)
        return out

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def _id_or_none(hf: HFTokenizer, token: str | None) -> int | None:
    return None if token is None else hf.token_to_id(token)


def _token_content(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _require(token_id: int | None, what: str) -> int:
    if token_id is None:
        raise ValueError(f"this tokenizer has no {what} token; train one with lmstack or add a "
                         f"tokenizer_config.json naming {what.lower()}_token")
    return token_id


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
