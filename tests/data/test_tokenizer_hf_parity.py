"""`Tokenizer.from_file(folder)` against `transformers.AutoTokenizer.from_pretrained(folder)` on HF
tokenizer folders laid out the way real checkpoints ship them (Llama-2 / Mistral SentencePiece BPE,
Llama-3 / Qwen2 / GPT-2 byte-level BPE), built offline from tiny tokenizers trained here.

transformers 5 does not always use tokenizer.json as it is: a model-specific class
(`LlamaTokenizer`, `GPT2Tokenizer`, `Qwen2Tokenizer`) rebuilds the pre-tokenizer from
tokenizer_config.json's flags, brings its own default token names, and every named or listed special
token missing from the vocabulary is added to it. These tests pin what a user then sees.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

transformers = pytest.importorskip("transformers")

from lmstack.data.tokenizer import Tokenizer  # noqa: E402

from ..hf_models import hf_is_5  # noqa: E402
from ..hf_tokenizers import LLAMA3_RE, QWEN_RE, byte_level_bpe, sentencepiece_bpe  # noqa: E402

# lmstack reads tokenizer folders as transformers 5 does; 4.x reads some of these differently
pytestmark = pytest.mark.skipif(not hf_is_5(), reason="pins transformers 5's reading of tokenizer folders")

CORPUS = ["You are a helpful assistant. What is the weather in Paris today? It is sunny, 22 degrees.\n" * 10,
          "Hello world, hello there! The quick brown fox jumps over the lazy dog. naïve café 東京 😀\n" * 10,
          "system user assistant [INST] [/INST] <<SYS>> tabs\tand  spaces\r\n12345 " * 10]
PIECES = ["Hello", " world", "  ", "\t", "\n", "\r\n", " ", "😀", "東京", "é", "e\u0301", "naïve", "[INST]", "</s>",
          "<s>", "<unk>", "?", ".", " ,", "12345", "Ω", "\u200b", "🇫🇷", " the", "<|endoftext|>", "<|im_start|>", "ﬁ"]

# meta-llama/Llama-2-7b-chat-hf's chat template
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
          "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
          "{% if p.type == 'text' %}{{ p.text }}{% else %}<|vision|>{% endif %}{% endfor %}{% endif %}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
          "{{ '' if messages | length < 9 else raise_exception('too long: ' ~ messages | length) }}"
          "{% if date %}{{ strftime_now('%Y') }}{% endif %}")
CHATS = [
    [{"role": "user", "content": "What is the weather in Paris today?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  naïve 東京 😀\r\n"},
     {"role": "assistant", "content": " It is sunny. "}, {"role": "user", "content": "again\tand </s> <s> 12345"}],
]


def _ids(out):
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) if rng.random() < 0.7 else chr(rng.randint(32, 0x2FFF))
                   for _ in range(rng.randint(0, 10)))


def _added_tokens_decoder(tok: HFTokenizer) -> dict:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in tok.get_added_tokens_decoder().items()}


def _write(folder: Path, tok: HFTokenizer, config: dict, *, added_tokens_decoder=True, special_map=None,
           generation=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {**({"added_tokens_decoder": _added_tokens_decoder(tok)} if added_tokens_decoder else {}), **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def _both(folder: Path):
    return Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


# -- backends -----------------------------------------------------------------------------------------
def _sentencepiece_bpe(form: str) -> HFTokenizer:
    """A SentencePiece BPE converted to tokenizer.json (``sentencepiece_bpe``) with Llama 2's BOS
    post-processor. `form`: "legacy" = Llama-2's (no pre-tokenizer; normalizer Prepend("▁") +
    Replace(" ", "▁")), or a Metaspace pre-tokenizer with prepend_scheme "first" / "always"."""
    tok = sentencepiece_bpe(CORPUS, prepend_scheme="always" if form == "legacy" else form, fuse_unk=True)
    if form == "legacy":
        spec = json.loads(tok.to_str())
        spec["pre_tokenizer"] = None
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        tok = HFTokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def _byte_level(split_re: str | None, specials: list[str], *, nfc: bool = False) -> HFTokenizer:
    return byte_level_bpe(CORPUS, 400, specials, split_re, nfc=nfc)


def _token(content: str) -> dict:
    """A named token the way transformers 4 wrote it into tokenizer_config.json."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _llama2_folder(folder: Path, form: str = "legacy", legacy: bool | None = False) -> Path:
    """meta-llama/Llama-2-7b-chat-hf's files: tokenizer_class LlamaTokenizer, AddedToken dicts, no
    added_tokens_decoder (written before transformers 4.34), special_tokens_map.json beside it."""
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": _token("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": _token("</s>"),
              "model_max_length": 1000000000000000019884624838656, "pad_token": None, "padding_side": "right",
              "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": _token("<unk>"),
              "chat_template": LLAMA2_TEMPLATE}
    if legacy is not None:
        config["legacy"] = legacy
    names = {"bos_token": _token("<s>"), "eos_token": _token("</s>"), "unk_token": _token("<unk>")}
    for v in names.values():
        v.pop("__type")
    return _write(folder, _sentencepiece_bpe(form), config, added_tokens_decoder=False, special_map=names,
                  generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.6,
                              "top_p": 0.9, "transformers_version": "4.31.0.dev0"})


def _assert_encodes_like(ours: Tokenizer, theirs, texts) -> None:
    for text in texts:
        assert ours.encode(text, add_special_tokens=True, parse_special=True) == theirs(text).input_ids, repr(text)
        assert (ours.encode(text) == theirs(text, add_special_tokens=False, split_special_tokens=True).input_ids), \
            repr(text)


# -- SentencePiece BPE (Llama 2, Mistral v0.1) ---------------------------------------------------------------
def test_llama2_hub_folder_encodes_like_transformers(tmp_path, seed):
    """Llama-2's real tokenizer.json (legacy Prepend/Replace normalizer, no pre-tokenizer) with
    `"legacy": false`, `"tokenizer_class": "LlamaTokenizer"`: transformers 5 rebuilds the pipeline as
    Metaspace(prepend_scheme="first"), so a text after a special token gets no "▁" prefix."""
    ours, theirs = _both(_llama2_folder(tmp_path / "llama2"))
    rng = random.Random(seed)
    fixed = ["Hello world", " Hello", "<s>[INST] Hi [/INST]", "a</s>b", "  two  spaces\n", "東京 😀"]
    _assert_encodes_like(ours, theirs, fixed + [_random_text(rng) for _ in range(40)])


def test_llama2_hub_folder_chat_ids_match_transformers(tmp_path):
    ours, theirs = _both(_llama2_folder(tmp_path / "llama2"))
    assert (ours.bos_id, ours.eos_id, ours.stop_ids) == (theirs.bos_token_id, theirs.eos_token_id, [2])
    for messages in CHATS:
        text = ours.apply_chat_template(messages, tokenize=False)
        assert text == theirs.apply_chat_template(messages, tokenize=False)
        assert text.startswith("<s>[INST] ")
        assert ours.apply_chat_template(messages) == _ids(theirs.apply_chat_template(messages, tokenize=True))


@pytest.mark.parametrize("form,legacy", [
    ("first", False),   # consistent (what convert_slow_tokenizer writes for legacy=False): passes
    ("always", True),   # consistent (legacy=True): passes
    ("first", None),    # no flag: LlamaTokenizer's default legacy=False -> "first": passes
    ("first", True),    # file says "first", config says legacy -> transformers uses "always"
    ("always", False),  # file says "always", config says not legacy -> transformers uses "first"
    ("always", None),
    ("legacy", True),   # Llama-2's normalizer form with legacy=True
])
def test_llama_class_prepend_scheme_follows_config(tmp_path, seed, form, legacy):
    """For tokenizer_class LlamaTokenizer, transformers 5 takes only vocab/merges/post-processor from
    tokenizer.json and sets the Metaspace prepend_scheme from tokenizer_config's `legacy` flag."""
    ours, theirs = _both(_llama2_folder(tmp_path / "tok", form, legacy))
    rng = random.Random(seed)
    _assert_encodes_like(ours, theirs, [" Hello", "<s> x", "a</s> b</s>c", *(_random_text(rng) for _ in range(30))])


def test_sentencepiece_decode_and_round_trip(tmp_path, seed):
    """Decoding (byte fallback, the stripped leading space, specials kept or skipped) as transformers;
    text survives a round trip where SentencePiece can keep it (no leading-space ambiguity)."""
    ours, theirs = _both(_llama2_folder(tmp_path / "tok", "first", False))
    rng = random.Random(seed)
    for _ in range(60):
        text = _random_text(rng)
        ids = theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
        assert ours.decode(torch.tensor(ids)) == theirs.decode(ids, skip_special_tokens=True)
    for text in ["naïve 東京 😀 e\u0301\r\n\tx", "Ω🇫🇷 \u200b end"]:
        assert ours.decode(ours.encode(text)) == text
        assert ours.encode_batch([text, text]) == [ours.encode(text)] * 2


# -- byte-level BPE (Llama 3, Qwen2, GPT-2) -------------------------------------------------------------------
def _byte_level_folder(folder: Path, family: str) -> Path:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_level({"llama3": LLAMA3_RE, "qwen2": QWEN_RE, "gpt2": None}[family], specials, nfc=family == "qwen2")
    # tokens added after training: every flag, special and not, normalized and not
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("[L]", lstrip=True, special=False, normalized=False),
                    AddedToken("[R]", rstrip=True, special=True, normalized=False),
                    AddedToken("word", single_word=True, special=False, normalized=True),
                    AddedToken("café", special=False, normalized=True)])
    tok.add_special_tokens([AddedToken("<|vision|>", special=True, normalized=False)])
    if family == "llama3":
        bos = "<|endoftext|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|im_end|>",
                  "clean_up_tokenization_spaces": True, "chat_template": CHATML}
        gen = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
    elif family == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                  "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
                  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "chat_template": CHATML}
        gen = {"eos_token_id": tok.token_to_id("<|endoftext|>")}
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "add_prefix_space": False, "chat_template": CHATML}
        gen = None
    return _write(folder, tok, config, generation=gen)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gpt2"])
def test_byte_level_encode_decode_batch_match_transformers(tmp_path, seed, family):
    ours, theirs = _both(_byte_level_folder(tmp_path / family, family))
    rng = random.Random(seed)
    extra = ["<think>", " [L] ", "[R]  x", " word ", "words", "café", "cafe\u0301", "<|vision|>", "<|im_end|>"]
    texts = ["".join(rng.choice(extra) if rng.random() < 0.3 else _random_text(rng)[:3] for _ in range(rng.randint(0, 8)))
             for _ in range(60)]
    _assert_encodes_like(ours, theirs, texts)
    assert ours.encode_batch(texts, add_special_tokens=True, parse_special=True) == theirs(texts).input_ids
    for text in texts:
        ids = theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert ours.vocab_size == len(theirs)
    for name in ("bos", "eos", "pad"):
        assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_token_id"), name


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gpt2"])
def test_byte_level_chat_templates_match_transformers(tmp_path, family):
    ours, theirs = _both(_byte_level_folder(tmp_path / family, family))
    parts = [{"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "image"},
                                          {"type": "text", "text": " <think>here"}]}]
    for messages in [*CHATS, parts]:
        for gen in (False, True):
            kw = dict(add_generation_prompt=gen, date=True)
            text = ours.apply_chat_template(messages, tokenize=False, **kw)
            assert text == theirs.apply_chat_template(messages, tokenize=False, **kw)
            assert ours.apply_chat_template(messages, **kw) == _ids(theirs.apply_chat_template(messages, tokenize=True, **kw))
    too_long = [{"role": "user", "content": "x"}] * 9
    with pytest.raises(Exception, match="too long: 9"):
        theirs.apply_chat_template(too_long, tokenize=False)
    with pytest.raises(ValueError, match="rejected these messages: too long: 9"):
        ours.apply_chat_template(too_long)


def test_generation_config_eos_list_and_dict_names(tmp_path):
    ours, theirs = _both(_byte_level_folder(tmp_path / "llama3", "llama3"))
    gen = json.loads((tmp_path / "llama3" / "generation_config.json").read_text())["eos_token_id"]
    assert ours.stop_ids == list(dict.fromkeys([theirs.eos_token_id, *gen]))


# -- special-token resolution ------------------------------------------------------------------------------
def test_gpt2_hub_folder_without_token_names(tmp_path):
    """openai-community/gpt2 ships tokenizer_config.json = {"model_max_length": 1024} and config.json
    model_type gpt2: transformers picks GPT2Tokenizer, whose defaults make <|endoftext|> BOS, EOS and
    UNK. lmstack finds no EOS, so generation would have no stop id and templates no eos_token."""
    tok = _byte_level(None, ["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    folder = _write(tmp_path / "gpt2", tok, {"model_max_length": 1024}, added_tokens_decoder=False)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 400, "n_embd": 32,
                                                    "n_layer": 1, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0}))
    ours, theirs = _both(folder)
    assert type(theirs).__name__ == "GPT2Tokenizer"
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (0, 0)
    assert ours.stop_ids == [0]
    assert ours.special_tokens == theirs.special_tokens_map


def test_named_tokens_missing_from_vocab_are_added(tmp_path):
    """tokenizer_config.json names a pad token and lists an extra special token that tokenizer.json
    does not have: transformers adds both (ids len(vocab), len(vocab)+1) and reads them in text."""
    tok = _byte_level(LLAMA3_RE, ["<|endoftext|>", "<|im_end|>"])
    folder = _write(tmp_path / "tok", tok, {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
        "additional_special_tokens": ["<|tool|>"]})
    ours, theirs = _both(folder)
    assert theirs.pad_token_id == 400 and theirs.convert_tokens_to_ids("<|tool|>") == 401
    assert ours.pad_id == theirs.pad_token_id
    assert ours.vocab_size == len(theirs)
    _assert_encodes_like(ours, theirs, ["a <|pad|> b", "x<|tool|>y"])
    assert ours.special_tokens == theirs.special_tokens_map


def test_eos_added_as_plain_token_is_special_for_decode(tmp_path):
    """EOS named in tokenizer_config.json but added to tokenizer.json as a non-special token:
    transformers marks it special, so skip_special_tokens drops it (and the CLI's decode should)."""
    tok = _byte_level(LLAMA3_RE, [])
    tok.add_tokens([AddedToken("<|endoftext|>", special=False, normalized=False)])
    folder = _write(tmp_path / "tok", tok, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    ours, theirs = _both(folder)
    ids = theirs("Hello world<|endoftext|>").input_ids
    assert ours.encode("Hello world<|endoftext|>", parse_special=True) == ids
    assert theirs.decode(ids, skip_special_tokens=True) == "Hello world"
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_config_added_tokens_decoder_flags_override_tokenizer_json(tmp_path):
    """tokenizer_config.json's added_tokens_decoder marks <x> special with lstrip/rstrip where
    tokenizer.json has a plain token: transformers re-adds it with the config's flags."""
    tok = _byte_level(LLAMA3_RE, ["<|endoftext|>"])
    tok.add_tokens([AddedToken("<x>", special=False, normalized=False)])
    decoder = _added_tokens_decoder(tok)
    decoder[str(tok.token_to_id("<x>"))].update(special=True, lstrip=True, rstrip=True)
    folder = _write(tmp_path / "tok", tok, {"tokenizer_class": "PreTrainedTokenizerFast",
                                            "eos_token": "<|endoftext|>", "added_tokens_decoder": decoder},
                    added_tokens_decoder=False)
    ours, theirs = _both(folder)
    text = "a <x> b"
    assert ours.encode(text, add_special_tokens=True, parse_special=True) == theirs(text).input_ids
    assert ours.decode(theirs(text).input_ids) == theirs.decode(theirs(text).input_ids, skip_special_tokens=True)


def test_special_tokens_map_wins_in_pre_434_folders(tmp_path):
    """A folder written before transformers 4.34 (no added_tokens_decoder): transformers 5 reads
    special_tokens_map.json over tokenizer_config.json's names."""
    tok = _byte_level(LLAMA3_RE, ["<|endoftext|>", "<|im_end|>", "<pad>"])
    folder = _write(tmp_path / "tok", tok, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"},
                    added_tokens_decoder=False, special_map={"eos_token": "<|im_end|>", "pad_token": "<pad>"})
    ours, theirs = _both(folder)
    assert (ours.eos_id, ours.pad_id) == (theirs.eos_token_id, theirs.pad_token_id) == (1, 2)


def test_missing_bos_and_pad(tmp_path):
    """Qwen2-style: bos_token null, no pad: both None, and a template's bos_token renders as ''."""
    tok = _byte_level(QWEN_RE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], nfc=True)
    folder = _write(tmp_path / "tok", tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                                            "eos_token": {"__type": "AddedToken", **_token("<|im_end|>")},
                                            "pad_token": None, "chat_template": CHATML})
    ours, theirs = _both(folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.bos_id is None and ours.pad_id is None and ours.eos_id == 2
    messages = CHATS[0]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="no BOS token"):
        ours.encode("x", add_bos=True)


# -- the CLI ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mistral-v0.1", "llama2"])
def test_cli_generate_hf_matches_hf_greedy(tmp_path, capsys, kind):
    """`lmstack generate --hf DIR --prompt P --temperature 0` on a SentencePiece Llama folder prints
    transformers' decode of HF greedy generate on the chat-templated prompt."""
    from lmstack.cli import main

    folder = tmp_path / "model"
    if kind == "llama2":
        _llama2_folder(folder)  # Llama-2's tokenizer.json form, legacy=false
    else:
        _llama2_folder(folder, "first", False)  # Metaspace(first), consistent with the config
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(theirs), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)  # peaked next-token distributions: no near-ties in greedy decoding
    gen = (folder / "generation_config.json").read_text()
    hf.save_pretrained(folder)
    (folder / "generation_config.json").write_text(gen)  # the Hub's file
    prompt = "What is the weather in Paris?"
    ids = _ids(theirs.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True))
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, temperature=None, top_p=None)
    reply = theirs.decode(out[0, len(ids):], skip_special_tokens=True)
    argv = ["generate", "--hf", str(folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "10",
            "--device", "cpu"]
    assert main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == reply + "\n"
    assert main(argv) == 0
    assert capsys.readouterr().out == reply + "\n"


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_convert_keeps_how_transformers_reads_the_tokenizer(tmp_path, seed, family):
    """A folder whose tokenizer.json disagrees with its `legacy` flag: transformers rebuilds a
    LlamaTokenizer's pipeline for a llama model but reads a mistral model's file as it is. The
    lmstack folder `convert --from-hf` writes (its config.json has no HF model_type), and the HF
    folder `convert --to-hf` writes back, must encode as the original folder does in transformers."""
    from lmstack.cli import main

    src = _llama2_folder(tmp_path / "hf", "always", False)
    theirs = transformers.AutoTokenizer.from_pretrained(str(src))
    common = dict(vocab_size=len(theirs), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    hf_cfg = (transformers.MistralConfig(**common, sliding_window=16) if family == "mistral"
              else transformers.LlamaConfig(**common))
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(src)
    theirs = transformers.AutoTokenizer.from_pretrained(str(src))  # now beside a config.json with model_type
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    rng = random.Random(seed)
    texts = [" Hello", "<s> x", "a</s> b</s>c", *(_random_text(rng) for _ in range(20))]
    _assert_encodes_like(Tokenizer.from_file(tmp_path / "ours"), theirs, texts)
    _assert_encodes_like(Tokenizer.from_file(tmp_path / "back"), back, texts)
    for text in texts:
        assert back(text).input_ids == theirs(text).input_ids, repr(text)
