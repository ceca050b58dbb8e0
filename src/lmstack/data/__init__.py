"""Data: byte-level BPE tokenizer, corpora prepared as flat token files, instruction-tuning data and
the Shakespeare question-answering task."""

from .corpus import (CorpusError, TokenDataset, build_dataset, lmstack_home, load_dataset,
                     prepare_shakespeare, prepare_text)
from .instruct import (IGNORE_INDEX, Example, InstructError, TokenizedExample, encode_example, encode_examples,
                       encode_prompt, load_examples, load_split, pack_batch, pad_batch)
from .shakespeare_task import prepare_shakespeare_tasks
from .tokenizer import BOS, EOS, PAD, Tokenizer

__all__ = ["BOS", "EOS", "IGNORE_INDEX", "PAD", "CorpusError", "Example", "InstructError", "TokenDataset",
           "TokenizedExample", "Tokenizer", "build_dataset", "encode_example", "encode_examples", "encode_prompt",
           "lmstack_home", "load_dataset", "load_examples", "load_split", "pack_batch", "pad_batch",
           "prepare_shakespeare", "prepare_shakespeare_tasks", "prepare_text"]
