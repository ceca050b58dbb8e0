"""Checkpoints: atomic save, exact resume, no pickled code.

A run directory holds ``checkpoints/step_000123/`` folders and a ``checkpoint`` symlink to the
newest. Each folder has ``config.json`` (the ModelConfig), ``model.safetensors``,
``tokenizer.json``, ``trainer_state.json`` (step, tokens, the run's settings) and
``optimizer.pt`` (optimizer, loss-scaler and RNG state: tensors and plain containers only, loaded
with ``torch.load(weights_only=True)``). A folder is written under a temporary name and renamed
when complete; the symlink is then swapped atomically, so an interrupted save leaves the previous
checkpoint as the one that loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..io import atomic_dir, atomic_write_json, copy_tensors_into, fsync_dir, open_safetensors, save_safetensors
from ..model import Transformer

CONFIG_FORMAT = "lmstack"


def save_model_dir(model: Transformer, out: Path) -> None:
    """config.json + model.safetensors into an existing directory."""
    atomic_write_json(out / "config.json", {"format": CONFIG_FORMAT, **model.config.to_dict()})
    save_safetensors(model.stored_state_dict(), out / "model.safetensors", metadata={"format": "pt"})


def save_checkpoint(
    run_dir: str | Path,
    model: Transformer,
    *,
    step: int,
    trainer_state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    tokenizer_file: str | Path | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``run_dir/checkpoints/step_{step}`` atomically and point ``run_dir/checkpoint`` at it."""
    run_dir = Path(run_dir)
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        save_model_dir(model, tmp)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        atomic_write_json(tmp / "trainer_state.json", {"step": step, **(trainer_state or {})})
        if optimizer is not None:
            state = {"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state()}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if torch.cuda.is_available():
                state["rng_cuda"] = torch.cuda.get_rng_state_all()
            torch.save(state, tmp / "optimizer.pt")
    _point_latest(run_dir, final)
    _prune(run_dir, keep_last)
    return final


def _point_latest(run_dir: Path, target: Path) -> None:
    link, tmp = run_dir / "checkpoint", run_dir / ".checkpoint.tmp-link"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, link)  # atomic swap of the symlink
    fsync_dir(run_dir)


def _prune(run_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    current = (run_dir / "checkpoint").resolve()
    dirs = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    for p in dirs[:-keep_last]:
        if p.resolve() != current:
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, or a run directory (uses its ``checkpoint`` link)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "checkpoint" / "config.json").is_file():
        return (path / "checkpoint").resolve()
    raise FileNotFoundError(
        f"no lmstack checkpoint at {path} (expected config.json and model.safetensors); "
        "pass a checkpoint folder or a run directory"
    )


def read_config(ckpt: Path) -> ModelConfig:
    try:
        d = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{ckpt / 'config.json'} is unreadable ({e}); the checkpoint is damaged") from None
    if d.pop("format", None) != CONFIG_FORMAT:
        raise ValueError(
            f"{ckpt / 'config.json'} is not an lmstack config; for Hugging Face checkpoints use lmstack.from_hf"
        )
    return ModelConfig.from_dict(d)


def load_weights(model: Transformer, file: Path) -> None:
    """Stream tensors from ``file`` into ``model``, checking names and shapes."""
    expected = model.stored_state_dict()
    names = set(open_safetensors(file).keys())
    missing = sorted(set(expected) - names)
    if missing:
        raise ValueError(f"{file}: missing tensor(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise ValueError(f"{file}: unexpected tensor(s) {unexpected[:5]} for this config")
    copy_tensors_into(expected, {name: (file, name) for name in expected})


def load_model(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    model = Transformer.empty(cfg, dtype=dtype, device=device)
    load_weights(model, ckpt / "model.safetensors")
    return model.eval()


def load_checkpoint(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) from an lmstack checkpoint folder or run directory."""
    from ..data.tokenizer import Tokenizer

    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt, device=device, dtype=dtype)
    tok = Tokenizer.from_file(ckpt / "tokenizer.json") if (ckpt / "tokenizer.json").is_file() else None
    return model, tok


def load_training_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.json contents, optimizer.pt contents) — the latter loaded weights_only."""
    ckpt = resolve_checkpoint(path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    opt_file = ckpt / "optimizer.pt"
    opt = torch.load(opt_file, map_location="cpu", weights_only=True) if opt_file.is_file() else {}
    return state, opt
