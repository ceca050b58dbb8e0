"""Adversarial review of instruction-tuning data against the references a user would otherwise use.

References: transformers' tokenizers (whole-text tokenization, `apply_chat_template`, and its
`return_assistant_tokens_mask` over `{% generation %}` blocks, computed from character offsets),
plain `json` for JSON Lines, and a Hugging Face model run on each example alone for packing.
Everything is built here (tiny BPEs, tokenizer folders, random-init models) from a fresh seed.
"""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import processors  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from lmstack.data.instruct import (IGNORE_INDEX, Example, InstructError, encode_example, encode_examples,  # noqa: E402
                                   encode_prompt, get_template, has_split, load_examples, load_split, parse_record,
                                   render_segments, split_file)
from lmstack.data.tokenizer import Tokenizer  # noqa: E402
from lmstack.train.finetune import InstructBatches  # noqa: E402

from ..hf_models import tiny_hf  # noqa: E402
from ..hf_tokenizers import LLAMA3_RE, byte_level_bpe  # noqa: E402
from ..interop.test_real_configs import CALL, FOLDERS  # noqa: E402

WORDS = ["Paris", "weather", "sunny", "the", "is", "It", "degrees", "naïve", "café", "東京", "What", "Hello",
         "there", "22", "today", "you", "are", "terse", "!", "?", ",", "ok"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "</s>", "[INST]", "[/INST]"]

# Templates whose `{% generation %}` blocks hold exactly what lmstack promises to train: everything
# the template writes for an assistant message after the generation prompt (its text and its
# end-of-turn text). transformers turns those blocks into `assistant_masks` by character offsets.
CHATML_GEN = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_GEN = (  # content trimmed, BOS written by the template
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL_GEN = (  # no generation prompt at all: the reply starts right after [/INST]
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{% generation %}{{ ' ' + m['content'] | trim + '</s>' }}{% endgeneration %}"
    "{% endif %}{% endfor %}")
GEN_TEMPLATES = {"chatml": CHATML_GEN, "llama3": LLAMA3_GEN, "mistral": MISTRAL_GEN}
# HuggingFaceH4/zephyr-7b-beta's template (also TinyLlama-Chat's), used with SentencePiece tokenizers
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def _ids(out):
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def _words(rng, lo=1, hi=6):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def backend():
    """Byte-level BPE with Llama 3's split regex (newline runs are one piece whatever follows)."""
    return byte_level_bpe([" ".join(WORDS) * 30, "system user assistant You are a helpful assistant.\n\n" * 30], 400,
                          SPECIALS, LLAMA3_RE)


@pytest.fixture(scope="module")
def gen_folders(backend, tmp_path_factory):
    out = {}
    for name, template in GEN_TEMPLATES.items():
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=HFTokenizer.from_str(backend.to_str()), eos_token="</s>" if name == "mistral" else
            {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[name], bos_token="<|begin_of_text|>",
            pad_token="<|endoftext|>")
        fast.chat_template = template
        path = tmp_path_factory.mktemp(name)
        fast.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def real_folders(tmp_path_factory):
    return {kind: make(tmp_path_factory.mktemp(kind.replace(".", "_")) / kind) for kind, make in FOLDERS.items()}


def _random_chat(rng, *, system: bool, turns: int, echo: bool = False, empty_last: bool = False):
    msgs = [{"role": "system", "content": _words(rng)}] if system else []
    for k in range(turns):
        user = _words(rng)
        reply = _words(rng)
        if echo and k == 0:
            user = f"{reply} {reply}"  # the reply's text also appears, twice, in the prompt before it
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if empty_last:
        msgs[-1]["content"] = ""
    return msgs


# ---- chat templates: ids, masks and prompts against transformers ---------------------------------------------
@pytest.mark.parametrize("name", list(GEN_TEMPLATES))
def test_chat_masks_equal_transformers_assistant_masks(gen_folders, name, seed):
    """Every assistant turn trained, nothing else: labels equal transformers' character-offset
    `assistant_masks` token by token, ids equal its tokenization of the whole conversation, and
    the evaluation prompt equals its generation prompt."""
    ours = Tokenizer.from_file(gen_folders[name])
    theirs = transformers.AutoTokenizer.from_pretrained(gen_folders[name])
    rng = random.Random(seed)
    cases = [dict(system=False, turns=1), dict(system=name != "mistral", turns=3), dict(system=False, turns=2, echo=True),
             dict(system=False, turns=2, empty_last=name != "mistral")]
    for kw in cases:
        msgs = _random_chat(rng, **kw)
        t = encode_example(parse_record({"messages": msgs}), ours)
        ref = theirs.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(t.ids) == list(ref["input_ids"]), (name, msgs)
        assert [int(label != IGNORE_INDEX) for label in t.labels] == list(ref["assistant_masks"]), (name, msgs)
        assert [label for label in t.labels if label != IGNORE_INDEX] == [
            i for i, m in zip(ref["input_ids"], ref["assistant_masks"]) if m]
        prompt = _ids(theirs.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True))
        assert encode_prompt(parse_record({"messages": msgs}), ours) == prompt


@pytest.mark.parametrize("kind", ["llama3.2", "qwen2.5"])
def test_real_templates_train_each_reply_by_character_span(real_folders, kind, seed):
    """Llama 3.2 / Qwen2.5 templates: the rendered text equals transformers', ids equal its ids,
    and the trained tokens cover exactly the characters each reply adds after its generation
    prompt (spans computed from transformers' renderings and its offset mapping)."""
    ours = Tokenizer.from_file(real_folders[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(real_folders[kind])
    rng = random.Random(seed)
    for kw in (dict(system=True, turns=2), dict(system=False, turns=3, echo=True), dict(system=False, turns=1,
                                                                                      empty_last=True)):
        msgs = _random_chat(rng, **kw)
        msgs[1]["content"] = "  " + msgs[1]["content"] + " \n"  # Llama trims it, Qwen keeps it
        text = theirs.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(theirs.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=False))
                spans.append((start, len(theirs.apply_chat_template(msgs[: i + 1], tokenize=False))))
        enc = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc["offset_mapping"]]
        t = encode_example(parse_record({"messages": msgs}), ours)
        assert ours.decode(t.ids, skip_special_tokens=False) == text
        assert list(t.ids) == list(enc["input_ids"])
        assert [int(label != IGNORE_INDEX) for label in t.labels] == mask


def test_tool_call_messages_render_as_in_transformers(real_folders):
    """Tool-use data (OpenAI/HF form: an assistant turn with `tool_calls`, then a `tool` turn):
    the trained reply must be the tool call the template writes, as transformers renders it."""
    ours = Tokenizer.from_file(real_folders["qwen2.5"])
    theirs = transformers.AutoTokenizer.from_pretrained(real_folders["qwen2.5"])
    msgs = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "22"}, {"role": "assistant", "content": "It is 22 degrees."}]
    t = encode_example(parse_record({"messages": msgs}), ours)
    assert ours.decode(t.ids, skip_special_tokens=False) == theirs.apply_chat_template(msgs, tokenize=False)


def test_chat_that_opens_with_the_assistant_is_a_clear_record_error(real_folders):
    """A conversation that starts with an assistant greeting cannot be cut for a template that
    needs a non-empty prefix; that must be the one-line InstructError naming the record, like
    every other bad record, not the chat renderer's 'messages must be a non-empty list'."""
    ours = Tokenizer.from_file(real_folders["qwen2.5"])
    msgs = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    ex = parse_record({"messages": msgs}, "chats.jsonl:7")
    with pytest.raises(InstructError, match="chats.jsonl:7"):
        encode_example(ex, ours)


# ---- SentencePiece (Metaspace) tokenizers: Mistral / Llama 2 / Zephyr --------------------------------------
def test_sentencepiece_chat_template_ids_equal_transformers(real_folders, tmp_path, seed):
    """Zephyr's template with a Mistral-style SentencePiece tokenizer: the training ids and the
    evaluation prompt must be transformers' tokenization of the rendered chat (what `lmstack
    generate --hf` and every HF trainer feed the model), without a '▁' added at each reply."""
    import shutil

    folder = tmp_path / "zephyr"
    shutil.copytree(real_folders["mistral-v0.3"], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": ZEPHYR}))
    ours, theirs = Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(folder)
    msgs = _random_chat(random.Random(seed), system=False, turns=2)
    t = encode_example(parse_record({"messages": msgs}), ours)
    assert list(t.ids) == _ids(theirs.apply_chat_template(msgs, tokenize=True))
    assert encode_prompt(parse_record({"messages": msgs}), ours) == ours.apply_chat_template(
        msgs[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("kind", ["trained", "llama3.2", "qwen2.5", "mistral-v0.3"])
def test_alpaca_ids_are_the_whole_text_tokenized(real_folders, backend, tmp_path, kind, seed):
    """An Alpaca record is the documented prompt followed by the output, then EOS: its ids equal
    the tokenizer's own encoding of that text (transformers' `tok(prompt + output)`, BOS as the
    tokenizer adds it) plus EOS, as Alpaca/TRL-style trainers build them; labels cover exactly
    the output and EOS. Outputs start with a letter, so no BPE merge crosses the boundary."""
    if kind == "trained":
        path = tmp_path / "trained"
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(backend.to_str()),
                                                    eos_token="</s>")
        fast.save_pretrained(path)
    else:
        path = real_folders[kind]
    ours, theirs = Tokenizer.from_file(path), transformers.AutoTokenizer.from_pretrained(path)
    rng = random.Random(seed)
    for with_input in (False, True):
        rec = {"instruction": _words(rng), "input": _words(rng) if with_input else "", "output": _words(rng)}
        ex = parse_record(rec)
        prompt = get_template("alpaca").render(rec["instruction"], rec["input"])
        t = encode_example(ex, ours)
        whole = theirs(prompt + rec["output"]).input_ids + [ours.eos_id]
        assert list(t.ids) == whole, kind
        n_prompt = len(theirs(prompt).input_ids)
        assert list(t.labels) == [IGNORE_INDEX] * n_prompt + whole[n_prompt:]
        assert encode_prompt(ex, ours) == theirs(prompt).input_ids


def test_builtin_chat_format_is_its_documented_text(real_folders, tmp_path, seed):
    """Without a chat template, a chat is '### User:\\n…\\n\\n### Assistant:\\n…' with EOS after
    each reply (lmstack's documented format): decoding the ids gives exactly that text, for a
    byte-level and for a SentencePiece tokenizer."""
    import shutil

    rng = random.Random(seed)
    msgs = _random_chat(rng, system=True, turns=2)
    for kind in ("qwen2.5", "mistral-v0.3"):
        folder = tmp_path / kind
        shutil.copytree(real_folders[kind], folder)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        tok = Tokenizer.from_file(folder)
        assert tok.chat_template is None
        eos = tok.id_to_token(tok.eos_id)
        parts = []
        for m in msgs:
            parts.append(f"### {m['role'].capitalize()}:\n{m['content']}")
            parts.append(eos + "\n\n" if m["role"] == "assistant" else "\n\n")
        text = "".join(parts).removesuffix("\n\n")
        t = encode_example(parse_record({"messages": msgs}), tok)
        decoded = tok.decode(t.ids, skip_special_tokens=False)
        bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None and t.ids[0] == tok.bos_id else ""
        assert decoded.removeprefix(bos).lstrip(" ") == text, kind  # SentencePiece decodes BOS as "<s> "


def test_alpaca_with_an_eos_adding_post_processor(backend, tmp_path, seed):
    """Tokenizers whose post-processor appends EOS (Llama-2 folders with add_eos_token=true baked
    into tokenizer.json, T5/BERT-style '$A </s>'): the prompt must not get an EOS before the
    response; transformers' `tok(prompt + output)` ends with the one EOS."""
    hf = HFTokenizer.from_str(backend.to_str())
    bos, eos = "<|begin_of_text|>", "</s>"
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
                                                      special_tokens=[(bos, hf.token_to_id(bos)), (eos, hf.token_to_id(eos))])
    path = tmp_path / "eos"
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, eos_token=eos).save_pretrained(path)
    ours, theirs = Tokenizer.from_file(path), transformers.AutoTokenizer.from_pretrained(path)
    rng = random.Random(seed)
    rec = {"instruction": _words(rng), "output": _words(rng)}
    prompt = get_template("alpaca").render(rec["instruction"])
    t = encode_example(parse_record(rec), ours)
    assert list(t.ids) == theirs(prompt + rec["output"]).input_ids
    assert t.ids.count(ours.eos_id) == 1


# ---- files -------------------------------------------------------------------------------------------------
def test_jsonl_with_unicode_line_separators_in_strings(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 unescaped inside strings (json.dumps(...,
    ensure_ascii=False) writes them raw); JSON Lines separates records by '\\n' only. Such a file
    must load record for record, with the right line numbers."""
    recs = [{"instruction": "a\u2028b", "output": "c\x85d"}, {"instruction": "x", "input": "p\u2029q", "output": "y"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok\u2028"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    ref = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert ref == recs
    got = load_examples(path)
    assert [(e.instruction, e.input, e.output) for e in got[:2]] == [("a\u2028b", "", "c\x85d"), ("x", "p\u2029q", "y")]
    assert got[2].answer == "ok\u2028" and got[2].source == f"{path}:3"


def test_file_variants(tmp_path):
    """JSON vs JSONL, CRLF and blank lines, extra keys, null input: same examples; malformed files
    (BOM, trailing comma, JSONL named .json, wrong types) are one-line InstructErrors."""
    recs = [{"instruction": "Who?", "input": "ctx é", "output": "東京", "extra": [1, 2], "kind": "k"},
            {"instruction": "Say", "input": None, "output": "hi"}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_bytes(b"\r\n".join(json.dumps(r).encode() for r in recs[:1]) + b"\r\n\r\n  \n"
                                       + json.dumps(recs[1]).encode())
    a, b = load_examples(tmp_path / "a.json"), load_examples(tmp_path / "a.jsonl")
    assert [(e.instruction, e.input, e.output, e.kind) for e in a] == [(e.instruction, e.input, e.output, e.kind)
                                                                     for e in b]
    assert a[0] == Example("Who?", "ctx é", "東京", kind="k", source=f"{tmp_path / 'a.json'}: record 0")
    assert b[1].source == f"{tmp_path / 'a.jsonl'}:4"
    bad = {"bom.jsonl": b"\xef\xbb\xbf" + json.dumps(recs[1]).encode(), "comma.json": b'[{"instruction": "a", "output": "b"},]',
           "lines.json": b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n',
           "num.jsonl": b'{"instruction": "a", "output": 3}\n', "noout.jsonl": b'{"instruction": "a", "response": "b"}\n',
           "latin1.jsonl": '{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1")}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InstructError) as e:
            load_examples(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_splits_and_eval_split_lookup(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    (task / "train.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (task / "test.json").write_text(json.dumps([{"instruction": "c", "output": "d"}]))
    assert load_split(task, "test")[0].output == "d" and has_split(task, "test") and not has_split(task, "valid")
    single = task / "train.jsonl"
    assert split_file(single, "test") == single and not has_split(single, "test")  # a file: train only, no eval
    with pytest.raises(InstructError, match="has no 'valid' split"):
        load_split(task, "valid")


# ---- truncation and packing --------------------------------------------------------------------------------
def test_truncation_keeps_the_head_of_multi_turn_chats(real_folders, seed):
    ours = Tokenizer.from_file(real_folders["qwen2.5"])
    rng = random.Random(seed)
    exs = [parse_record({"messages": _random_chat(rng, system=False, turns=rng.randint(1, 3))}) for _ in range(6)]
    full = [encode_example(e, ours) for e in exs]
    seq_len = rng.randint(min(len(t.ids) for t in full), max(len(t.ids) for t in full))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = encode_examples(exs, ours, seq_len)
    kept = [t for t in full if any(label != IGNORE_INDEX for label in t.labels[1: seq_len + 1])]
    assert [(o.ids, o.labels) for o in out] == [(t.ids[: seq_len + 1], t.labels[: seq_len + 1]) for t in kept]


def test_packed_batches_match_each_example_alone_in_transformers(backend, seed):
    """The finetune data path (InstructBatches, packing): every example's logits inside a packed
    row equal a transformers Llama's logits on that example alone (1e-4), and its targets are its
    own labels shifted by one."""
    tok = Tokenizer(HFTokenizer.from_str(backend.to_str()), eos="</s>", pad="<|endoftext|>", bos=None)
    rng = random.Random(seed)
    exs = [Example(instruction=_words(rng, 1, 10), input=_words(rng, 0, 6), output=_words(rng, 1, 5)) for _ in range(9)]
    items = encode_examples(exs, tok, 48, "plain")
    hf, ours = tiny_hf("llama", vocab=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=2, ffn=64, max_len=128,
                       seed=seed % 1000)
    lengths = [t.n_inputs for t in items]
    seq_len = max(lengths) + min(lengths) + rng.randint(0, 10)  # some row holds two examples or more
    batches = InstructBatches(items, batch_size=2, seq_len=seq_len, pad_id=tok.pad_id, packing=True, seed=seed)
    seen = 0
    for k in range(len(batches)):
        x, y, seqs, _ = batches.get(k)
        rows = [batches.rows[r] for r in batches._epoch_order(0)[k * 2: k * 2 + 2]]
        with torch.no_grad():
            logits = ours(x, seqs=seqs)
            for r, row in enumerate(rows):
                pos = 0
                for j in row:
                    t, n = items[j], items[j].n_inputs
                    alone = hf(torch.tensor([t.ids[:-1]])).logits[0]
                    torch.testing.assert_close(logits[r, pos: pos + n], alone, rtol=0, atol=1e-4)
                    assert y[r, pos: pos + n].tolist() == list(t.labels[1:])
                    pos += n
                    seen += 1
                assert (y[r, pos:] == IGNORE_INDEX).all()
    assert seen == len(items) and any(len(r) > 1 for r in batches.rows)


def test_render_segments_alpaca_documented_text():
    """The documented Alpaca template, with and without input; braces in fields stay literal."""
    tok = Tokenizer.train(["a b c"] * 5, 300)
    ex = parse_record({"instruction": "Fill {input} and {0}", "input": "x {instruction} }{", "output": "y"})
    prompt = ("Below is a task together with some context. Write the reply that completes the task.\n\n"
              "### Task:\nFill {input} and {0}\n\n### Context:\nx {instruction} }{\n\n### Reply:\n")
    assert render_segments(ex, tok) == [(prompt, False), ("y", True), (tok.eos_id, True)]

