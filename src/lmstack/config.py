"""ModelConfig: every architecture choice of an lmstack model, in one frozen dataclass.

Fields left as ``None`` are derived in ``__post_init__`` (``n_kv_heads`` defaults to ``n_heads``,
``head_dim`` to ``dim // n_heads``, ``ffn_dim`` to the LLaMA rule); a field the user set is never
overwritten. Invalid values raise ``ValueError`` naming the field, the value and what is allowed.
Presets are looked up by exact name and each names the checkpoint whose shape it copies.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")


CONFIG_FORMAT = "lmstack"  # config.json's "format" in an lmstack model folder (HF's has "model_type")


def _llama_ffn_dim(dim: int, multiple_of: int = 256) -> int:
    """The LLaMA rule: 2/3 of 4*dim, rounded up to a multiple (keeps SwiGLU's FLOPs at 4*dim's)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096  # residual stream width (HF: hidden_size)
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; in between -> GQA
    head_dim: int | None = None  # None -> dim // n_heads
    ffn_dim: int | None = None  # SwiGLU hidden width (HF: intermediate_size); None -> LLaMA rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"type": "linear"|"dynamic"|"llama3"|"yarn", "factor": float, ...} (HF key names).
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 puts a bias on q/k/v projections
    sliding_window: int | None = None  # Mistral: each token sees itself and the window-1 before it
    init_std: float = 0.02
    # Scale the init of each residual branch's output projection (o_proj, down_proj) by
    # 1/sqrt(2*n_layers) so the residual stream's variance does not grow with depth (GPT-2).
    init_scaled_residual: bool = True

    def __post_init__(self) -> None:
        def _set(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            positive_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            _set("n_kv_heads", self.n_heads)
        positive_int("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(1 for MQA, n_heads for MHA, a divisor in between for GQA)"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly"
                )
            _set("head_dim", self.dim // self.n_heads)
        positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs of dimensions)")
        if self.ffn_dim is None:
            _set("ffn_dim", _llama_ffn_dim(self.dim))
        positive_int("ffn_dim", self.ffn_dim)
        if not (0 < self.norm_eps < 1):
            raise ValueError(f"norm_eps={self.norm_eps} must be in (0, 1)")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if not self.init_std > 0:
            raise ValueError(f"init_std={self.init_std} must be > 0")
        if self.sliding_window is not None:
            positive_int("sliding_window", self.sliding_window)
        if self.rope_scaling is not None:
            _set("rope_scaling", _check_rope_scaling(self.rope_scaling, self.max_seq_len))

    # -- derived quantities -------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim

    @property
    def hf_model_type(self) -> str:
        """The Hugging Face family that holds this architecture, as ``to_hf`` writes it: "qwen2"
        (q/k/v bias), "mistral" (a sliding window) or "llama"."""
        return hf_model_type(self.qkv_bias, self.sliding_window)

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return dataclass_from_dict(cls, d, "ModelConfig field")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        d = dict(PRESETS[name]["config"])
        if overrides:
            # Width overrides on a real preset must re-derive head_dim / ffn_dim unless also given.
            if "dim" in overrides or "n_heads" in overrides:
                d.pop("head_dim", None)
            if "dim" in overrides:
                d.pop("ffn_dim", None)
            d.update(overrides)
        return cls.from_dict(d)


def hf_model_type(qkv_bias: Any, sliding_window: Any) -> str:
    """ModelConfig.hf_model_type from the two fields (also for a config.json read as a dict)."""
    if qkv_bias:
        if sliding_window is not None:
            raise ValueError("a model with both q/k/v bias and a sliding window has no HF equivalent")
        return "qwen2"
    return "llama" if sliding_window is None else "mistral"


def dataclass_from_dict(cls, d: dict[str, Any], what: str):
    """``cls(**d)``, but unknown keys raise one ValueError listing the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; valid: {', '.join(sorted(names))}")
    return cls(**d)


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict[str, Any]": (dict,)}


def check_types(obj: Any, what: str = "option") -> None:
    """Each field of dataclass ``obj`` holds a value of its annotated type ("int", "float | None", …):
    a recipe's or the command line's ``lr=true`` or ``seed=1.5`` is one clear error, not a failure
    later (bools are not numbers here; ints are floats)."""
    for f in dataclasses.fields(obj):
        parts = [t.strip() for t in str(f.type).split("|")]
        value = getattr(obj, f.name)
        if value is None and "None" in parts:
            continue
        kinds = tuple(k for t in parts for k in _KINDS.get(t, ()))
        if kinds and not (isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)):
            names = " or ".join("a number" if t == "float" else "a mapping" if t.startswith("dict") else
                                "null" if t == "None" else f"a {'string' if t == 'str' else t}" for t in parts)
            raise ValueError(f"{what} {f.name}={value!r} must be {names}")


def resolve_device(name: str, option: str = "--device") -> str:
    """A device option: "auto" (CUDA when there is one, else the CPU) or a torch device name,
    checked here so a typo or a missing GPU is a one-line error instead of a failure deep in torch."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} {name!r} is not a torch device; pass auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {name}: this machine has no CUDA device; pass {option} cpu (or auto)")
    return name


def positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_rope_scaling(rs: dict[str, Any], max_seq_len: int) -> dict[str, Any]:
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling={rs!r} must be None or a dict with a 'type' key")
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.get("type")
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling type={kind!r} is not supported; valid types: {ROPE_SCALING_TYPES}")
    rs["type"] = kind
    factor = rs.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"rope_scaling factor={factor!r} must be a number >= 1")
    if kind in ("llama3", "yarn"):  # as transformers: the pretraining context defaults to this one
        rs.setdefault("original_max_position_embeddings", max_seq_len)
    if kind == "dynamic":
        old = rs.get("original_max_position_embeddings")
        if not isinstance(old, int) or not 0 < old <= max_seq_len:
            raise ValueError(
                f"rope_scaling type='dynamic' needs original_max_position_embeddings (the trained "
                f"context, an int in [1, max_seq_len={max_seq_len}]), got {old!r}; max_seq_len is the "
                "extended context"
            )
    return rs


# Each preset names its source. Shapes only: weights come from `lmstack.from_hf`.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "source": "lmstack demo model (Shakespeare, byte-level BPE 4096), ~3M parameters, sized for 10 CPU minutes",
        "config": dict(
            vocab_size=4096, dim=192, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=512,
            norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256, tie_embeddings=True,
        ),
    },
    "llama-1.1b": {
        "source": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        "config": dict(
            vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
            norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048,
        ),
    },
    "llama3-8b": {
        "source": "meta-llama/Meta-Llama-3-8B",
        "config": dict(
            vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
            norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
        ),
    },
    "qwen2-0.5b": {
        "source": "Qwen/Qwen2-0.5B",
        "config": dict(
            vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
            norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=131072, tie_embeddings=True,
            qkv_bias=True,
        ),
    },
    "mistral-7b": {
        "source": "mistralai/Mistral-7B-v0.1",
        "config": dict(
            vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
            norm_eps=1e-5, rope_theta=10000.0, max_seq_len=32768, sliding_window=4096,
        ),
    },
}
