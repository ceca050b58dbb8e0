"""Tiny tokenizers built like the Hub's (GPT-2, Llama 3, Qwen2 byte-level BPE; Llama 2 / Mistral
SentencePiece BPE), for tokenizer parity tests."""

from __future__ import annotations

import json

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


def sentencepiece_bpe(texts: list[str], specials=("<unk>", "<s>", "</s>"), prepend_scheme: str = "first", *,
                      vocab_size: int = 300, fuse_unk: bool = False) -> HFTokenizer:
    """A SentencePiece BPE trained on ``texts`` and converted to tokenizer.json as Llama 2 / Mistral
    ship it: a Metaspace pre-tokenizer (``prepend_scheme``, no split), ``<unk>``, 256 byte-fallback
    pieces ``<0xNN>`` after the trained vocabulary, and the decoder that turns "▁" back into spaces,
    fuses the fallback bytes and strips one leading space."""
    base = HFTokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    base.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                        show_progress=False))
    spec = json.loads(base.to_str())
    vocab = spec["model"]["vocab"]
    n = len(vocab)
    vocab.update({f"<0x{i:02X}>": n + i for i in range(256)})
    spec["model"]["byte_fallback"] = True
    if fuse_unk:
        spec["model"]["fuse_unk"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return HFTokenizer.from_str(json.dumps(spec))
