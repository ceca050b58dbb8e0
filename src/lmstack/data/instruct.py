"""Instruction-tuning data (Alpaca, Taori et al. 2023; chat messages): records -> token ids with
the loss on the response only -> padded or packed batches.

A record is either Alpaca-style (``instruction``, optional ``input``, ``output``) or a chat
(``{"messages": [{"role", "content"}, ...]}`` ending with the assistant's reply). It is rendered
as a list of text segments, each marked trained or not: the prompt (template text, instruction,
context, user turns) is not, the response and the EOS after it are. Segments are tokenized one by
one and concatenated, so the prompt ids used at evaluation are exactly the prefix seen in
training. ``labels`` mark untrained positions with -100 (``IGNORE_INDEX``); a row's targets are
``labels[1:]`` under inputs ``ids[:-1]``.

Packing puts several examples in one row of ``seq_len`` tokens (first fit) and describes them with
``lmstack.kernels.Seqs``: attention stays inside each example and RoPE positions restart, so every
example's loss equals its loss alone in a padded batch. Example: two examples of 4 and 3 tokens
(p = prompt, r = response, E = EOS) in a row of 8 inputs::

    ids        p0 p1 r0 E  | q0 s0 E          (one example's inputs are its ids[:-1])
    inputs     p0 p1 r0    q0 s0    <pad> <pad> <pad>
    targets    -  r0 E     s0 E     -     -     -        (- = IGNORE_INDEX)
    doc_ids    0  0  0     1  1     2     2     2
    positions  0  1  2     0  1     0     1     2
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..kernels import Seqs
from .tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label that carries no loss (torch's cross_entropy default)


class InstructError(ValueError):
    """A one-line, user-facing problem with an instruction-data file or record."""


# ---- records ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One instruction record: Alpaca fields, or ``messages`` for a chat (then the Alpaca fields
    are unused). ``kind`` names the question type for per-kind accuracy; ``source`` is
    ``file:line`` for messages."""

    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: tuple[dict[str, Any], ...] | None = None
    kind: str | None = None
    source: str = ""
    tools: tuple[dict[str, Any], ...] | None = None  # a chat's tool schemas, for its chat template

    @property
    def answer(self) -> str:
        """The reference response: ``output``, or the last (assistant) message of a chat."""
        return (self.messages[-1].get("content") or "") if self.messages is not None else self.output


def load_examples(path: str | Path) -> list[Example]:
    """Read a ``.jsonl`` file (one record per line) or a ``.json`` file (a list of records).
    Errors name the file, the line (JSONL) or record index (JSON) and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InstructError(f"instruction data not found: {path}; pass a .json or .jsonl file or a task directory")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InstructError(f"{path} is not UTF-8 (bad byte at offset {e.start})") from None
    items: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InstructError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a .json file must hold a "
                                f"list of records (use .jsonl for one record per line)") from None
        if not isinstance(data, list):
            raise InstructError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        items = [(f"{path}: record {i}", rec) for i, rec in enumerate(data)]
    else:
        for n, line in enumerate(text.split("\n"), 1):  # JSON Lines: "\n" only (strings may hold U+2028)
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InstructError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON record") from None
    if not items:
        raise InstructError(f"{path} holds no records")
    return [parse_record(rec, where) for where, rec in items]


def parse_record(rec: Any, where: str = "record") -> Example:
    """A dict in Alpaca or chat format -> ``Example``; ``where`` prefixes error messages."""
    if not isinstance(rec, dict):
        raise InstructError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    kind = rec.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise InstructError(f"{where}: 'kind' must be a string")
    if "messages" in rec:
        tools = rec.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise InstructError(f"{where}: 'tools' must be a list of JSON-schema objects")
        return Example(messages=_parse_messages(rec["messages"], where), kind=kind, source=where,
                       tools=None if tools is None else tuple(tools))
    for key in ("instruction", "output"):
        if key not in rec:
            raise InstructError(f"{where}: missing field {key!r} (Alpaca records need 'instruction' and 'output', "
                                f"'input' optional; chat records need 'messages')")
    inp = rec.get("input") or ""
    for key, value in (("instruction", rec["instruction"]), ("output", rec["output"]), ("input", inp)):
        if not isinstance(value, str):
            raise InstructError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not rec["output"]:
        raise InstructError(f"{where}: field 'output' is empty; there is nothing to learn")
    return Example(instruction=rec["instruction"], input=inp, output=rec["output"], kind=kind, source=where)


def _parse_messages(messages: Any, where: str) -> tuple[dict[str, Any], ...]:
    """The messages, whole (``tool_calls`` and other keys a chat template reads are kept); each
    needs a string role and string content (content may be missing or null beside tool_calls)."""
    if not isinstance(messages, list) or not messages:
        raise InstructError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InstructError(f"{where}: message {i} must be an object with 'role' and 'content'")
        m = dict(m)
        calls = bool(m.get("tool_calls"))
        if calls:
            m.setdefault("content", None)
        for key in ("role", "content"):
            if key not in m:
                raise InstructError(f"{where}: message {i} is missing field {key!r}")
            if not isinstance(m[key], str) and not (key == "content" and calls and m[key] is None):
                raise InstructError(f"{where}: message {i} field {key!r} must be a string")
        out.append(m)
    if out[-1]["role"] != "assistant":
        raise InstructError(f"{where}: the last message must be the assistant's reply (role 'assistant'), "
                            f"got role {out[-1]['role']!r}")
    return tuple(out)


# ---- rendering ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplate:
    """Prompt text around an Alpaca record; ``{instruction}`` and ``{input}`` are filled in and the
    response follows the prompt directly."""

    with_input: str
    without_input: str

    def render(self, instruction: str, input: str = "") -> str:
        template = self.with_input if input else self.without_input
        return template.format(instruction=instruction, input=input)


TEMPLATES = {
    # Alpaca-style: a one-line preamble, then headed sections (our own wording).
    "alpaca": PromptTemplate(
        with_input="Below is a task together with some context. Write the reply that completes the task.\n\n"
                   "### Task:\n{instruction}\n\n### Context:\n{input}\n\n### Reply:\n",
        without_input="Below is a task. Write the reply that completes the task.\n\n"
                      "### Task:\n{instruction}\n\n### Reply:\n",
    ),
    # The shortest prompt that still separates the parts: fewer tokens for tiny context windows.
    "plain": PromptTemplate(
        with_input="{instruction}\n\n{input}\n\nAnswer: ",
        without_input="{instruction}\n\nAnswer: ",
    ),
}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise InstructError(f"unknown prompt template {name!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# A segment is (text, trained) or (token id, trained) for tokens that are never spelled as text.
Segment = tuple[str | int, bool]


def render_segments(ex: Example, tok: Tokenizer, template: str = "alpaca") -> list[Segment]:
    """The example as segments; the last trained segments are the reply that evaluation generates.

    Alpaca: [prompt, response, EOS]. Chat with the tokenizer's Jinja template: prompts and replies
    cut where the template puts them (it must render each conversation prefix as a prefix of the
    whole); the template's own end-of-turn text ends each reply. Chat without one: a built-in
    format, ``### User:`` / ``### Assistant:`` headers and EOS after each reply."""
    if ex.messages is None:
        return [(get_template(template).render(ex.instruction, ex.input), False), (ex.output, True),
                (_eos(tok), True)]
    if tok.chat_template is not None:
        return _template_segments(ex, tok)
    if ex.tools or any(set(m) - {"role", "content"} for m in ex.messages):
        raise InstructError(f"{ex.source or 'record'}: tools and tool calls need the tokenizer's chat template to "
                            f"be written out; this tokenizer has none")
    segs: list[Segment] = []
    for m in ex.messages:
        header = f"### {m['role'].capitalize()}:\n"
        if m["role"] == "assistant":
            segs += [(header, False), (m["content"], True), (_eos(tok), True), ("\n\n", False)]
        else:
            segs.append((header + m["content"] + "\n\n", False))
    while segs and not segs[-1][1]:  # nothing untrained after the final reply
        segs.pop()
    return segs


def _template_segments(ex: Example, tok: Tokenizer) -> list[Segment]:
    msgs = list(ex.messages)
    segs: list[Segment] = []
    done = ""  # text rendered so far
    tools = {} if ex.tools is None else {"tools": list(ex.tools)}
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise InstructError(f"{ex.source or 'record'}: the chat starts with an assistant message, which a chat "
                                f"template cannot cut out as a reply to nothing; start it with a user (or system) turn")
        prompt = tok.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=False, **tools)
        full = tok.apply_chat_template(msgs[: i + 1], tokenize=False, **tools)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise InstructError(f"{ex.source or 'record'}: the tokenizer's chat template does not render the "
                                f"conversation so far as a prefix of the longer one, so replies cannot be cut out "
                                f"for response-only loss; use a template without that behaviour")
        segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [s for s in segs if s[0] != ""]


def _eos(tok: Tokenizer) -> int:
    if tok.eos_id is None:
        raise InstructError("the tokenizer has no EOS token, which ends every response; use a tokenizer with one")
    return tok.eos_id


def _encode_segment(tok: Tokenizer, seg: str | int, first: bool, chat: bool) -> list[int]:
    """One segment's ids, as they come out of tokenizing the whole text: later segments get no
    word-start prefix of their own (SentencePiece's "▁"), and only the first gets what the
    tokenizer's post-processor puts before a text (BOS; an EOS it puts after one would end the prompt)."""
    if isinstance(seg, int):
        return [seg]
    if chat:  # a chat template spells its special tokens in the text
        return tok.encode(seg, parse_special=True, continuation=not first)
    return (tok.leading_special_ids if first else []) + tok.encode(seg, continuation=not first)


# ---- tokenization -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedExample:
    """``ids`` and same-length ``labels`` (the id where the position is trained, else
    ``IGNORE_INDEX``). Training uses inputs ``ids[:-1]`` and targets ``labels[1:]``."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    kind: str | None = None

    @property
    def n_inputs(self) -> int:
        return len(self.ids) - 1


def with_soft_ids(segs: list[Segment], soft_ids: Sequence[int]) -> list[Segment]:
    """``segs`` with the untrained ids ``soft_ids`` (a soft prompt's placeholders,
    ``lmstack.peft.soft_prompt_ids``) put before every reply, where the model reads them last."""
    out: list[Segment] = []
    for i, (seg, trained) in enumerate(segs):
        if trained and (i == 0 or not segs[i - 1][1]):
            out += [(t, False) for t in soft_ids]
        out.append((seg, trained))
    return out


def encode_example(ex: Example, tok: Tokenizer, template: str = "alpaca",
                   soft_ids: Sequence[int] = ()) -> TokenizedExample:
    """Token ids and response-only labels of one example (no truncation); ``soft_ids`` go before
    every reply (``with_soft_ids``)."""
    chat = ex.messages is not None and tok.chat_template is not None
    ids: list[int] = []
    labels: list[int] = []
    for i, (seg, trained) in enumerate(with_soft_ids(render_segments(ex, tok, template), soft_ids)):
        piece = _encode_segment(tok, seg, i == 0, chat)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return TokenizedExample(tuple(ids), tuple(labels), ex.kind)


def encode_prompt(ex: Example, tok: Tokenizer, template: str = "alpaca", soft_ids: Sequence[int] = ()) -> list[int]:
    """The ids a model continues to answer ``ex``: every segment before the final reply, tokenized
    exactly as in training (``soft_ids`` included, last)."""
    segs = with_soft_ids(render_segments(ex, tok, template), soft_ids)
    last = len(segs)
    while last > 0 and segs[last - 1][1]:
        last -= 1
    chat = ex.messages is not None and tok.chat_template is not None
    return [t for i, (seg, _) in enumerate(segs[:last]) for t in _encode_segment(tok, seg, i == 0, chat)]


def encode_examples(examples: Sequence[Example], tok: Tokenizer, seq_len: int,
                    template: str = "alpaca", soft_ids: Sequence[int] = ()) -> list[TokenizedExample]:
    """Tokenize all examples (``encode_example``), cutting each to ``seq_len + 1`` ids (``seq_len``
    inputs). Examples whose response is cut away entirely are dropped. One warning counts both."""
    out, cut, dropped = [], 0, 0
    for ex in examples:
        t = encode_example(ex, tok, template, soft_ids)
        if len(t.ids) > seq_len + 1:
            cut += 1
            t = TokenizedExample(t.ids[: seq_len + 1], t.labels[: seq_len + 1], t.kind)
            if all(label == IGNORE_INDEX for label in t.labels[1:]):
                dropped += 1
                continue
        out.append(t)
    if cut:
        warnings.warn(f"{cut} of {len(examples)} examples were longer than seq_len + 1 = {seq_len + 1} tokens and "
                      f"were truncated ({dropped} dropped: none of their response fitted); raise seq_len or "
                      f"shorten them", stacklevel=2)
    if not out:
        raise InstructError(f"no example fits seq_len={seq_len} with any of its response")
    return out


# ---- batches ------------------------------------------------------------------------------------
def pad_batch(items: Sequence[TokenizedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One example per row, right-padded to the longest: inputs (B, T) and targets (B, T) with
    IGNORE_INDEX at padding. Right padding needs no mask: causal attention never looks ahead."""
    T = max(t.n_inputs for t in items)
    inputs = torch.full((len(items), T), pad_id, dtype=torch.long)
    targets = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
    for i, t in enumerate(items):
        n = t.n_inputs
        inputs[i, :n] = torch.tensor(t.ids[:-1])
        targets[i, :n] = torch.tensor(t.labels[1:])
    return inputs, targets


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items (given by length, in this order) into rows of ``capacity``: each goes into the
    first row with room. Returns the item indices of each row."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than a row of {capacity}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def pack_batch(rows: Sequence[Sequence[TokenizedExample]], seq_len: int,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Seqs]:
    """Rows of several examples each -> inputs (B, seq_len), targets (B, seq_len) and the ``Seqs``
    that keep the examples apart (the unused tail of a row is one more, untrained, document)."""
    B = len(rows)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.zeros((B, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for d, t in enumerate(row):
            n = t.n_inputs
            if pos + n > seq_len:
                raise ValueError(f"row {r} holds {pos + n} tokens, more than seq_len={seq_len}")
            inputs[r, pos : pos + n] = torch.tensor(t.ids[:-1])
            targets[r, pos : pos + n] = torch.tensor(t.labels[1:])
            doc_ids[r, pos : pos + n] = d
            pos += n
        doc_ids[r, pos:] = len(row)
    return inputs, targets, Seqs.from_doc_ids(doc_ids)


def pad_id_of(tok: Tokenizer) -> int:
    """The id used to fill padding (never trained): PAD, else EOS, else 0."""
    return next((i for i in (tok.pad_id, tok.eos_id) if i is not None), 0)




# ---- where data lives ---------------------------------------------------------------------------
def split_file(data: str | Path, split: str) -> Path:
    """The file of ``split`` in ``data``: a .json/.jsonl file is itself (every split); a directory
    holds ``{split}.jsonl`` (or ``.json``); a bare name means ``$LMSTACK_HOME/data/<name>/``."""
    from .corpus import lmstack_home

    p = Path(data)
    if p.is_file():
        return p
    if not p.exists() and len(p.parts) == 1 and not p.suffix:
        p = lmstack_home() / "data" / p.name
    if not p.is_dir():
        raise InstructError(f"instruction data {str(data)!r} not found (looked at {p}); pass a .json/.jsonl file, "
                            f"a directory with train.jsonl/test.jsonl, or run `lmstack prepare shakespeare-tasks`")
    for ext in (".jsonl", ".json"):
        if (p / f"{split}{ext}").is_file():
            return p / f"{split}{ext}"
    raise InstructError(f"{p} has no {split!r} split (expected {split}.jsonl or {split}.json)")


def has_split(data: str | Path, split: str) -> bool:
    """Whether ``data`` is a directory (or name) with its own ``split`` file."""
    try:
        return not Path(data).is_file() and split_file(data, split).is_file()
    except InstructError:
        return False


def load_split(data: str | Path, split: str) -> list[Example]:
    return load_examples(split_file(data, split))


__all__ = ["IGNORE_INDEX", "Example", "InstructError", "PromptTemplate", "TEMPLATES", "TokenizedExample",
           "encode_example", "encode_examples", "encode_prompt", "first_fit", "get_template", "load_examples",
           "has_split", "load_split", "pack_batch", "pad_batch", "pad_id_of", "parse_record", "render_segments",
           "split_file", "with_soft_ids"]
