"""File plumbing shared by checkpoints, datasets and HF interop: atomic writes, safetensors with
clear errors.

Atomicity: everything is written into a temporary sibling first, flushed to disk, and only then
renamed into place (``os.replace`` is atomic on POSIX), so a crash or Ctrl-C at any moment leaves
either the old file/directory or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give it the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where the
    C library, kernel or file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale(final: Path, host: str) -> None:
    """Delete the siblings ``.NAME.tmp-HOST-PID-*`` and ``.NAME.old-HOST-PID`` that a writer on this
    host left when it was killed (a checkpoint's worth of disk each); a live writer's stay."""
    for kind, rest in (("tmp", re.compile(r"(\d+)-[^-]+")), ("old", re.compile(r"(\d+)"))):
        head = f".{final.name}.{kind}-{host}-"
        for p in final.parent.glob(glob.escape(head) + "*"):
            m = rest.fullmatch(p.name[len(head):])  # not another host whose name extends this one's
            if m and not _alive(int(m[1])):
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``final`` whole, on error it vanishes.
    The temporary siblings are named after this host and process, so a later call removes those of
    a writer that was killed (SIGKILL, power loss) before it could."""
    final = Path(final)
    made = [p for p in reversed(final.parents) if not p.exists()]  # parent folders this call creates
    final.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    owner = f"{host}-{os.getpid()}"
    _remove_stale(final, host)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{owner}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.iterdir():  # make the contents durable before they become visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.is_dir() and not final.is_symlink() and _exchange(tmp, final):
            fsync_dir(final.parent)  # one atomic swap: `final` was never missing; tmp now holds the old one
        else:  # a first write, or no renameat2: a moment without `final` between the two renames
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{owner}")
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(made):  # and the parents it made, innermost first, if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def check_output_dir(out: str | Path, *, sources: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output folder that replacing whole (``atomic_dir``) would lose data from: a file,
    a folder holding files but no config.json (not a model folder), or one of ``sources`` or a folder
    holding one of them (converting a model onto itself)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; pass a folder path for the model")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out} already holds files and is not a model folder (no config.json); it would be "
                         f"replaced whole, so pass a new or empty folder")
    for src in sources:
        src = Path(src).resolve()
        if out.resolve() == src or out.resolve() in src.parents:
            raise ValueError(f"--out {out} would replace the model being converted ({src}); pass another folder")
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def open_safetensors(path: str | Path):
    """``safe_open`` with a clear one-line error for missing, truncated or corrupt files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; check the directory holds the model's .safetensors file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError, …: header unreadable
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {e}); re-save or re-download it"
        ) from None


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def stored_dtype(path: str | Path) -> torch.dtype:
    """The floating dtype a safetensors file's tensors are stored in (read from its header; the
    first floating tensor's); float32 when it holds none."""
    handle = open_safetensors(path)
    for name in handle.keys():
        dtype = SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())
        if dtype is not None:
            return dtype
    return torch.float32


def read_tensor(handle, name: str, path: str | Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as e:
        raise ValueError(
            f"{path}: tensor {name!r} could not be read (truncated or corrupt file: {e}); re-save or re-download it"
        ) from None


def copy_tensors_into(expected: dict[str, torch.Tensor], sources: dict[str, tuple[Path, str]]) -> None:
    """Stream each tensor ``sources[name] = (file, key)`` into ``expected[name]``, one file open at
    a time, checking shapes; the caller has already checked that every name has a source."""
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(sources[name][0], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            handle = open_safetensors(file)
            held = set(handle.keys())
            for name in names:
                key = sources[name][1]
                if key not in held:
                    raise ValueError(f"{file} does not hold tensor {key!r}, which the index places there; the index "
                                     f"and the shards disagree: re-download the checkpoint")
                src, dst = read_tensor(handle, key, file), expected[name]
                if not src.dtype.is_floating_point:
                    raise ValueError(f"{file}: tensor {key!r} is {str(src.dtype).removeprefix('torch.')}, not a float "
                                     f"tensor; it is not a weight this model can load")
                if src.shape != dst.shape:
                    raise ValueError(
                        f"{file}: tensor {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)} for this config"
                    )
                dst.copy_(src)
                del src  # freed before the next read: the model plus one tensor at most


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (for one-line errors)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_json_object(file: str | Path) -> dict:
    """A JSON object file (a model folder's config, tokenizer or generation settings); {} when there is none."""
    file = Path(file)
    if not file.is_file():
        return {}
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read {file}: {first_line(e)}; fix or delete it") from None
    if not isinstance(obj, dict):
        raise ValueError(f"could not read {file}: expected a JSON object, got "
                         f"{type(obj).__name__}; fix or delete it")
    return obj


def read_jsonl_records(file: str | Path) -> list[dict]:
    """A JSON Lines log's records, oldest first ([] without the file); a line a crash cut short,
    or one that is not an object, is skipped."""
    file = Path(file)
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8", errors="replace").split("\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
