"""Byte-level BPE tokenizer (GPT-2, Radford et al. 2019) on HF `tokenizers`; HF tokenizer dirs.

Every UTF-8 byte is mapped to one printable unicode character, so the base alphabet is the 256
bytes and any string round-trips exactly; BPE then merges frequent adjacent symbols up to the
vocabulary size. Special tokens (BOS/EOS/PAD) are only ever inserted by id: text that happens to
spell "<|eos|>" is encoded as ordinary bytes (`encode_special_tokens`).

`from_file` also reads a Hugging Face tokenizer folder the way transformers' `AutoTokenizer` does:
token names from tokenizer_config.json (else special_tokens_map.json), the chat template
(chat_template.jinja, else tokenizer_config.json), stop ids from generation_config.json. Two
switches give transformers' behaviour where it differs from ours: `add_special_tokens=True` runs
the tokenizer's own post-processor (Llama's BOS), and `parse_special=True` reads special tokens
spelled in the text, which chat encoding needs because a template writes `<|im_start|>` as text.
"""

from __future__ import annotations

import json
import os
import re

from functools import cache, cached_property
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ..config import CONFIG_FORMAT, hf_model_type
from ..io import atomic_write_text, first_line, read_json_object

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2 in a tokenizer we train

# transformers' named special tokens, all visible to chat templates; lmstack's defaults for three
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
_DEFAULT_NAMES = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# transformers 5's tokenizer classes for the families lmstack loads, with their default token names,
# and the class it picks from config.json's model_type when tokenizer_config names none
_CLASS_NAMES = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "GPT2Tokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
}
_MODEL_TYPE_CLASSES = {"gpt2": "GPT2Tokenizer", "qwen2": "Qwen2Tokenizer"}
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte fallback
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named templates beside it (transformers 5): tool_use.jinja
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   CHAT_TEMPLATE_FILE)  # and the named chat templates in CHAT_TEMPLATE_DIR


class Tokenizer:
    """A `tokenizers.Tokenizer` (`.hf`) plus the ids of its BOS/EOS/PAD tokens (None if absent),
    the named special tokens a chat template sees (`.special_tokens`), the ids that end a
    generation (`.stop_ids`), the Jinja chat template (`.chat_template`, None if absent) and any
    named ones beside it (`.chat_templates`, e.g. {"tool_use": …}, used when tools are passed)."""

    def __init__(self, hf: HFTokenizer, *, bos: str | None = BOS, eos: str | None = EOS,
                 pad: str | None = PAD, chat_template: str | None = None,
                 chat_templates: dict[str, str] | None = None):
        self.hf = hf
        self.hf.encode_special_tokens = True  # user text never becomes a special token
        self.bos_id = _id_or_none(hf, bos)
        self.eos_id = _id_or_none(hf, eos)
        self.pad_id = _id_or_none(hf, pad)
        self.chat_template = chat_template
        self.chat_templates = dict(chat_templates or {})
        self.special_tokens = _in_vocab(hf, {"bos_token": bos, "eos_token": eos, "pad_token": pad})
        self.stop_ids = [] if self.eos_id is None else [self.eos_id]

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
        """Load `tokenizer.json`, or a directory holding one, as `AutoTokenizer.from_pretrained`
        would. Optional files beside it: tokenizer_config.json, else special_tokens_map.json, names
        the special tokens (else our default names); chat_template.jinja, else tokenizer_config's
        "chat_template" (a string, or a list of {"name", "template"} whose "default" we take), is
        the chat template, and the other named ones (that list's, then additional_chat_templates/
        NAME.jinja) are `.chat_templates`; generation_config.json's eos_token_id adds stop ids.
        tokenizer.json's post-processor decides what `add_special_tokens=True` adds (as in
        transformers 5); only when it has none do tokenizer_config's `add_bos_token`/`add_eos_token`
        make one (transformers 4).
        Padding and truncation saved in tokenizer.json are switched off: transformers applies them
        only when a call asks, and we never do.

        Like transformers 5, the tokenizer class the folder names (tokenizer_config's
        "tokenizer_class", else config.json's model_type) matters: its default token names fill
        the unnamed ones (GPT-2's <|endoftext|>, Llama's <s>/</s>/<unk>), and `LlamaTokenizer`
        replaces a SentencePiece tokenizer.json's normalizer and pre-tokenizer with a Metaspace
        whose prefix follows tokenizer_config's `legacy` and `add_prefix_space` (Llama-2's file
        prepends "▁" after every special token; with `"legacy": false` transformers does not). A
        byte-level tokenizer.json, or a Mistral model's, is used as it is (transformers 5.24 then
        also drops LlamaTokenizer's default names; we keep them, so such a folder keeps its EOS).
        An lmstack model folder counts as the HF family it exports to (`convert --from-hf` then
        reads its tokenizer as the source folder did).
        tokenizer_config's `added_tokens_decoder` flags win over tokenizer.json's, and every named
        or extra special token becomes a special token, added to the vocabulary if missing there."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"tokenizer file not found: {file}; pass a tokenizer.json or a "
                             f"directory containing one")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"could not read tokenizer {file}: {first_line(e)}; pass a valid "
                             f"HF tokenizers tokenizer.json") from None
        hf.no_padding()
        hf.no_truncation()
        folder = file.parent
        config = read_json_object(folder / "tokenizer_config.json")
        model_config = _hf_model_config(read_json_object(folder / "config.json"))
        klass = _tokenizer_class(config, model_config)
        special_map = read_json_object(folder / "special_tokens_map.json")
        declared = _token_names(config, special_map, klass)
        if _rebuilds_llama_pipeline(klass, model_config, hf):
            _llama_pipeline(hf, config)
        _add_config_tokens(hf, config, declared)
        # what the folder leaves unnamed is None, as in transformers, but in a tokenizer we trained
        # (ids 0-2 are our BOS/EOS/PAD) those three stand
        ours = _DEFAULT_NAMES if [hf.id_to_token(i) for i in range(3)] == SPECIAL_TOKENS else {}
        names = {k: declared.get(k, ours.get(k)) for k in NAMED_TOKENS}
        if hf.post_processor is None:
            _add_flag_post_processor(hf, names, config)
        default, named = _chat_templates(folder, config)
        tok = cls(hf, bos=names["bos_token"], eos=names["eos_token"], pad=names["pad_token"],
                  chat_template=default, chat_templates=named)
        tok.special_tokens.update(_in_vocab(hf, names))
        tok.stop_ids = _stop_ids(tok.eos_id, folder / "generation_config.json")
        return tok

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` atomically, and the chat template as chat_template.jinja beside
        it when there is one (named ones as additional_chat_templates/NAME.jinja); `path` is a
        directory or a file path. Returns the tokenizer.json."""
        path = Path(path)
        file = path if path.suffix == ".json" and not path.is_dir() else path / "tokenizer.json"
        atomic_write_text(file, self.hf.to_str())
        if self.chat_template is not None:
            atomic_write_text(file.parent / CHAT_TEMPLATE_FILE, self.chat_template)
        for name, template in self.chat_templates.items():
            (file.parent / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
            atomic_write_text(file.parent / CHAT_TEMPLATE_DIR / f"{_template_name(name)}.jinja", template)
        return file

    # ---- encode / decode ----------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               add_special_tokens: bool = False, parse_special: bool = False,
               continuation: bool = False) -> list[int]:
        """Token ids of `text`. `add_bos`/`add_eos` put our BOS/EOS around it by id;
        `add_special_tokens` instead runs the tokenizer's own post-processor, as transformers'
        `tok(text).input_ids` does (BOS for Llama, nothing for a tokenizer we trained).
        `parse_special`: text that spells a special token ("<|im_start|>") becomes that token, as
        in transformers; leave it off for user text, which should stay text. `continuation`: the
        text continues one already encoded, so the word-start prefix a tokenizer puts at the start
        of a text (SentencePiece's "▁", ByteLevel's add_prefix_space) is not added, as it is not in
        the middle of one whole text."""
        hf = self._backend(add_bos or add_eos, add_special_tokens, parse_special, continuation)
        ids = hf.encode(text, add_special_tokens=add_special_tokens).ids
        return self._wrap(ids, add_bos, add_eos)

    @cached_property
    def leading_special_ids(self) -> list[int]:
        """The ids the post-processor puts before a text (Llama's BOS; [] for most), without the ones
        it puts after it (an EOS that some add)."""
        enc = self.hf.encode("a", add_special_tokens=True)
        lead = next((i for i, m in enumerate(enc.special_tokens_mask) if not m), len(enc.ids))
        return list(enc.ids[:lead])

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool = False,
                     add_eos: bool = False, add_special_tokens: bool = False,
                     parse_special: bool = False, continuation: bool = False) -> list[list[int]]:
        """`encode` of each text, in parallel."""
        hf = self._backend(add_bos or add_eos, add_special_tokens, parse_special, continuation)
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking we never use
        batch = getattr(hf, "encode_batch_fast", hf.encode_batch)
        encs = batch(list(texts), add_special_tokens=add_special_tokens)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encs]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _backend(self, wrap: bool, add_special_tokens: bool, parse_special: bool,
                 continuation: bool = False) -> HFTokenizer:
        if wrap and add_special_tokens:
            raise ValueError("pass add_bos/add_eos or add_special_tokens=True, not both: each "
                             "adds special tokens, so together they could add BOS twice")
        if not (parse_special or continuation):
            return self.hf
        key = (parse_special, continuation)
        if key not in self._variants:  # built once: a copy costs a serialisation of the whole vocabulary
            self._variants[key] = self._variant(parse_special, continuation)
        return self._variants[key]

    @cached_property
    def _variants(self) -> dict[tuple[bool, bool], HFTokenizer]:
        return {}

    def _variant(self, parse_special: bool, continuation: bool) -> HFTokenizer:
        """A copy of `hf` that reads special tokens spelled in the text, and/or adds no word-start
        prefix (continuation). Copies rather than toggling `hf`, so encoding stays safe across
        threads; made on first use: changes to `hf` (added tokens) belong before the first encode."""
        spec = json.loads(self.hf.to_str())
        if continuation:
            spec["pre_tokenizer"] = _without_prefix(spec.get("pre_tokenizer"))
            spec["normalizer"] = _without_prefix(spec.get("normalizer"))
        hf = HFTokenizer.from_str(json.dumps(spec))
        hf.encode_special_tokens = not parse_special
        return hf

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [_require(self.bos_id, "BOS"), *ids]
        if add_eos:
            ids = [*ids, _require(self.eos_id, "EOS")]
        return ids

    # ---- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False, chat_template: str | None = None,
                            tokenize: bool = True, **template_vars: Any) -> list[int] | str:
        """`messages` (dicts with "role" and "content") rendered as transformers'
        `apply_chat_template` does: the prompt string when `tokenize=False`, else its ids, with the
        special tokens the template writes read as tokens and nothing else added (a template that
        wants BOS writes `bos_token`). `add_generation_prompt` appends the header that opens an
        assistant turn; `continue_final_message` ends the prompt inside the last message instead, so
        the model continues it; `template_vars` (tools=[...], enable_thinking=False, …) are passed
        to the template. The template: `chat_template` (a name in `.chat_templates`, or Jinja
        source), else the "tool_use" one when tools are passed and there is one, else
        `.chat_template`."""
        from .chat import render_chat  # jinja2 is needed only here

        template = self._pick_template(chat_template, template_vars.get("tools") is not None)
        text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message,
                           **{**self.special_tokens, **template_vars})
        return self.encode(text, parse_special=True) if tokenize else text

    def _pick_template(self, chat_template: str | None, tools: bool) -> str:
        if chat_template is not None:
            if chat_template == "default" and self.chat_template is not None:
                return self.chat_template
            return self.chat_templates.get(chat_template, chat_template)
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_templates:
            raise ValueError(f"this tokenizer has named chat templates {sorted(self.chat_templates)} and no "
                             f"default one; pick one with chat_template=NAME")
        raise ValueError("this tokenizer has no chat_template; set tok.chat_template to a "
                         "Jinja template string, or put chat_template.jinja (or a "
                         "\"chat_template\" in tokenizer_config.json) beside tokenizer.json")

    # ---- vocabulary ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One past the largest id (what an embedding table needs; ids need not be contiguous)."""
        return max(self.hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def hf_config(self) -> dict:
        """A tokenizer_config.json for a folder holding this tokenizer.json: the class that reads
        tokenizer.json as it is (transformers 4.x's AutoTokenizer needs one, or a model's
        config.json) and the BOS/EOS/pad token names (null where there is none)."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {"tokenizer_class": "PreTrainedTokenizerFast",
                **{k: None if i is None else self.id_to_token(i) for k, i in names.items()}}

    def token_to_id(self, s: str) -> int | None:
        return self.hf.token_to_id(s)

    def token_texts(self) -> list[bytes]:
        """(vocab_size,) the UTF-8 bytes each id stands for in the middle of a text: a byte-level BPE
        token's bytes, a SentencePiece piece with "▁" as a space and "<0xNN>" as that byte, an added
        or special token's content (what HF's stop-string matching reads); b"" for unused ids."""
        added = self.hf.get_added_tokens_decoder()  # id -> AddedToken
        byte_level = _byte_level(self.hf)
        if not byte_level and not _sentencepiece(self.hf):
            raise ValueError("reading the text of each token needs a byte-level BPE or SentencePiece tokenizer; "
                             "this one's decoder is neither")
        chars = _byte_level_chars()
        out = [b""] * self.vocab_size
        for tok, i in self.hf.get_vocab(with_added_tokens=False).items():
            if i in added:
                continue
            if byte_level:
                try:
                    out[i] = bytes(chars[c] for c in tok)
                except KeyError:
                    raise ValueError(f"token {i} ({tok!r}) is not byte-level BPE; a ByteLevel tokenizer's tokens "
                                     f"must all be") from None
            else:
                out[i] = bytes([int(tok[3:5], 16)]) if _BYTE_PIECE.fullmatch(tok) else tok.replace("▁", " ").encode()
        for i, t in added.items():
            out[i] = t.content.encode()
        return out

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int32: how many UTF-8 bytes each token stands for (``token_texts``), 0 for
        special/added tokens and unused ids (bits-per-byte counts the text, not the markup)."""
        added = self.hf.get_added_tokens_decoder()
        return np.array([0 if i in added else len(b) for i, b in enumerate(self.token_texts())], dtype=np.int32)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, "
                f"chat_template={self.chat_template is not None})")


def _without_prefix(step: dict | None) -> dict | None:
    """A pre-tokenizer's or normalizer's JSON without the prefix it puts at the start of a text:
    Metaspace's prepend_scheme "never", ByteLevel's add_prefix_space off, no Prepend normalizer."""
    if step is None:
        return None
    kind = step.get("type")
    if kind == "Sequence":
        key = "pretokenizers" if "pretokenizers" in step else "normalizers"
        parts = [p for p in (_without_prefix(p) for p in step[key]) if p is not None]
        return {**step, key: parts}
    if kind == "Prepend":
        return None
    if kind == "Metaspace":  # (older tokenizers wrote add_prefix_space instead of prepend_scheme)
        return {**step, "prepend_scheme": "never", **({"add_prefix_space": False} if "add_prefix_space" in step else {})}
    if kind == "ByteLevel":
        return {**step, "add_prefix_space": False}
    return step


@cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable Latin-1 bytes stand for
    themselves, every other byte b for chr(256 + n), n counting those others in byte order."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = sorted(set(range(256)) - set(shown))
    return {**{chr(b): b for b in shown}, **{chr(256 + n): b for n, b in enumerate(hidden)}}


def _id_or_none(hf: HFTokenizer, token: str | None) -> int | None:
    return None if token is None else hf.token_to_id(token)


def _in_vocab(hf: HFTokenizer, names: dict[str, str | None]) -> dict[str, str]:
    """The named tokens that are set and exist in the vocabulary."""
    return {k: v for k, v in names.items() if _id_or_none(hf, v) is not None}


def _hf_model_config(model_config: dict) -> dict:
    """config.json as transformers sees it: an lmstack model folder's (which names no HF model_type)
    gets the model_type its HF export will have, so the tokenizer reads as it will there."""
    if model_config.get("format") != CONFIG_FORMAT or "model_type" in model_config:
        return model_config
    try:
        model_type = hf_model_type(model_config.get("qkv_bias"), model_config.get("sliding_window"))
    except ValueError:  # no HF equivalent
        return model_config
    return {**model_config, "model_type": model_type}


def _tokenizer_class(config: dict, model_config: dict) -> str | None:
    """The transformers 5 tokenizer class (without "Fast") that this folder names, among those whose
    defaults or pipeline lmstack follows: tokenizer_config's "tokenizer_class", else the one
    transformers maps config.json's model_type to; transformers always uses Qwen2Tokenizer for a
    qwen2 model."""
    model_type = model_config.get("model_type")
    declared = config.get("tokenizer_class") or model_config.get("tokenizer_class")
    declared = declared.removesuffix("Fast") if isinstance(declared, str) else None
    if model_type == "qwen2":
        return "Qwen2Tokenizer"
    if declared is None:
        return _MODEL_TYPE_CLASSES.get(model_type)
    return declared if declared in _CLASS_NAMES else None


def _rebuilds_llama_pipeline(klass: str | None, model_config: dict, hf: HFTokenizer) -> bool:
    """Whether transformers 5 replaces tokenizer.json's pipeline with LlamaTokenizer's: not for a
    Mistral model's folder nor a byte-level tokenizer.json (it reads those as they are)."""
    return klass == "LlamaTokenizer" and model_config.get("model_type") != "mistral" and not _byte_level(hf)


def _sentencepiece(hf: HFTokenizer) -> bool:
    """A decoder that turns "▁" back into spaces (Metaspace, or Llama-2's Replace)."""
    return hf.decoder is not None and "▁".encode() in hf.decoder.__getstate__()


def _byte_level(hf: HFTokenizer) -> bool:
    """A ByteLevel step in the pre-tokenizer or decoder (their JSON, without the vocabulary's)."""
    return any(part is not None and b'"ByteLevel"' in part.__getstate__() for part in (hf.pre_tokenizer, hf.decoder))


def _llama_pipeline(hf: HFTokenizer, config: dict) -> None:
    """transformers 5's LlamaTokenizer pipeline: no normalizer, a Metaspace that prefixes "▁" to the
    text's first piece only (`legacy` false, the default), to every piece between special tokens
    (`legacy` true) or never (`add_prefix_space` false), and the matching SentencePiece decoder."""
    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if config.get("legacy", False) else "first") if prefix else "never"
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))


def _add_config_tokens(hf: HFTokenizer, config: dict, names: dict[str, str | None]) -> None:
    """As transformers 5 does: tokenizer_config's added_tokens_decoder entries with their flags (a
    named token is always special), then each named and extra special token not yet an added one,
    as a special token; a token missing from the vocabulary is appended to it."""
    named = {v for v in names.values() if v is not None}
    extra = [_token_content(t, key) for key in ("additional_special_tokens", "extra_special_tokens")
             if isinstance(config.get(key), list) for t in config[key]]
    extra = [t for t in extra if t is not None]
    entries = config.get("added_tokens_decoder")
    entries = entries if isinstance(entries, dict) else {}
    wanted = []
    for _, t in sorted(entries.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise ValueError(f"added_tokens_decoder entries need a string \"content\", got {t!r}; fix "
                             f"tokenizer_config.json")
        flags = {k: bool(t[k]) for k in ("lstrip", "rstrip", "single_word", "normalized", "special") if k in t}
        if t["content"] in named or t["content"] in extra:
            flags["special"] = True
        wanted.append(AddedToken(t["content"], **flags))
    listed = {t.content for t in wanted}
    wanted += [AddedToken(c, special=True, normalized=False) for c in dict.fromkeys([*named, *extra])
               if c not in listed]
    have = {t.content: t for t in hf.get_added_tokens_decoder().values()}
    new = [t for t in wanted if t.content not in have or _flags(have[t.content]) != _flags(t)]
    if new:
        hf.add_tokens(new)


def _flags(t: AddedToken) -> tuple:
    return t.content, t.lstrip, t.rstrip, t.single_word, t.normalized, t.special


def _token_names(config: dict, special_map: dict, klass: str | None) -> dict[str, str | None]:
    """The named special tokens the folder sets, as transformers 5 resolves them: from
    tokenizer_config.json (an explicit null counts); in a folder written before transformers 4.34
    (no added_tokens_decoder), special_tokens_map.json's entries win over it; else the tokenizer
    class's defaults. Names none of these set are left out."""
    source = {**_CLASS_NAMES.get(klass, {}), **config}
    if "added_tokens_decoder" not in config:
        source.update(special_map)
    return {key: _token_content(source[key], key) for key in NAMED_TOKENS if key in source}


def _token_content(value, key: str = "token") -> str | None:
    """tokenizer_config.json writes a special token as a string or {"content": ...}."""
    content = value.get("content") if isinstance(value, dict) else value
    if content is not None and not isinstance(content, str):
        raise ValueError(f"{key} must be a string or {{\"content\": string}}, got {value!r}; fix "
                         f"tokenizer_config.json / special_tokens_map.json")
    return content


def _add_flag_post_processor(hf: HFTokenizer, names: dict, config: dict) -> None:
    """HF's add_bos_token/add_eos_token flags as a TemplateProcessing post-processor (what
    transformers 4 built); tokens missing from the vocabulary are skipped, as there."""
    bos = names["bos_token"] if config.get("add_bos_token") else None
    eos = names["eos_token"] if config.get("add_eos_token") else None
    pre = [bos] if _id_or_none(hf, bos) is not None else []
    post = [eos] if _id_or_none(hf, eos) is not None else []
    if not pre and not post:
        return
    single = " ".join([*pre, "$A", *post])
    pair = " ".join([single, *(f"{t}:1" for t in pre), "$B:1", *(f"{t}:1" for t in post)])
    special = {t: hf.token_to_id(t) for t in (*pre, *post)}
    hf.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                      special_tokens=list(special.items()))


def _chat_templates(folder: Path, config: dict) -> tuple[str | None, dict[str, str]]:
    """(the default chat template, the named others). Files win over tokenizer_config.json's
    entries, as in transformers: chat_template.jinja (else additional_chat_templates/default.jinja)
    over its "chat_template", additional_chat_templates/NAME.jinja over its list's NAME."""
    template = config.get("chat_template")
    named: dict = {}
    if isinstance(template, list):  # [{"name": "default", "template": …}, {"name": "tool_use", …}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in named.items()):
            raise ValueError(f"chat_template in {folder / 'tokenizer_config.json'}: each entry of the list "
                             f"needs a string \"name\" and \"template\"")
        template = named.pop("default", None)
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template in {folder / 'tokenizer_config.json'} must be a string or "
                         f"a list of {{\"name\", \"template\"}}, got {type(template).__name__}")
    for file in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        named[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    template = named.pop("default", template)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return template, named


def _template_name(name: str) -> str:
    """A named chat template's file stem: a plain name, never a path."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"chat template name {name!r} cannot be a file name; use letters, digits, '_' or '-'")
    return name


def _stop_ids(eos_id: int | None, file: Path) -> list[int]:
    """EOS plus generation_config.json's eos_token_id (an id or a list: Llama-3 Instruct also
    stops on <|eot_id|>), without repeats."""
    extra = read_json_object(file).get("eos_token_id")
    extra = [] if extra is None else [extra] if isinstance(extra, int) else extra
    if not isinstance(extra, list) or not all(type(i) is int for i in extra):
        raise ValueError(f"eos_token_id in {file} must be an id or a list of ids, got {extra!r}")
    return list(dict.fromkeys([*([] if eos_id is None else [eos_id]), *extra]))


def _require(token_id: int | None, what: str) -> int:
    if token_id is None:
        raise ValueError(f"this tokenizer has no {what} token; train one with lmstack or add a "
                         f"tokenizer_config.json naming {what.lower()}_token")
    return token_id


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy what a model folder holds besides weights and config from ``src`` to ``dst``: the
    tokenizer, its special-token names, its chat templates (named ones in
    ``additional_chat_templates/`` included) and its generation config."""
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())
    for file in sorted((src / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        (dst / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
        (dst / CHAT_TEMPLATE_DIR / file.name).write_bytes(file.read_bytes())
