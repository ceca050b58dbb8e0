"""Hugging Face checkpoints in and out: Llama, Qwen2 and Mistral causal LMs.

lmstack names its modules as HF LLaMA does, so conversion is a key prefix (``model.``) plus a
config translation. Loading streams one tensor at a time from (possibly sharded) safetensors into a
model allocated directly in the target dtype, so peak memory is one copy of the weights plus one
tensor. Saving writes a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads,
sharded with an index above ``max_shard_bytes``, atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, positive_int
from ..data.tokenizer import Tokenizer, copy_tokenizer_files
from ..io import (atomic_dir, check_output_dir, copy_tensors_into, open_safetensors, read_json_object, save_safetensors,
                  stored_dtype)
from ..model import Transformer
from ..model.transformer import check_model_dtype

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
SUPPORTED = ", ".join(ARCHITECTURES)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def _family(hf: dict[str, Any], path: Path) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = hf.get("model_type")
    if not archs and mt in ARCHITECTURES.values():
        return mt
    raise ValueError(f"{path}: architecture {archs or mt!r} is not supported; supported: {SUPPORTED}")


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and scaling from either spelling: 4.x ``rope_theta`` + ``rope_scaling``, 5.x
    ``rope_parameters`` (which holds rope_theta too)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return theta, None
    out = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
    out["type"] = kind
    return theta, out


_INT, _NUM = (int,), (int, float)
# config.json fields lmstack reads: (kinds, required); a wrong kind is an error naming the field
CONFIG_FIELDS = {
    "vocab_size": (_INT, True), "hidden_size": (_INT, True), "num_hidden_layers": (_INT, True),
    "num_attention_heads": (_INT, True), "intermediate_size": (_INT, True), "num_key_value_heads": (_INT, False),
    "head_dim": (_INT, False), "max_position_embeddings": (_INT, False), "original_max_position_embeddings": (_INT, False),
    "rms_norm_eps": (_NUM, False), "initializer_range": (_NUM, False), "rope_theta": (_NUM, False),
    "tie_word_embeddings": ((bool,), False), "sliding_window": (_INT, False),
    "rope_scaling": ((dict,), False), "rope_parameters": ((dict,), False), "max_window_layers": (_INT, False),
    "layer_types": ((list,), False),
}


# What each transformers config class assumes for a key config.json leaves out (an explicit null
# keeps its own meaning: no window, or as many K/V heads as query heads).
FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "max_window_layers": 28},
    "mistral": {"max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
}
# numbers with no meaning as null (transformers 5 refuses them, 4.x fails later)
NOT_NULL = ("rms_norm_eps", "initializer_range", "rope_theta", "max_position_embeddings")


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    """isinstance, except that a JSON true/false is not a number."""
    return isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)


def _check_fields(hf: dict[str, Any], path: Path) -> None:
    """One-line errors for a config.json that lacks a size or holds a field of the wrong type (null
    counts as absent, as transformers reads it, except for the numbers in ``NOT_NULL``)."""
    for key, (kinds, required) in CONFIG_FIELDS.items():
        value = hf.get(key)
        if value is None:
            if required:
                raise ValueError(f"{path}: required field {key!r} is missing; pass the model's full config.json")
            if key in NOT_NULL and key in hf:
                raise ValueError(f"{path}: {key} is null; give it a number or delete the key")
        elif not _is(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise ValueError(f"{path}: {key}={value!r} must be a {names}; fix config.json")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", 0)
    if not _is(theta, _NUM):
        raise ValueError(f"{path}: rope_parameters' rope_theta={theta!r} must be a number; fix config.json")


def config_from_hf(hf: dict[str, Any], path: Path | str = "config.json") -> ModelConfig:
    """Translate an HF config dict into a ModelConfig (raising on features we do not implement)."""
    path = Path(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object (an HF model config), got {type(hf).__name__}")
    family = _family(hf, path)  # an unsupported architecture is named first
    _check_fields(hf, path)
    hf = {**FAMILY_DEFAULTS[family], **hf}
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' two names for x * sigmoid(x)
        raise ValueError(f"{path}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=true is not supported")
    if family == "llama" and hf.get("attention_bias"):
        raise ValueError(f"{path}: attention_bias=true (bias on q/k/v/o) is not supported")
    window = None
    if family == "mistral":
        window = hf.get("sliding_window")
    elif family == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        # as Qwen2Config: layers from max_window_layers on get the window (unless layer_types says)
        n, first = hf["num_hidden_layers"], hf.get("max_window_layers")
        first = FAMILY_DEFAULTS["qwen2"]["max_window_layers"] if first is None else first
        types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        if all(t == "sliding_attention" for t in types):
            window = hf["sliding_window"]
        elif any(t == "sliding_attention" for t in types):
            raise ValueError(f"{path}: Qwen2 use_sliding_window=true with windows on some layers only (layers from "
                             f"max_window_layers={first} of {n}) is not supported")
    theta, scaling = _rope(hf)
    if scaling is not None and scaling["type"] in ("linear", "dynamic", "yarn", "llama3"):
        factor = scaling.get("factor")
        derived = factor is None and scaling["type"] in ("yarn", "llama3")  # the ratio of the two contexts, below
        if not (derived or _is(factor, _NUM)):
            key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
            raise ValueError(f"{path}: {key} of type {scaling['type']!r} needs a numeric 'factor', got "
                             f"{factor!r}; fix config.json")
    max_len = hf.get("max_position_embeddings", 2048)
    if (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{path}: partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    if scaling is not None and scaling["type"] == "dynamic":
        # transformers scales past max_position_embeddings; our max_seq_len is the extended context.
        scaling["original_max_position_embeddings"] = max_len
        max_len = int(max_len * scaling["factor"])
    elif scaling is not None and scaling["type"] in ("llama3", "yarn"):
        old = hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings") or max_len
        scaling["original_max_position_embeddings"] = old
        if scaling.get("factor") is None:  # yarn may leave it to the ratio of the two contexts
            scaling["factor"] = max_len / old
        if scaling["type"] == "yarn":  # Qwen2.5's YaRN recipe leaves max_position_embeddings at the
            # trained context; the extended one (factor x original) is what our max_seq_len must allow.
            # (llama3's factor is not a context ratio: Llama 3.2 has 32 x 8192 > its 131072.)
            max_len = max(max_len, int(scaling["factor"] * old))
    heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // max(heads, 1), ffn_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=max_len, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2", sliding_window=window, init_std=hf.get("initializer_range", 0.02),
        )
    except ValueError as e:  # a size ModelConfig refuses: say which file it came from
        raise ValueError(f"{path}: {e}") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from a single model.safetensors or a sharded index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:  # bad JSON or UTF-8, no weight_map, not an object
            raise ValueError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); re-download it") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to shard file names; re-download it")
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"{path} has no model.safetensors or model.safetensors.index.json (.bin checkpoints are not supported)"
        )
    return {k: single for k in open_safetensors(single).keys()}


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors lmstack may skip: RoPE's inv_freq (older transformers saved the buffer)
    and, with tied embeddings, an lm_head copy of the embedding."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype, its name ("bfloat16", "torch.bfloat16", "bf16") or None / "auto" (None: the
    checkpoint's own dtype, as transformers' ``dtype="auto"``)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return check_model_dtype(dtype)
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        valid = ", ".join([*DTYPES, *DTYPE_ALIASES, "auto"])
        raise ValueError(f"dtype={dtype!r} is not a dtype lmstack loads; pass one of {valid}, a torch dtype or None")
    return DTYPES[name]


def from_hf(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None) -> Transformer:
    """Load an HF Llama / Qwen2 / Mistral checkpoint directory as an lmstack Transformer.

    dtype: None (or "auto") uses config.json's ``dtype``/``torch_dtype``, else the stored weights'
    dtype, as transformers' ``dtype="auto"`` does.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face model directory")
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, or not UTF-8
        raise ValueError(f"{cfg_file} is not valid JSON ({e})") from None
    cfg = config_from_hf(hf, cfg_file)
    dtype = parse_dtype(dtype)
    files = _weight_files(path)
    if dtype is None:
        named = hf.get("dtype") or hf.get("torch_dtype")
        if named is not None:  # "auto" written in config.json means what it says: the stored dtype
            try:
                dtype = parse_dtype(named) if named != "float64" else torch.float64
            except ValueError:
                raise ValueError(f"{cfg_file}: dtype {named!r} is not one lmstack loads; pass dtype= (float32, "
                                 f"bfloat16, float16)") from None
        if dtype is None:
            dtype = stored_dtype(next(iter(files.values()))) if files else torch.float32
    model = Transformer.empty(cfg, dtype=dtype, device=device)  # allocated once, in the target dtype
    expected = model.stored_state_dict()
    missing = [k for k in expected if _hf_name(k) not in files]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor(s) {[_hf_name(k) for k in missing[:5]]}")
    used = {_hf_name(k) for k in expected}
    extra = sorted(k for k in files if k not in used and not _ignorable(k, cfg))
    if extra:  # e.g. more layers than config.json says: loading would silently drop them
        raise ValueError(f"{path}: checkpoint holds tensor(s) {extra[:5]}{' …' if len(extra) > 5 else ''} that this "
                         f"config has no place for; check num_hidden_layers and the sizes in config.json")
    copy_tensors_into(expected, {k: (files[_hf_name(k)], _hf_name(k)) for k in expected})
    return model.eval()


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    model_type = cfg.hf_model_type
    arch = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."), "attention_dropout": 0.0,
    }
    if cfg.rope_scaling is not None:
        rs = dict(cfg.rope_scaling)
        rs["rope_type"] = rs.pop("type")
        if rs["rope_type"] == "dynamic":  # transformers starts scaling past max_position_embeddings
            out["max_position_embeddings"] = rs.pop("original_max_position_embeddings")
        out["rope_scaling"] = rs
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return out


def to_hf(model: Transformer, out_dir: str | Path, *, max_shard_bytes: int = 5 * 2**30,
          tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``model`` as an HF checkpoint directory (atomically; sharded above ``max_shard_bytes``).

    ``tokenizer_dir`` (an HF model folder or an lmstack checkpoint) adds its tokenizer files
    (``copy_tokenizer_files``) and sets config.json's bos/eos/pad ids from its tokenizer; a tokenizer
    lmstack trained also gets a tokenizer_config.json naming them, so ``AutoTokenizer`` and
    ``generate`` stop where lmstack does. Without it the ids are written as null."""
    if not isinstance(model, Transformer):
        raise ValueError(f"to_hf writes an lmstack Transformer, got {type(model).__name__}")
    positive_int("max_shard_bytes", max_shard_bytes)
    method = (getattr(model, "peft_config", None) or {}).get("method")
    if method is not None:  # its tensors would be written under names no HF model has
        raise ValueError(f"the model has a {method!r} adapter; to_hf writes plain models: merge_and_unload() it "
                         f"(LoRA, IA3) or save it apart with lmstack.peft.save_adapter")
    cfg = model.config
    sd = {_hf_name(k): v for k, v in model.stored_state_dict().items()}
    dtype = next(iter(sd.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    out_dir = check_output_dir(out_dir)
    tok = None
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} is not a folder; pass the model or checkpoint folder "
                                f"holding tokenizer.json")
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(tokenizer_dir)
    with atomic_dir(out_dir) as tmp:
        config = {**config_to_hf(cfg, dtype), **special_token_ids(tok)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_safetensors(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in sd.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
            )
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
            if tok is not None and not (tmp / "tokenizer_config.json").is_file():  # a tokenizer lmstack trained
                config = {k: v for k, v in tok.hf_config().items() if v is not None}
                (tmp / "tokenizer_config.json").write_text(json.dumps(
                    {**config, "model_max_length": cfg.max_seq_len}, indent=2) + "\n")
    return out_dir


def special_token_ids(tok: Tokenizer | None) -> dict[str, Any]:
    """config.json's bos/eos/pad ids for ``tok`` (an lmstack Tokenizer, or None: every id null, so
    transformers does not fall back to its config class's defaults, e.g. Llama's 1 and 2, which
    need not be this vocabulary's). Several stop ids (Llama 3's ``<|eot_id|>`` too) become a list."""
    if tok is None:
        return dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    eos = tok.stop_ids if len(tok.stop_ids) > 1 else tok.eos_id
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id}


# transformers' generate() defaults for what generation_config.json leaves unset, when it samples
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": None, "min_p": None, "typical_p": None,
                      "epsilon_cutoff": None, "eta_cutoff": None, "top_h": None}
# token-list fields that apply in every mode (generate checks their shape)
_TOKEN_LISTS = ("sequence_bias", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_eos_token_id",
                "exponential_decay_length_penalty")
# ... and for beam search (num_beams > 1); num_return_sequences applies to beam search only here
_BEAM_DEFAULTS = {"length_penalty": 1.0, "early_stopping": False, "num_return_sequences": 1}
# generation_config.json fields that change transformers' output and that lmstack.generate does not
# implement, with the values that leave them off
_UNSUPPORTED = {
    "encoder_no_repeat_ngram_size": 0, "force_words_ids": None, "forced_bos_token_id": None,
    "num_beam_groups": 1, "diversity_penalty": 0.0,
    "penalty_alpha": None, "encoder_repetition_penalty": 1.0,
    "dola_layers": None, "constraints": None,
    "watermarking_config": None, "token_healing": False,
}


def _number(file: Path, key: str, value: Any, kinds: tuple = (int, float)) -> Any:
    if value is not None and not _is(value, kinds):
        raise ValueError(f"{key} in {file} must be {'an integer' if kinds == (int,) else 'a number'}, got {value!r}; "
                         f"fix or delete it")
    return value


def generation_settings(folder: str | Path) -> dict[str, Any]:
    """The decoding settings of a model folder's generation_config.json, as transformers' generate()
    applies them, in lmstack.generate's keywords: {} without the file; greedy ({"temperature": 0.0})
    unless it sets do_sample; when sampling, its temperature, top_k, top_p, min_p, typical_p,
    epsilon_cutoff, eta_cutoff and top_h, with transformers' defaults (temperature 1, top_k 50) for the
    unset ones; with num_beams > 1, beam search with its length_penalty, early_stopping and
    num_return_sequences (transformers' defaults 1.0, False, 1), sampled when do_sample is set (beam
    sampling, as transformers); either way its repetition_penalty, no_repeat_ngram_size,
    min_new_tokens, min_length, sequence_bias, bad_words_ids, suppress_tokens,
    begin_suppress_tokens, forced_eos_token_id, exponential_decay_length_penalty,
    renormalize_logits, stop_strings (which ``generate`` reads with the folder's tokenizer),
    max_time and guidance_scale (unless 1), and its max_new_tokens, else its max_length (prompt +
    new tokens). Stop ids come from the tokenizer (``Tokenizer.stop_ids``); fields lmstack does not implement are
    listed by ``unsupported_generation_settings``."""
    file = Path(folder) / "generation_config.json"
    gc = read_json_object(file)
    if not gc:
        return {}
    sample = bool(gc.get("do_sample"))
    out = {}
    for key in ("repetition_penalty", *(_SAMPLING_DEFAULTS if sample else ())):
        value = _number(file, key, gc.get(key))
        value = _SAMPLING_DEFAULTS.get(key) if value is None else value
        if value is not None:
            out[key] = value
    if not sample:
        out["temperature"] = 0.0
    for key in ("max_new_tokens", "num_beams", "max_length", "no_repeat_ngram_size", "min_new_tokens", "min_length"):
        if _number(file, key, gc.get(key), (int,)) is not None:
            out[key] = gc[key]
    for key in ("max_time", "guidance_scale"):
        if _number(file, key, gc.get(key)) is not None:
            out[key] = gc[key]
    if out.get("guidance_scale") == 1:  # transformers: 1 is no guidance
        del out["guidance_scale"]
    if "max_new_tokens" in out:  # transformers: max_new_tokens takes precedence
        out.pop("max_length", None)
    out.update({k: gc[k] for k in _TOKEN_LISTS if gc.get(k) not in (None, [], {})})
    if gc.get("renormalize_logits"):
        out["renormalize_logits"] = True
    stops = gc.get("stop_strings")
    if stops is not None:
        if isinstance(stops, str):
            stops = [stops]
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
            raise ValueError(f"stop_strings in {file} must be a string or a list of non-empty strings, got {stops!r}; "
                             f"fix or delete it")
        if stops:
            out["stop_strings"] = stops
    if out.get("num_beams", 1) > 1:
        for key, default in _BEAM_DEFAULTS.items():
            value = gc.get(key)
            if key == "early_stopping":
                if value is not None and value not in (True, False, "never"):
                    raise ValueError(f"early_stopping in {file} must be true, false or \"never\", got {value!r}; "
                                     f"fix or delete it")
            else:
                _number(file, key, value, (int,) if key == "num_return_sequences" else (int, float))
            out[key] = default if value is None else value
    return out


def unsupported_generation_settings(folder: str | Path) -> dict[str, Any]:
    """The fields of a model folder's generation_config.json that change what transformers' generate()
    returns but that lmstack.generate does not implement (``diversity_penalty``, ``penalty_alpha``,
    ``force_words_ids``, ...), with their values; {} when there are none or there is no file."""
    gc = read_json_object(Path(folder) / "generation_config.json") or {}
    return {k: gc[k] for k, off in _UNSUPPORTED.items() if gc.get(k) not in (off, None, [], {})}
