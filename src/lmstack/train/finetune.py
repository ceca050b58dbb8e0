"""Instruction fine-tuning on the pretraining loop: full or parameter-efficient (``lmstack.peft``).

``Finetuner`` is a ``Trainer`` whose model is a base checkpoint's (optionally with PEFT modules,
which freeze the base weights so only the adapter is optimised) and whose batches are instruction
examples with the loss on response tokens only (``lmstack.data.instruct``), padded or packed.
Everything else — schedule, accumulation, clipping, precision, Ctrl-C, metrics, loss.png, atomic
checkpoints and exact resume — is the pretraining loop's.

Exact resume: examples are packed once (in an order seeded by ``seed``), and each epoch visits the
rows in a permutation seeded by ``(seed, epoch)``; micro-batch ``k = step * grad_accum + micro`` is
a pure function of ``k``, so a resumed run replays the same batches.

Checkpoints: ``method=full`` writes a normal checkpoint (the whole model). A PEFT method writes
``adapter/`` (``lmstack.peft.save_adapter``: what inference and export load) and ``finetune.json``
(method, options, base pointer) instead of the model, plus ``trainable.safetensors``: every
parameter being trained, by name, as training sees it (prefix tuning's adapter is saved folded,
which cannot be trained on from), so resume = base + the method applied afresh + these tensors.
``lmstack.load_checkpoint`` rebuilds base + adapter from such a folder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import peft
from ..config import dataclass_from_dict
from ..data.instruct import (TEMPLATES, TokenizedExample, encode_examples, first_fit, has_split, load_split,
                             pack_batch, pad_batch, pad_id_of)
from ..data.tokenizer import Tokenizer
from ..io import copy_tensors_into, open_safetensors, save_safetensors
from ..kernels import Seqs
from .checkpoint import (is_adapter_checkpoint, load_model, read_config, read_finetune_info, resolve_checkpoint,
                         save_checkpoint, save_model_dir, write_finetune_info)
from .objectives import IGNORE_INDEX, causal_lm_loss
from .trainer import Trainer, TrainConfig, stream_seed

METHODS = ("full", *peft.METHODS)
VIRTUAL_TOKEN_METHODS = ("prefix", "ptuning_v2", "prompt")  # extra leading positions (prompt: by default)
TRAINABLE_FILE = "trainable.safetensors"
_PRETRAINING_ONLY = {"model": "tiny", "model_overrides": {}, "doc_mask": False}  # the base decides these


@dataclass
class FinetuneConfig(TrainConfig):
    """One fine-tuning job: the training options plus what to start from and what to train."""

    base: str = ""  # base checkpoint: an lmstack checkpoint folder or run directory (required)
    data: str = "shakespeare-tasks"  # task name/dir (train.jsonl, test.jsonl) or a .json/.jsonl file
    out_dir: str = "runs/finetune"
    method: str = "lora"  # full | lora | adapter | prefix | ptuning_v2 | prompt | ia3
    method_options: dict[str, Any] = field(default_factory=dict)  # passed to lmstack.peft.apply, e.g. {r: 8}
    template: str = "alpaca"  # prompt template for Alpaca records: alpaca | plain
    packing: bool | None = None  # several examples per row, kept apart by document masks; None: on, except
    # for the methods with leading virtual tokens (prefix, ptuning_v2, prompt at position start), which
    # cannot be packed
    epochs: float | None = None  # when set, max_steps = ceil(epochs * batches per epoch / grad_accum)
    eval_split: str | None = "test"  # held-out split for the periodic response loss; null = none
    max_steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_tokens: int = 16384  # response tokens per periodic eval (0 = all); the final eval uses all
    save_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, default in _PRETRAINING_ONLY.items():
            if getattr(self, name) != default:
                raise ValueError(f"{name} does not apply to finetune: the architecture comes from base")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; valid: {', '.join(METHODS)}")
        if self.method == "full" and self.method_options:
            raise ValueError("method_options apply to PEFT methods; method=full takes none")
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options={self.method_options!r} must be a mapping of option: value")
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r} is not supported; valid: {', '.join(TEMPLATES)}")
        leading = self.method in VIRTUAL_TOKEN_METHODS and not self.soft_ids()
        if self.packing is None:
            self.packing = not leading
        elif self.packing and leading:
            alt = " (or put the soft prompt before the answer: position=end)" if self.method == "prompt" else ""
            raise ValueError(f"method={self.method} adds leading virtual tokens, which packed rows cannot share; "
                             f"set packing=false{alt}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be > 0 (or null to use max_steps)")

    def soft_ids(self) -> list[int]:
        """Placeholder ids the method's soft prompt puts before every answer (``peft.soft_prompt_ids_of``)."""
        return [] if self.method == "full" else peft.soft_prompt_ids_of(self.method, self.method_options)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        return dataclass_from_dict(cls, d, "finetune option")

    @classmethod
    def hidden_fields(cls) -> tuple[str, ...]:
        """Inherited pretraining fields that finetune does not take (left out of --help)."""
        return tuple(_PRETRAINING_ONLY)


class InstructBatches:
    """Micro-batch ``k`` of an endless, epoch-shuffled pass over tokenized examples.

    Rows are fixed once: with ``packing``, examples (in a seeded order) are packed first-fit into
    rows of ``seq_len`` inputs; without, each example is a row. Epoch ``e`` visits the rows in a
    permutation seeded by ``(seed, e)``, ``batch_size`` rows per batch (the last may be smaller).
    """

    def __init__(self, items: Sequence[TokenizedExample], *, batch_size: int, seq_len: int, pad_id: int,
                 packing: bool, seed: int):
        self.items, self.batch_size, self.seq_len, self.pad_id = list(items), batch_size, seq_len, pad_id
        self.packing, self.seed = packing, seed
        order = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(seed)).tolist()
        if packing:
            rows = first_fit([self.items[i].n_inputs for i in order], seq_len)
            self.rows = [[order[j] for j in row] for row in rows]
        else:
            self.rows = [[i] for i in order]
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its row order), the one in use

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.rows) / self.batch_size)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(stream_seed(self.seed, epoch))
            self._order = (epoch, torch.randperm(len(self.rows), generator=g).tolist())
        return self._order[1]

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor, Seqs | None, int]:
        """(inputs, targets, seqs or None, real tokens) of micro-batch ``k``."""
        epoch, i = divmod(k, len(self))
        rows = [self.rows[r] for r in self._epoch_order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]]
        n_tokens = sum(self.items[j].n_inputs for row in rows for j in row)
        if self.packing:
            x, y, seqs = pack_batch([[self.items[j] for j in row] for row in rows], self.seq_len, self.pad_id)
            return x, y, seqs, n_tokens
        x, y = pad_batch([self.items[row[0]] for row in rows], self.pad_id)
        return x, y, None, n_tokens


class Finetuner(Trainer):
    """The training loop on instruction data, from a base checkpoint; see the module docstring."""

    cfg: FinetuneConfig
    RUN_FIELDS = ("data", "seq_len", "batch_size", "grad_accum", "seed", "method", "method_options", "template",
                  "packing")
    MODEL_LABEL = "base model"

    def __init__(self, cfg: FinetuneConfig, *, resume: bool = False, progress: bool = True):
        super().__init__(cfg, resume=resume, progress=progress)

    # -- data ---------------------------------------------------------------------------------
    def _setup_data(self, dataset: Any) -> None:
        cfg = self.cfg
        if not cfg.base:
            raise ValueError("finetune needs a base model: --base CHECKPOINT (or base=... in the recipe)")
        self.base_ckpt = resolve_checkpoint(cfg.base)
        if not (self.base_ckpt / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{self.base_ckpt} has no tokenizer.json; fine-tuning needs the base's tokenizer")
        self.tokenizer = Tokenizer.from_file(self.base_ckpt)
        limit = read_config(self.base_ckpt).max_seq_len
        if cfg.seq_len > limit:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds the base model's max_seq_len={limit}")
        self.pad_id = pad_id_of(self.tokenizer)
        soft = cfg.soft_ids()
        train = encode_examples(load_split(cfg.data, "train"), self.tokenizer, cfg.seq_len, cfg.template, soft)
        self.batches = InstructBatches(train, batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=self.pad_id,
                                       packing=cfg.packing, seed=cfg.seed)
        self.val_items: list[TokenizedExample] = []
        if cfg.eval_split and has_split(cfg.data, cfg.eval_split):
            self.val_items = encode_examples(load_split(cfg.data, cfg.eval_split), self.tokenizer, cfg.seq_len,
                                             cfg.template, soft)
        elif cfg.eval_split and cfg.eval_split != FinetuneConfig.eval_split:  # asked for by name: a typo?
            raise ValueError(f"eval_split={cfg.eval_split!r}: {cfg.data} has no such split; name one it holds "
                             f"(a {cfg.eval_split}.jsonl beside train.jsonl), or set eval_split=null")
        elif cfg.eval_split:
            self._log(f"{cfg.data} has no {cfg.eval_split!r} split: training without a held-out evaluation")
        if cfg.epochs is not None:
            steps = max(1, math.ceil(cfg.epochs * len(self.batches) / cfg.grad_accum))
            self.cfg = dataclasses.replace(cfg, max_steps=steps)
        self.n_train = len(train)

    def _batch(self, step: int, micro: int):
        x, y, seqs, n = self.batches.get(step * self.cfg.grad_accum + micro)
        seqs = seqs.to(self.device) if seqs is not None else None
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), seqs, n

    # -- model --------------------------------------------------------------------------------
    def _build_model(self, resume_from: Path | None) -> torch.nn.Module:
        """The base model, all of it trainable (full) or frozen with the PEFT method added (fresh:
        a resumed run then loads the trained values in ``_restore_weights``)."""
        cfg = self.cfg
        model = load_model(self.base_ckpt, device=self.device).train()
        self.model_cfg = model.config
        if cfg.method == "full":
            return model.requires_grad_(True)
        options = dict(cfg.method_options)
        if "init_text" in options and cfg.method in VIRTUAL_TOKEN_METHODS:  # text-initialised
            options["tokenizer"] = self.tokenizer
        peft.apply(model, cfg.method, **options)
        virtual = getattr(model, "virtual_tokens", 0)
        if cfg.seq_len + virtual > model.config.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} + {virtual} virtual tokens of method={cfg.method} exceed the base "
                             f"model's max_seq_len={model.config.max_seq_len}; set seq_len={model.config.max_seq_len - virtual}")
        return model

    def _saved_model_config(self, ckpt: Path) -> dict[str, Any]:
        """The base model's config (an adapter checkpoint records it in finetune.json)."""
        return read_finetune_info(ckpt)["base_config"] if is_adapter_checkpoint(ckpt) else read_config(ckpt).to_dict()

    def _restore_weights(self, ckpt: Path) -> None:
        method = self.cfg.method
        if is_adapter_checkpoint(ckpt) != (method != "full"):
            raise ValueError(f"{ckpt} is not a method={method} checkpoint; resume with the run's own method")
        if method == "full":
            return super()._restore_weights(ckpt)
        params = dict(self.model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        file = ckpt / TRAINABLE_FILE
        names = set(open_safetensors(file).keys())
        if names != trainable:
            raise ValueError(f"{file} does not hold this run's trained parameters (method_options changed?); "
                             f"start a new out_dir")
        copy_tensors_into({n: params[n] for n in trainable}, {n: (file, n) for n in trainable})

    def _describe(self) -> str:
        cfg = self.cfg
        n_train = self.model.num_params(trainable_only=True)
        return (f"finetune ({cfg.method}) of {self.base_ckpt}: {n_train:,} of {self.model.num_params():,} params "
                f"trainable | {self.n_train} examples in {len(self.batches)} batches/epoch "
                f"({'packed' if cfg.packing else 'padded'}) | {cfg.max_steps} steps | {cfg.precision} on {self.device}")

    def _plot_title(self) -> str:
        return f"{self.cfg.method} finetune on {self.cfg.data}"

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_tokens: int = 0) -> dict[str, float]:
        """Mean loss (nats/token) over the response tokens of the held-out split (padded batches
        in file order; ``max_tokens`` > 0 stops after about that many response tokens)."""
        if not self.val_items:
            return {}
        self.model.eval()
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        n_tok = 0
        for i in range(0, len(self.val_items), self.cfg.batch_size):
            x, y = pad_batch(self.val_items[i : i + self.cfg.batch_size], self.pad_id)
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x)
            n = int((y != IGNORE_INDEX).sum())
            nats += causal_lm_loss(logits, y).double() * n
            n_tok += n
            if max_tokens and n_tok >= max_tokens:
                break
        self.model.train()
        return {"val_loss": (nats / max(n_tok, 1)).item(), "val_tokens": n_tok}

    # -- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        cfg = self.cfg
        state = {"tokens_seen": self.tokens_seen, "elapsed": self.elapsed, "train_config": cfg.to_dict()}

        def write_model(folder: Path) -> None:
            if cfg.method == "full":
                save_model_dir(self.model, folder)
            else:
                peft.save_adapter(self.model, folder / "adapter")
                write_finetune_info(folder, method=cfg.method, options=cfg.method_options, base=self.base_ckpt)
                trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
                save_safetensors(trained, folder / TRAINABLE_FILE, metadata={"format": "pt"})

        return save_checkpoint(
            self.out, self.model, step=self.step, trainer_state=state, optimizer=self.optimizer, scaler=self.scaler,
            tokenizer_file=self.base_ckpt / "tokenizer.json", keep_last=cfg.keep_last, write_model=write_model,
        )
