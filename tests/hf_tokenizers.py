"""Tiny byte-level BPE tokenizers built like the Hub's (GPT-2, Llama 3, Qwen2), for tokenizer parity tests."""

from __future__ import annotations

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

# the pre-tokenizer split patterns of Llama 3's and Qwen2's tokenizer.json (Qwen2 splits digits one by one)
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")


def byte_level_bpe(texts: list[str], vocab_size: int, specials: list[str], split_re: str | None = None, *,
                   nfc: bool = False) -> HFTokenizer:
    """A byte-level BPE trained on ``texts``: ByteLevel's own (GPT-2) split when ``split_re`` is None,
    else a Split on it before a ByteLevel that does not split again (Llama 3, Qwen2); ``nfc`` adds
    Qwen2's NFC normalizer."""
    tok = HFTokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    if split_re is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_re), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok
