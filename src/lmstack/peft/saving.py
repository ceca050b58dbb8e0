"""Adapter files: only the adapter's tensors and the recipe to rebuild it, in two formats.

- ``format="lmstack"``: ``adapter.json`` ({"method", "options", "folded"}) + ``adapter.safetensors``
  keyed like ``lmstack.peft.adapter_state_dict``. Every method.
- ``format="peft"``: HF peft's ``adapter_config.json`` + ``adapter_model.safetensors``
  (``lmstack.interop.peft_format``): LoRA, IA3, prompt tuning, prefix tuning / P-tuning v2.

Prefix tuning is always saved folded (the prefixes its MLP computes; the model itself is left
as it is, so training can go on). Each file is written atomically (temporary file, then rename),
weights first and the config last, so a directory with a config holds complete weights. Two
files cannot be swapped in one step, so the weights' metadata carries a digest of the config they
were saved with: a save interrupted between the two leaves a pair that ``load_adapter`` refuses
(fields people edit by hand, such as ``base_model_name_or_path``, are not in the digest). Saving
one format removes the other's files (they would hold the adapter this save replaces); the
directory may hold other files (a training checkpoint), which are left alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..interop.peft_format import from_peft, to_peft
from .common import check_not_decoding
from ..io import atomic_write_bytes, atomic_write_json, open_safetensors, read_tensor

CONFIG, WEIGHTS = "adapter.json", "adapter.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FORMATS = ("lmstack", "peft")


def _saved_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    from . import adapter_state_dict

    if model.peft_config["method"] == "prefix":
        return {"prefix_encoder.table": model.prefix_encoder.full_table()}, True
    return adapter_state_dict(model), False


DIGEST = "lmstack_config_digest"  # safetensors metadata key (peft ignores metadata)
EDITABLE = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"}


def _digest(config: dict) -> str:
    """A digest of what the config says about the weights (JSON-normalised; hand-edited fields left out)."""
    kept = {k: v for k, v in json.loads(json.dumps(config)).items() if k not in EDITABLE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:32]


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict, config_name: str, weights_name: str) -> None:
    from safetensors.torch import save

    other_config, other_weights = (PEFT_CONFIG, PEFT_WEIGHTS) if config_name == CONFIG else (CONFIG, WEIGHTS)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                metadata={"format": "pt", DIGEST: _digest(config)})
    (path / other_config).unlink(missing_ok=True)  # first: the adapter being replaced is no longer readable
    atomic_write_bytes(path / weights_name, data)
    atomic_write_json(path / config_name, config)
    (path / other_weights).unlink(missing_ok=True)


def save_adapter(model: nn.Module, out_dir: str | Path, format: str = "lmstack") -> Path:
    """Write the model's adapter (not the base weights) to ``out_dir`` in ``format``; returns the dir."""
    from . import _require

    method = _require(model)
    if format not in FORMATS:
        raise ValueError(f"unknown adapter format {format!r}; valid: {FORMATS}")
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError("the adapter is merged into the base weights; unmerge(model) before saving it")
    options = model.peft_config["options"]
    with torch.no_grad():
        tensors, folded = _saved_tensors(model)
        if format == "lmstack":
            files = tensors, {"method": method, "options": options, "folded": folded}, CONFIG, WEIGHTS
        else:
            config, peft_tensors = to_peft(method, options, tensors, model.config)  # raises before anything is written
            files = peft_tensors, config, PEFT_CONFIG, PEFT_WEIGHTS
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(out, *files)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the adapter") from None


def _read_tensors(path: Path, config: dict, config_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, refused if its metadata says it was saved with another config."""
    handle = open_safetensors(path)
    saved = (handle.metadata() or {}).get(DIGEST)  # absent in files peft (or an older lmstack) wrote
    if saved is not None and saved != _digest(config):
        raise ValueError(f"{path} was saved with another {config_name} than the one beside it (a save interrupted "
                         f"between the two files?); save the adapter again")
    return {k: read_tensor(handle, k, path) for k in handle.keys()}


def read_adapter(path: str | Path, model_config) -> tuple[str, dict, bool, dict[str, torch.Tensor]]:
    """(method, options, folded, tensors) from an adapter directory of either format."""
    path = Path(path)
    if (path / CONFIG).is_file():
        cfg = _read_json(path / CONFIG)
        if cfg.get("method") is None or not isinstance(cfg.get("options"), dict):
            raise ValueError(f"{path / CONFIG} lacks 'method' and 'options'; re-save the adapter")
        tensors = _read_tensors(path / WEIGHTS, cfg, CONFIG)
        return cfg["method"], cfg["options"], bool(cfg.get("folded", False)), tensors
    if (path / PEFT_CONFIG).is_file():
        cfg = _read_json(path / PEFT_CONFIG)
        return from_peft(cfg, _read_tensors(path / PEFT_WEIGHTS, cfg, PEFT_CONFIG), model_config)
    raise FileNotFoundError(f"{path} holds no adapter: neither {CONFIG} (lmstack) nor {PEFT_CONFIG} (HF peft)")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` (either format, or by HF peft) into ``model``.

    A plain model gets the method applied first; a model that already has the same method and
    options just takes the weights. Returns the model.
    """
    from . import INIT_ONLY, apply, method_of, options_of, unload

    check_not_decoding(model, "load_adapter")
    method, options, folded, tensors = read_adapter(adapter_dir, model.config)
    options = {k: v for k, v in options_of(method, options).items() if k not in INIT_ONLY}
    if method_of(model) is not None:
        if model.peft_config != {"method": method, "options": options}:
            raise ValueError(
                f"{adapter_dir} holds a {method!r} adapter with options {options}; the model already has "
                f"{model.peft_config}; load it into a plain model"
            )
        if any(getattr(m, "merged", False) for m in model.modules()):
            raise ValueError("the model's adapter is merged; unmerge(model) before loading adapter weights")
        _load_weights(model, tensors, folded, adapter_dir)  # checks everything before it copies anything
        return model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    apply(model, method, **options)
    try:
        _load_weights(model, tensors, folded, adapter_dir)
    except BaseException:  # leave the model as it came: plain, with its own requires_grad flags
        unload(model)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return model


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], folded: bool, adapter_dir) -> None:
    """Copy the adapter ``tensors`` into the model's adapter, after checking every name and shape."""
    from . import adapter_state_dict, fold

    if folded:
        fold(model)  # computes what the prefix MLP computed: the model's outputs do not change
    _check_base_weights(model, tensors, adapter_dir)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{adapter_dir}: adapter tensors do not fit the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for name, p in expected.items():
        t = tensors[name]
        if t.shape != p.shape:
            raise ValueError(f"{adapter_dir}: {name!r} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])


def _check_base_weights(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_dir) -> None:
    """HF peft also saves the base weight of a targeted lm_head or embedding (``*.base_layer.weight``):
    take those out of ``tensors``; each must be the model's own weight (in either one's precision),
    which it is unless the adapter was trained on another model (a resized vocabulary)."""
    params = dict(model.named_parameters())
    for name in [k for k in tensors if k.endswith(".base_layer.weight") and k in params]:
        saved, own = tensors.pop(name), params[name]
        same = saved.shape == own.shape and (torch.equal(own.detach().to(saved.dtype).cpu(), saved.cpu())
                                             or torch.equal(saved.to(own.dtype).cpu(), own.detach().cpu()))
        if not same:
            raise ValueError(f"{adapter_dir}: the adapter carries {name!r} {tuple(saved.shape)}, which is not this "
                             f"model's {tuple(own.shape)} weight (peft saves the base layer it trained on, e.g. after "
                             f"resizing the vocabulary); load the adapter onto that model")
