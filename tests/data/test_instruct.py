"""Instruction data: Alpaca/chat parsing and its errors, response-only labels at exact positions,
chat templates, truncation, and packed batches that give each example exactly its unpacked loss."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.data.instruct import (IGNORE_INDEX, Example, InstructError, encode_example, encode_examples,
                                   encode_prompt, first_fit, load_examples, load_split, pack_batch, pad_batch,
                                   parse_record, render_segments, split_file)
from lmstack.data.tokenizer import Tokenizer

WORDS = ["thou", "art", "the", "king", "of", "my", "heart", "and", "Who", "speaks", "Answer", "HAM", "OPH", "###"]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + "\n" for _ in range(300)]
    return Tokenizer.train(texts, 300)


# ---- parsing --------------------------------------------------------------------------------
def test_load_alpaca_jsonl_json_and_chat(tmp_path):
    recs = [{"instruction": "Who speaks?", "input": "thou art", "output": "HAM", "kind": "speaker"},
            {"instruction": "Say hi", "output": "hi", "input": None},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(recs))
    for name in ("a.jsonl", "a.json"):
        a, b, c = load_examples(tmp_path / name)
        assert (a.instruction, a.input, a.output, a.kind, a.answer) == ("Who speaks?", "thou art", "HAM", "speaker",
                                                                          "HAM")
        assert (b.input, b.kind) == ("", None)
        assert c.messages[-1] == {"role": "assistant", "content": "hello"} and c.answer == "hello"
    assert load_examples(tmp_path / "a.jsonl")[1].source == f"{tmp_path / 'a.jsonl'}:2"


@pytest.mark.parametrize("record, message", [
    ({"instruction": "x"}, "missing field 'output'"),
    ({"output": "x"}, "missing field 'instruction'"),
    ({"instruction": "x", "output": 3}, "field 'output' must be a string"),
    ({"instruction": "x", "output": ""}, "field 'output' is empty"),
    ([1, 2], "expected a JSON object, got list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"content": "hi"}]}, "message 0 is missing field 'role'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "the last message must be the assistant's reply"),
])
def test_record_errors_name_file_line_and_field(tmp_path, record, message):
    good = {"instruction": "a", "output": "b"}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, record)) + "\n")
    with pytest.raises(InstructError) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value) and "\n" not in str(e.value)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(InstructError, match=f"record 1: .*{message[:12]}"):
        load_examples(path)


def test_file_errors(tmp_path):
    with pytest.raises(InstructError, match="instruction data not found"):
        load_examples(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(InstructError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(tmp_path / "bad.jsonl")
    (tmp_path / "obj.json").write_text('{"instruction": "a"}')
    with pytest.raises(InstructError, match="expected a JSON list of records"):
        load_examples(tmp_path / "obj.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InstructError, match="holds no records"):
        load_examples(tmp_path / "empty.jsonl")


def test_split_files(tmp_path, monkeypatch):
    task = tmp_path / "home" / "data" / "t"
    task.mkdir(parents=True)
    (task / "train.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    monkeypatch.setenv("LMSTACK_HOME", str(tmp_path / "home"))
    assert split_file("t", "train") == split_file(task, "train") == task / "train.jsonl"
    assert split_file(task / "train.jsonl", "test") == task / "train.jsonl"  # a file is every split
    assert load_split("t", "train")[0].output == "b"
    with pytest.raises(InstructError, match="has no 'test' split"):
        split_file(task, "test")
    with pytest.raises(InstructError, match="lmstack prepare shakespeare-tasks"):
        split_file("nope", "train")


# ---- labels -----------------------------------------------------------------------------------
def test_alpaca_labels_are_the_response_and_eos_exactly(tok):
    ex = parse_record({"instruction": "Who speaks?", "input": "thou art the king", "output": "HAM"})
    prompt = ("Below is a task together with some context. Write the reply that completes the task.\n\n"
              "### Task:\nWho speaks?\n\n### Context:\nthou art the king\n\n### Reply:\n")
    assert render_segments(ex, tok) == [(prompt, False), ("HAM", True), (tok.eos_id, True)]
    p, r = tok.encode(prompt), tok.encode("HAM")
    t = encode_example(ex, tok)
    assert list(t.ids) == p + r + [tok.eos_id]
    assert list(t.labels) == [IGNORE_INDEX] * len(p) + r + [tok.eos_id]
    assert encode_prompt(ex, tok) == p
    x, y = pad_batch([t], tok.pad_id)
    assert x[0].tolist() == list(t.ids[:-1])
    # target t is the token after input t: the first trained target sits under the prompt's last token
    first = len(p) - 1
    assert (y[0, :first] == IGNORE_INDEX).all() and y[0, first:].tolist() == r + [tok.eos_id]
    plain = parse_record({"instruction": "Who speaks?", "output": "HAM"})
    assert render_segments(plain, tok, "plain")[0] == ("Who speaks?\n\nAnswer: ", False)


def test_chat_without_template_trains_every_reply(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "thou art"},
            {"role": "assistant", "content": "the king"}, {"role": "user", "content": "my heart"},
            {"role": "assistant", "content": "OPH"}]
    ex = parse_record({"messages": msgs})
    t = encode_example(ex, tok)
    trained = [i for i, label in zip(t.ids, t.labels) if label != IGNORE_INDEX]
    assert trained == tok.encode("the king") + [tok.eos_id] + tok.encode("OPH") + [tok.eos_id]
    prompt = encode_prompt(ex, tok)
    assert list(t.ids[: len(prompt)]) == prompt and list(t.ids[len(prompt):]) == tok.encode("OPH") + [tok.eos_id]
    assert tok.decode(prompt).endswith("### User:\nmy heart\n\n### Assistant:\n")


def test_chat_template_segments(tok):
    templated = Tokenizer(tok.hf, chat_template=(
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' }}\n"
        "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"))
    ex = parse_record({"messages": [{"role": "user", "content": "thou art"},
                                    {"role": "assistant", "content": "HAM"}]})
    t = encode_example(ex, templated)
    assert templated.decode(t.ids, skip_special_tokens=False) == "<user> thou art\n<assistant> HAM<|eos|>\n"
    trained = [i for i, label in zip(t.ids, t.labels) if label != IGNORE_INDEX]
    assert trained == templated.encode("HAM<|eos|>\n", parse_special=True)  # the EOS is a token, not text
    assert tok.eos_id in trained
    assert templated.decode(encode_prompt(ex, templated)) == "<user> thou art\n<assistant> "
    # a template whose conversation prefix is not a prefix of the whole cannot be cut
    bad = Tokenizer(tok.hf, chat_template="{{ messages | length }}{% if add_generation_prompt %}!{% endif %}")
    with pytest.raises(InstructError, match="not render the conversation so far as a prefix"):
        encode_example(ex, bad)


def test_truncation_warns_and_drops_examples_without_response(tok):
    long_input = " ".join(["thou art the king"] * 20)
    exs = [parse_record({"instruction": "Who?", "output": "HAM"}),
           parse_record({"instruction": "Who?", "input": "thou", "output": " ".join(["the king"] * 20)}),
           parse_record({"instruction": "Who?", "input": long_input, "output": "HAM"})]
    lens = [len(encode_example(e, tok, "plain").ids) for e in exs]
    seq_len = lens[0] + 4
    assert lens[1] > seq_len + 1 and lens[2] > seq_len + 1
    with pytest.warns(UserWarning, match=r"2 of 3 examples were longer .* \(1 dropped"):
        out = encode_examples(exs, tok, seq_len, "plain")
    assert [len(t.ids) for t in out] == [lens[0], seq_len + 1]
    assert out[1].labels[-1] != IGNORE_INDEX  # the cut keeps the first part of the response
    with pytest.raises(InstructError, match="no example fits"), pytest.warns(UserWarning, match="1 dropped"):
        encode_examples(exs[2:], tok, seq_len, "plain")


# ---- packing ----------------------------------------------------------------------------------
def test_first_fit():
    assert first_fit([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    with pytest.raises(ValueError, match="more than a row"):
        first_fit([9], 8)


def test_pack_batch_layout(tok):
    a = encode_example(parse_record({"instruction": "Who?", "output": "HAM"}), tok, "plain")
    b = encode_example(parse_record({"instruction": "thou art the king", "output": "OPH"}), tok, "plain")
    T = a.n_inputs + b.n_inputs + 3
    x, y, seqs = pack_batch([[a, b], [b]], T, tok.pad_id)
    na, nb = a.n_inputs, b.n_inputs
    assert x[0].tolist() == [*a.ids[:-1], *b.ids[:-1], tok.pad_id, tok.pad_id, tok.pad_id]
    assert y[0].tolist() == [*a.labels[1:], *b.labels[1:], IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert seqs.positions[0].tolist() == [*range(na), *range(nb), 0, 1, 2]
    assert seqs.doc_ids[0].tolist() == [0] * na + [1] * nb + [2] * 3
    assert seqs.positions[1].tolist() == [*range(nb), *range(T - nb)]
    with pytest.raises(ValueError, match="more than seq_len"):
        pack_batch([[a, b]], na + nb - 1, tok.pad_id)


def test_packed_loss_equals_unpacked_loss_per_example(tok, seed):
    """Document masks + restarted positions: each packed example's summed loss is its loss alone."""
    rng = random.Random(seed)
    exs = [Example(instruction=" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))),
                   input=" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8))),
                   output=" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))) for _ in range(12)]
    items = encode_examples(exs, tok, 64, "plain")
    cfg = lmstack.ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                              max_seq_len=128)
    model = lmstack.Transformer(cfg).eval()
    rows = first_fit([t.n_inputs for t in items], 96)
    assert any(len(r) > 2 for r in rows)  # several examples really share rows
    x, y, seqs = pack_batch([[items[i] for i in r] for r in rows], 96, tok.pad_id)
    with torch.no_grad():
        nll = F.cross_entropy(model(x, seqs=seqs).flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        for r, row in enumerate(rows):
            pos = 0
            for i in row:
                n = items[i].n_inputs
                xi, yi = pad_batch([items[i]], tok.pad_id)
                alone = F.cross_entropy(model(xi)[0], yi[0], reduction="sum")
                packed = nll[r, pos : pos + n].sum()
                torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
                pos += n
        # and without the document mask the packed loss differs (examples would see each other)
        leaky = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    assert not torch.allclose(leaky, nll, atol=1e-3)
