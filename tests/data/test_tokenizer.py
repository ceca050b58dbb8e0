"""Byte-level BPE tokenizer: exact round trip, special tokens only by id, byte counts, files."""

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer

from ..hf_models import hf_is_5

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 20,
          "To be, or not to be, that is the question:\n" * 20,
          "naïve café — 東京 😀 <|eos|> tab\tnewline\n" * 10]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=320)


def test_train_layout(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.id_to_token(i) for i in range(3)] == [BOS, EOS, PAD]
    assert 259 < tok.vocab_size <= 320
    assert tok.token_to_id(EOS) == 1


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip(tok, s):
    assert tok.decode(tok.encode(s)) == s


pieces = st.one_of(st.text(max_size=8), st.sampled_from([BOS, EOS, PAD, "<|", "|>", " ", "\n"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(pieces, max_size=12).map("".join))
def test_special_strings_stay_text(tok, s):
    ids = tok.encode(s, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids[1:-1])
    assert tok.decode(ids) == s
    assert tok.decode(ids, skip_special_tokens=False) == BOS + s + EOS


def test_batch_and_tensor(tok):
    texts = ["hello  world", "", "<|pad|>x", "日本語\n\n"]
    batch = tok.encode_batch(texts, add_eos=True)
    assert batch == [tok.encode(t, add_eos=True) for t in texts]
    assert [tok.decode(torch.tensor(ids)) for ids in batch] == texts


def test_token_bytes(tok):
    nbytes = tok.token_bytes()
    assert nbytes.shape == (tok.vocab_size,) and nbytes.dtype.name == "int32"
    assert list(nbytes[:3]) == [0, 0, 0]
    rng = random.Random(0)
    alphabet = "abc xyz\n.é東😀<|>"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert int(nbytes[ids].sum()) == len(text.encode())


def test_save_load(tok, tmp_path):
    text = "To be, or not to be: <|eos|> 😀"
    path = tok.save(tmp_path)  # a directory
    assert path == tmp_path / "tokenizer.json"
    assert not [p for p in tmp_path.iterdir() if p.name != "tokenizer.json"]  # no temp left
    for src in (tmp_path, path):
        loaded = Tokenizer.from_file(src)
        assert loaded.encode(text) == tok.encode(text)
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    assert tok.save(tmp_path / "other.json") == tmp_path / "other.json"


def test_config_names_special_tokens(tok, tmp_path):
    tok.save(tmp_path)
    cfg = {"bos_token": {"content": EOS, "lstrip": False}, "eos_token": PAD, "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, None)


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="tokenizer file not found: .*nope"):
        Tokenizer.from_file(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not read tokenizer"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(CORPUS, vocab_size=100)
    no_bos = Tokenizer(tok.hf, bos=None)
    with pytest.raises(ValueError, match="no BOS token"):
        no_bos.encode("x", add_bos=True)


@pytest.mark.parametrize("modern", [False, True])
def test_special_tokens_map_fallback(tok, tmp_path, modern):
    """As transformers 5 reads them: in a folder written before transformers 4.34 (no
    added_tokens_decoder) special_tokens_map.json's names win over tokenizer_config.json's; a newer
    folder's tokenizer_config.json is the whole truth (an explicit null too), the map unread."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    config = {"bos_token": None, "eos_token": EOS, "pad_token": PAD}
    if modern:
        config["added_tokens_decoder"] = {str(i): {"content": t, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOS, "eos_token": {"content": PAD}, "unk_token": BOS}))
    loaded = Tokenizer.from_file(tmp_path)
    want = (None, 1, 2) if modern else (1, 2, 2)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == want
    if hf_is_5():  # transformers 4.x reads such folders otherwise
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
        assert want == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
        assert loaded.special_tokens == theirs.special_tokens_map


def test_generation_config_stop_ids(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1, 2]}))
    assert Tokenizer.from_file(tmp_path).stop_ids == [1, 2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_file(tmp_path).stop_ids == [1, 0]
    assert tok.stop_ids == [1]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id in .* must be an id or a list"):
        Tokenizer.from_file(tmp_path)


def test_add_special_tokens(tok, tmp_path):
    """Our trained tokenizer has no post-processor: add_special_tokens adds nothing, unless the
    HF add_bos_token/add_eos_token flags ask (they build one)."""
    text = "to be <|eos|>"
    assert tok.encode(text, add_special_tokens=True) == tok.encode(text)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": True}))
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.encode(text, add_special_tokens=True) == tok.encode(text, add_bos=True,
                                                                      add_eos=True)
    assert loaded.encode_batch([text], add_special_tokens=True) == [
        loaded.encode(text, add_special_tokens=True)]
    assert loaded.encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="not both"):
        loaded.encode_batch([text], add_eos=True, add_special_tokens=True)


def test_parse_special(tok):
    text = "a<|eos|>b"
    assert tok.encode(text, parse_special=True) == [*tok.encode("a"), 1, *tok.encode("b")]
    assert 1 not in tok.encode(text)  # the default, even after a parsing encode
    assert tok.encode_batch([text], parse_special=True) == [tok.encode(text, parse_special=True)]


def test_file_padding_and_truncation_off(tok, tmp_path):
    """A tokenizer.json that saved padding/truncation still encodes every text whole."""
    spec = json.loads(tok.hf.to_str())
    spec["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 2, "pad_type_id": 0, "pad_token": PAD}
    spec["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst",
                          "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    text = "the quick brown fox"
    assert Tokenizer.from_file(tmp_path).encode(text) == tok.encode(text)


def test_chat_template_save_load(tok, tmp_path):
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    chat = Tokenizer(tok.hf, chat_template=template)
    chat.save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == template
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.chat_template == template
    messages = [{"role": "user", "content": "hi <|eos|>"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == "<|bos|>hi <|eos|><|eos|>"
    # the template's tokens, and (as in transformers) specials spelled in content, become tokens
    assert loaded.apply_chat_template(messages) == [0, *tok.encode("hi "), 1, 1]
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ValueError, match="chat_template in .* must be a string"):
        Tokenizer.from_file(tmp_path)
