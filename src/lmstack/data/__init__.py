"""Data: byte-level BPE tokenizer and corpora prepared as flat token files."""

from .corpus import (CorpusError, TokenDataset, build_dataset, lmstack_home, load_dataset,
                     prepare_shakespeare, prepare_text)
from .tokenizer import BOS, EOS, PAD, Tokenizer

__all__ = ["BOS", "EOS", "PAD", "CorpusError", "TokenDataset", "Tokenizer", "build_dataset",
           "lmstack_home", "load_dataset", "prepare_shakespeare", "prepare_text"]
