"""Checkpoints: atomic save, exact resume, no pickled code.

A run directory holds ``checkpoints/step_000123/`` folders and a ``checkpoint`` symlink to the
newest. Each folder has ``config.json`` (the ModelConfig), ``model.safetensors``,
``tokenizer.json``, ``trainer_state.json`` (step, tokens, the run's settings) and
``optimizer.pt`` (optimizer, loss-scaler and RNG state: tensors and plain containers only, loaded
with ``torch.load(weights_only=True)``). A folder is written under a temporary name and renamed
when complete; the symlink is then swapped atomically, so an interrupted save leaves the previous
checkpoint as the one that loads.

A parameter-efficient fine-tune saves no copy of the base model: its checkpoint folder holds
``adapter/`` (``lmstack.peft.save_adapter``) and ``finetune.json`` (the method, its options and the
base checkpoint it was trained on, with that base's config to check against) in place of
``config.json`` + ``model.safetensors``; ``load_model`` rebuilds base + adapter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import CONFIG_FORMAT, ModelConfig
from ..data.tokenizer import copy_tokenizer_files
from ..io import (atomic_dir, atomic_write_json, copy_tensors_into, fsync_dir, open_safetensors, read_json_object,
                  read_jsonl_records, save_safetensors)
from ..model import Transformer

FINETUNE_FILE = "finetune.json"  # marks an adapter checkpoint (base pointer + PEFT method)
FINETUNE_FORMAT = "lmstack-finetune"


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
    write_model: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step_{step}`` atomically and point ``run_dir/checkpoint`` at it.
    ``write_model(folder)`` replaces the default config.json + model.safetensors (adapter runs).
    ``tokenizer_file`` (a tokenizer.json) is copied in, with the tokenizer files beside it
    (tokenizer_config.json, chat templates, generation_config.json)."""
    run_dir = Path(run_dir)
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        if write_model is None:
            save_model_dir(model, tmp)
        else:
            write_model(tmp)
        if tokenizer_file is not None:  # with the files beside it: the EOS name, chat template, stop ids
            copy_tokenizer_files(Path(tokenizer_file).parent, tmp)
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
    dirs = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))  # by number: step_1000000 sorts after step_999999
    for p in dirs[:-keep_last]:
        if p.resolve() != current:
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path, *, adapters: bool = False) -> Path:
    """Accept a checkpoint folder, or a run directory (uses its ``checkpoint`` link). Adapter
    checkpoints (``finetune.json``, no full model) are accepted only with ``adapters=True``."""
    path = Path(path)
    for folder in (path, path / "checkpoint"):
        if (folder / "config.json").is_file():
            return folder.resolve() if folder != path else path
        if (folder / FINETUNE_FILE).is_file():
            if adapters:
                return folder.resolve() if folder != path else path
            raise ValueError(
                f"{folder} is an adapter checkpoint (a fine-tune that stores only its adapter); pass its base "
                f"model checkpoint here, or load it with lmstack.load_checkpoint / `lmstack eval --adapter`"
            )
    raise FileNotFoundError(
        f"no lmstack checkpoint at {path} (expected config.json and model.safetensors); "
        "pass a checkpoint folder or a run directory"
    )


def is_adapter_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / FINETUNE_FILE).is_file() and not (Path(ckpt) / "config.json").is_file()


def write_finetune_info(folder: Path, *, method: str, options: dict[str, Any], base: Path) -> None:
    """``finetune.json``: the PEFT method and options and the base checkpoint (absolute path + config)."""
    base = Path(base).resolve()
    atomic_write_json(folder / FINETUNE_FILE, {
        "format": FINETUNE_FORMAT, "method": method, "method_options": options, "base": str(base),
        "base_config": read_config(base).to_dict(),
    })


def read_finetune_info(ckpt: Path) -> dict[str, Any]:
    file = Path(ckpt) / FINETUNE_FILE
    info = read_json_object(file)
    if info.pop("format", None) != FINETUNE_FORMAT or not {"method", "base", "base_config"} <= set(info) \
            or not isinstance(info["base_config"], dict):
        raise ValueError(f"{file} is not a readable lmstack fine-tune description; the checkpoint is damaged")
    return info


def load_adapter_into(model: Transformer, adapter_dir: str | Path) -> Transformer:
    """Add a saved adapter (``lmstack.peft.save_adapter`` folder, or an adapter checkpoint / run
    directory holding one) to ``model`` in place."""
    from .. import peft

    path = Path(adapter_dir)
    if not (path / "adapter").is_dir() and (path / "checkpoint" / "adapter").is_dir():
        path = path / "checkpoint"
    if (path / "adapter").is_dir():
        path = path / "adapter"
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter at {adapter_dir}; pass a fine-tune run, its checkpoint or adapter folder")
    peft.load_adapter(model, path)
    return model


def _load_adapter_checkpoint(ckpt: Path, base: str | Path | None, device, dtype) -> Transformer:
    info = read_finetune_info(ckpt)
    base_path = Path(base) if base is not None else Path(info["base"])
    try:
        base_ckpt = resolve_checkpoint(base_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{ckpt} was fine-tuned from {base_path}, which is gone; pass the base model checkpoint explicitly "
            f"(`lmstack eval --checkpoint BASE --adapter {ckpt}`)"
        ) from None
    if read_config(base_ckpt).to_dict() != info["base_config"]:
        raise ValueError(f"{base_ckpt} is not the model {ckpt} was fine-tuned from (its config differs)")
    return load_adapter_into(load_model(base_ckpt, device=device, dtype=dtype), ckpt / "adapter")


def read_config(ckpt: Path) -> ModelConfig:
    file = Path(ckpt) / "config.json"
    if not file.is_file():
        raise ValueError(f"{file} is missing; the checkpoint is damaged")
    d = read_json_object(file)
    if d.pop("format", None) != CONFIG_FORMAT:
        raise ValueError(f"{file} is not an lmstack config; for Hugging Face checkpoints use lmstack.from_hf")
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


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


def load_model(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               base: str | Path | None = None) -> Transformer:
    """The model of a checkpoint folder or run directory, in eval mode. An adapter checkpoint gives
    its base model with the adapter added (``base`` overrides the base path it records)."""
    ckpt = resolve_checkpoint(path, adapters=True)
    if is_adapter_checkpoint(ckpt):
        return _load_adapter_checkpoint(ckpt, base, device, dtype).eval()
    cfg = read_config(ckpt)
    model = Transformer.empty(cfg, dtype=dtype, device=device)
    load_weights(model, ckpt / "model.safetensors")
    return model.eval()


def load_checkpoint(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    base: str | Path | None = None):
    """(model, tokenizer) from an lmstack checkpoint folder or run directory (adapter checkpoints
    included: see ``load_model``)."""
    from ..data.tokenizer import Tokenizer

    ckpt = resolve_checkpoint(path, adapters=True)
    model = load_model(ckpt, device=device, dtype=dtype, base=base)
    tok = Tokenizer.from_file(ckpt / "tokenizer.json") if (ckpt / "tokenizer.json").is_file() else None
    return model, tok


def training_history(ckpt: Path) -> dict[str, Any]:
    """What a checkpoint folder says about its run: ``step`` and ``tokens_seen`` from
    trainer_state.json (absent without one) and ``evals``, the validation records of the run's
    metrics.jsonl (``run/checkpoints/step_N`` -> ``run``), oldest first (empty without one)."""
    out: dict[str, Any] = {}
    state = read_json_object(ckpt / "trainer_state.json")
    if state:
        out.update(step=state.get("step"), tokens_seen=state.get("tokens_seen"))
    step = state.get("step")
    records = read_jsonl_records(Path(ckpt).resolve().parent.parent / "metrics.jsonl")
    # this checkpoint's evaluations: none from steps its weights never reached
    out["evals"] = [r for r in records if "val_loss" in r and (not isinstance(step, int) or r.get("step", 0) <= step)]
    return out


def load_training_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.json contents, optimizer.pt contents) — the latter loaded weights_only."""
    ckpt = resolve_checkpoint(path, adapters=True)
    if not (ckpt / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{ckpt} has no trainer_state.json: it holds a model, not a run to resume")
    state = read_json_object(ckpt / "trainer_state.json")
    opt_file = ckpt / "optimizer.pt"
    opt = torch.load(opt_file, map_location="cpu", weights_only=True) if opt_file.is_file() else {}
    return state, opt
