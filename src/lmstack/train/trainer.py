"""The pretraining loop: AdamW, warmup + cosine schedule, gradient accumulation, norm clipping,
mixed precision (bf16 autocast, or fp16 autocast with a dynamic loss scaler), periodic evaluation
in bits per byte, atomic checkpoints with exact resume, and a clean stop on Ctrl-C or divergence.

Exact resume rests on one rule: nothing random depends on history. The batch for micro-step
``(step, i)`` is drawn from a generator seeded by ``(seed, step, i)``, evaluation windows are
fixed, and the optimizer/scaler/RNG states are saved with the weights; so 10 steps + resume + 10
steps replays 20 straight steps bit for bit.

The loop is shared with fine-tuning (``lmstack.train.finetune.Finetuner``): a subclass supplies
the data (``_setup_data``, ``_batch`` returning inputs, targets with -100 where no loss, optional
``Seqs`` and the real token count), the model (``_build_model``: e.g. a base checkpoint with PEFT
modules), evaluation and checkpoint writing; only parameters with ``requires_grad`` are optimised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig, check_types, dataclass_from_dict, resolve_device
from ..data.corpus import TokenDataset, load_dataset
from ..data.instruct import IGNORE_INDEX
from ..data.packing import doc_seqs, get_windows, sample_batch
from ..io import atomic_write_json, atomic_write_text, read_jsonl_records
from ..kernels import Seqs
from ..model import Transformer
from .checkpoint import load_training_state, load_weights, read_config, resolve_checkpoint, save_checkpoint
from .objectives import causal_lm_loss, upcast

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """One training job. Every field can be set in a recipe YAML or as ``key=value`` on the CLI."""

    model: str = "tiny"  # a ModelConfig preset name
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {n_layers: 4}
    data: str = "shakespeare"  # a prepared dataset name (under $LMSTACK_HOME/data) or its directory
    out_dir: str = "runs/shakespeare-tiny"
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr: float | None = None  # cosine floor; None -> lr / 10
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "fp32"
    doc_mask: bool = False  # packed documents do not attend to each other, positions restart
    eval_every: int = 100
    eval_tokens: int = 65536  # validation tokens per periodic eval (0 = all); the final eval uses all
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    time_limit: float | None = None  # seconds of training after which the run stops, evaluates, saves
    seed: int = 1337
    compile: bool = False  # torch.compile the training forward/backward
    device: str = "auto"

    def __post_init__(self) -> None:
        check_types(self, "training option")
        for name in ("model", "data", "out_dir", "device"):
            if not getattr(self, name):
                raise ValueError(f"training option {name} is empty; give it a value")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported; valid: {', '.join(PRECISIONS)}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, lr={self.lr}] (null = lr / 10)")
        for name in ("weight_decay", "grad_clip", "eval_tokens", "keep_last"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit={self.time_limit} must be > 0 seconds (null = none)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, d, "training option")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def stream_seed(*parts: int) -> int:
    """A generator seed for the draw named by ``parts`` (seed, step, micro-batch ...): distinct
    tuples give unrelated seeds (numpy's SeedSequence hashes the whole tuple; a negative seed is
    taken modulo 2**64)."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) >> 1  # a Python int shift: numpy < 2 has no uint64 >> int64


class TrainingDiverged(RuntimeError):
    pass


class Trainer:
    # What makes a run this run: a resume must keep them (checked against the checkpoint's
    # train_config and model config); optimizer settings may change, and are reported
    RUN_FIELDS = ("model", "model_overrides", "data", "seq_len", "batch_size", "grad_accum", "seed", "doc_mask")
    TUNABLE_FIELDS = ("lr", "min_lr", "warmup_steps", "max_steps", "weight_decay", "beta1", "beta2", "grad_clip",
                      "precision")
    MODEL_LABEL = "model"

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        dataset: TokenDataset | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.out_dir)
        if any(p.exists() and not p.is_dir() for p in (self.out, *self.out.parents)):
            raise ValueError(f"out_dir {self.out} is (inside) a file, not a folder; pass a folder for the run")
        if not resume and (self.out / "checkpoint").exists():
            raise ValueError(f"out_dir {self.out} holds a run already; continue it with --resume, or pass another "
                             f"out_dir")
        self.device = torch.device(resolve_device(cfg.device, "device"))
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self._setup_data(dataset)
        resume_from = None
        if resume:
            try:
                resume_from = resolve_checkpoint(self.out, adapters=True)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"--resume: no checkpoint in {self.out}; start without --resume or point out_dir at a run"
                ) from None
        torch.manual_seed(self.cfg.seed)
        self.model = self._build_model(resume_from).to(self.device)
        self.optimizer = self._optimizer()
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        )
        if resume_from is not None:
            self._restore(resume_from)
        self.train_step_fn = torch.compile(self._loss) if cfg.compile else self._loss
        self._stop_requested = False

    # -- setup (the hooks a fine-tuning subclass replaces) -----------------------------------------
    def _setup_data(self, dataset: TokenDataset | None) -> None:
        self.data = dataset if dataset is not None else load_dataset(self.cfg.data)
        for split, tokens in (("train", self.data.train), ("validation", self.data.val)):
            if len(tokens) < self.cfg.seq_len + 1:
                raise ValueError(f"the {split} split of {self.data.dir} holds {len(tokens)} tokens, fewer than one "
                                 f"window of seq_len + 1 = {self.cfg.seq_len + 1}; lower seq_len")
        self.token_bytes = torch.from_numpy(self.data.tokenizer().token_bytes().astype(np.int64)).to(self.device)
        self.eos_id = self.data.eos_id

    def _build_model(self, resume_from: Path | None) -> torch.nn.Module:
        """A freshly initialised model (the caller seeds the RNG; ``_restore`` loads weights)."""
        self.model_cfg = self._model_config()
        return Transformer(self.model_cfg)

    def _model_config(self) -> ModelConfig:
        cfg = self.cfg
        overrides = dict(cfg.model_overrides)
        vocab = self.data.vocab_size
        if "vocab_size" in overrides and overrides["vocab_size"] < vocab:
            raise ValueError(f"model vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {vocab}")
        overrides.setdefault("vocab_size", vocab)
        overrides.setdefault("max_seq_len", max(cfg.seq_len, ModelConfig.from_preset(cfg.model).max_seq_len))
        mcfg = ModelConfig.from_preset(cfg.model, **overrides)
        if mcfg.max_seq_len < cfg.seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
        return mcfg

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates: those with ``requires_grad`` (all, in pretraining)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _optimizer(self) -> torch.optim.Optimizer:
        params = self.trainable()
        if not params:
            raise ValueError("the model has no parameter with requires_grad=True; nothing to train")
        decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings
        no_decay = [p for p in params if p.dim() < 2]  # norm gains, biases
        groups = [{"params": ps, **hp} for ps, hp in zip((decay, no_decay), self._group_settings())]
        kw = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=self.cfg.lr, eps=1e-8, **kw)

    def _group_settings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """AdamW settings of the two parameter groups (decayed, not decayed), from the config: at the
        start, and again after a resume loads the optimizer state (which holds the old ones)."""
        betas = (self.cfg.beta1, self.cfg.beta2)
        return {"weight_decay": self.cfg.weight_decay, "betas": betas}, {"weight_decay": 0.0, "betas": betas}

    def _restore_weights(self, ckpt: Path) -> None:
        load_weights(self.model, ckpt / "model.safetensors")

    def _saved_model_config(self, ckpt: Path) -> dict[str, Any]:
        """The model config the checkpoint was trained with."""
        return read_config(ckpt).to_dict()

    def _check_same_run(self, ckpt: Path, state: dict[str, Any]) -> None:
        """Refuse to resume with settings that make it another run (model, data, batching, seed):
        it would continue under the same name as something the checkpoint never was."""
        saved = state.get("train_config") or {}
        now = self.cfg.to_dict()
        changed = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in self.RUN_FIELDS if k in saved and saved[k] != now[k]]
        was, model = self._saved_model_config(ckpt), self.model_cfg.to_dict()
        changed += [f"{self.MODEL_LABEL} {k}={was[k]!r} (now {model.get(k)!r})" for k in was if was[k] != model.get(k)]
        if changed:
            raise ValueError(f"--resume: {ckpt} was trained with {', '.join(changed)}; resume with the run's own "
                             f"settings, or start a new run in another out_dir")
        for k in self.TUNABLE_FIELDS:
            if k in saved and saved[k] != now[k]:
                self._log(f"resuming with {k} changed from {saved[k]!r} to {now[k]!r}")

    def _restore(self, ckpt: Path) -> None:
        state, opt = load_training_state(ckpt)
        self._check_same_run(ckpt, state)
        self._restore_weights(ckpt)
        self.step, self.tokens_seen = state["step"], state.get("tokens_seen", 0)
        self.elapsed = state.get("elapsed", 0.0)
        if "optimizer" in opt:
            self.optimizer.load_state_dict(opt["optimizer"])
            for group, settings in zip(self.optimizer.param_groups, self._group_settings()):
                group.update(settings)  # the settings this resume reports as changed take effect
        if self.scaler is not None and "scaler" in opt:
            self.scaler.load_state_dict(opt["scaler"])
        if "rng_cpu" in opt:
            torch.set_rng_state(opt["rng_cpu"])
        if "rng_cuda" in opt and torch.cuda.is_available():  # CUDA draws (dropout) continue as in one run
            torch.cuda.set_rng_state_all(opt["rng_cuda"][: torch.cuda.device_count()])
        self._trim_metrics(self.step)
        self._log(f"resumed from {ckpt} at step {self.step}")

    # -- the loop -----------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, Seqs | None, int]:
        """Micro-batch ``micro`` of optimizer step ``step``: inputs (B, T), targets (B, T) (-100 =
        no loss), packed-document ``Seqs`` or None, and the number of real (non-padding) tokens."""
        g = torch.Generator().manual_seed(stream_seed(self.cfg.seed, step, micro))
        x, y = sample_batch(self.data.train, self.cfg.batch_size, self.cfg.seq_len, g)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None, x.numel()

    def _loss(self, x: torch.Tensor, y: torch.Tensor, seqs: Seqs | None = None) -> torch.Tensor:
        if seqs is None and self.cfg.doc_mask:
            seqs = doc_seqs(x, self.eos_id)
        with self._autocast():
            logits = self.model(x, seqs=seqs)
        return causal_lm_loss(logits, y)

    def train(self, until: int | None = None) -> dict[str, Any]:
        """Run to ``max_steps`` (or to step ``until``); returns the last evaluation."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        until = cfg.max_steps if until is None else min(until, cfg.max_steps)
        if self.step >= until and (self.out / "checkpoint").exists():  # resumed a finished run: nothing to do
            self._log(f"{self.out} is at step {self.step} already (max_steps={cfg.max_steps}); nothing to train")
            return next((r for r in reversed(self.read_metrics()) if "val_loss" in r), {})
        self.out.mkdir(parents=True, exist_ok=True)
        if self.step == 0:  # a run that died before its first checkpoint left records nothing will resume
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_json(self.out / "train_config.json", cfg.to_dict())
        self._log(self._describe())
        old_handler = self._install_sigint()
        bar = tqdm(total=until, initial=self.step, unit="step", dynamic_ncols=True, disable=not self.progress)
        last_eval: dict[str, Any] = {}
        skipped_in_a_row = 0
        t_window, tok_window = time.perf_counter(), 0
        try:
            while self.step < until:
                t0 = time.perf_counter()
                loss, step_tokens = self._optimizer_step(self.step)
                dt = time.perf_counter() - t0
                self.elapsed += dt
                loss_val = loss.item()
                if not math.isfinite(loss_val):
                    if self.scaler is None:
                        self._diverged(loss_val)
                    skipped_in_a_row += 1  # fp16: the scaler skipped this step and lowers the scale
                    if skipped_in_a_row > 20:
                        self._diverged(loss_val)
                else:
                    skipped_in_a_row = 0
                self.step += 1
                self.tokens_seen += step_tokens
                tok_window += step_tokens
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == until:
                    now = time.perf_counter()
                    tps = tok_window / max(now - t_window, 1e-9)
                    t_window, tok_window = now, 0
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    self._metric({"step": self.step, "loss": loss_val, "lr": lr, "tokens": self.tokens_seen,
                                  "tok_per_s": tps, "elapsed": self.elapsed})
                out_of_time = cfg.time_limit is not None and self.elapsed >= cfg.time_limit
                done = self.step >= until or out_of_time or self._stop_requested
                if self.step % cfg.eval_every == 0 and not done:
                    last_eval = self._eval_and_log(cfg.eval_tokens, bar)
                if done:
                    if out_of_time:
                        self._log(f"time limit {cfg.time_limit:.0f}s reached at step {self.step}")
                    break
                if self.step % cfg.save_every == 0:
                    self.save()
            bar.close()
            if self._stop_requested:
                path = self.save()
                self._log(f"interrupted at step {self.step}: checkpoint saved to {path}; continue with --resume")
                return last_eval
            last_eval = self._eval_and_log(0 if self.step >= cfg.max_steps or cfg.time_limit else cfg.eval_tokens, None)
            self.save()
            self.plot()
            return last_eval
        finally:
            bar.close()
            signal.signal(signal.SIGINT, old_handler)

    @property
    def stopped_early(self) -> bool:
        """Whether the last ``train()`` stopped at a Ctrl-C (after saving a checkpoint to resume from)."""
        return self._stop_requested

    def _describe(self) -> str:
        cfg = self.cfg
        return (f"model {cfg.model}: {self.model.num_params() / 1e6:.2f}M params | "
                f"{cfg.batch_size * cfg.seq_len * cfg.grad_accum} tokens/step | {cfg.max_steps} steps | "
                f"{cfg.precision} on {self.device}")

    def _optimizer_step(self, step: int) -> tuple[torch.Tensor, int]:
        """One optimizer step; returns the (accumulated) loss and the real tokens it trained on."""
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = torch.zeros((), device=self.device)
        n_tokens = 0
        # The step's loss is the mean over all its trained targets, as one big batch's would be: each
        # micro-batch's mean counts by its share of them (fine-tuning micro-batches hold different
        # numbers of response tokens; a plain 1 / grad_accum would over-weight the short ones).
        batches = [self._batch(step, micro) for micro in range(cfg.grad_accum)]
        counts = [(y != IGNORE_INDEX).sum() for _, y, _, _ in batches]  # device tensors: no sync here
        all_targets = torch.stack(counts).sum().clamp(min=1)
        for (x, y, seqs, n), count in zip(batches, counts):
            mean = self.train_step_fn(x, y) if seqs is None else self.train_step_fn(x, y, seqs)
            share = count.to(mean.dtype) / all_targets.to(mean.dtype)  # in the loss's precision (fp64 runs)
            loss = torch.where(count > 0, mean, 0.0) * share  # (no targets: mean is nan)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total = total + loss.detach()
            n_tokens += n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the gradients hold inf/nan
            self.scaler.update()
        elif torch.isfinite(total):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, n_tokens

    def _diverged(self, loss_val: float) -> None:
        latest = self.out / "checkpoint"
        where = f"the last good checkpoint is {latest.resolve()}" if latest.exists() else "no checkpoint was saved yet"
        self._metric({"step": self.step, "diverged": str(loss_val)})
        raise TrainingDiverged(
            f"loss became {loss_val} at step {self.step}; stopped without saving this state ({where}). "
            "Lower lr, raise warmup_steps or use precision=bf16/fp32, then train again or --resume."
        )

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_tokens: int = 0) -> dict[str, float]:
        """Validation loss (nats/token) and bits per byte over fixed windows of the held-out split.

        Bits per byte = total nats over the targets that are text (not EOS) / ln 2 / their UTF-8
        bytes: comparable across tokenizers, unlike loss per token.
        """
        cfg, val = self.cfg, self.data.val
        T = cfg.seq_len
        n_windows = (len(val) - 1) // T
        if max_tokens:
            n_windows = min(n_windows, max(1, max_tokens // T))
        # Spread the windows evenly over the split so a partial eval sees every play.
        stride = ((len(val) - 1) // T) / n_windows
        starts = [int(i * stride) * T for i in range(n_windows)]
        self.model.eval()
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        text_nats = torch.zeros((), dtype=torch.float64, device=self.device)
        n_bytes = torch.zeros((), dtype=torch.int64, device=self.device)
        n_tok = 0
        for i in range(0, n_windows, cfg.batch_size):
            x, y = get_windows(val, starts[i : i + cfg.batch_size], T)
            x, y = x.to(self.device), y.to(self.device)
            seqs = doc_seqs(x, self.eos_id) if cfg.doc_mask else None
            with self._autocast():
                logits = self.model(x, seqs=seqs)
            nll = F.cross_entropy(upcast(logits).flatten(0, 1), y.flatten(), reduction="none")
            b = self.token_bytes[y.flatten()]
            nats += nll.sum().double()
            text_nats += (nll * (b > 0)).sum().double()
            n_bytes += b.sum()
            n_tok += y.numel()
        self.model.train()
        return {
            "val_loss": (nats / n_tok).item(),
            "val_bpb": (text_nats / math.log(2) / n_bytes.clamp(min=1)).item(),
            "val_tokens": n_tok,
        }

    def _eval_and_log(self, max_tokens: int, bar) -> dict[str, Any]:
        r = self.evaluate(max_tokens)
        if not r:  # nothing held out to evaluate on
            return r
        r["step"] = self.step
        self._metric(r)
        msg = f"step {self.step}: val loss {r['val_loss']:.4f}"
        if "val_bpb" in r:
            msg += f" | val bits/byte {r['val_bpb']:.4f}"
        msg += f" ({r['val_tokens']} tokens)"
        if bar is not None:
            bar.write(msg)
        else:
            self._log(msg)
        return r

    # -- checkpoints, metrics, plots ---------------------------------------------------------------
    def save(self) -> Path:
        state = {"tokens_seen": self.tokens_seen, "elapsed": self.elapsed, "train_config": self.cfg.to_dict()}
        return save_checkpoint(
            self.out, self.model, step=self.step, trainer_state=state, optimizer=self.optimizer,
            scaler=self.scaler, tokenizer_file=self.data.dir / "tokenizer.json", keep_last=self.cfg.keep_last,
        )

    def _metric(self, rec: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """On resume, forget records written after the checkpoint (they will be replayed), and any
        line a crash cut short."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = [json.dumps(r) for r in self.read_metrics() if r.get("step", 0) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records, oldest first (a line a crash cut short is skipped)."""
        return read_jsonl_records(self.out / "metrics.jsonl")

    def plot(self) -> Path | None:
        """loss.png: training loss and validation bits per byte against step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = self.read_metrics()
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val_key, val_label = ("val_bpb", "validation bits per byte") if any("val_bpb" in r for r in recs) else \
            ("val_loss", "validation loss (nats/token)")
        val = [(r["step"], r[val_key]) for r in recs if val_key in r]
        if not train:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*train), label="train loss (nats/token)", color="tab:blue")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token)")
        if val:
            ax2 = ax.twinx()
            ax2.plot(*zip(*val), "o-", label=val_label.replace("validation", "val"), color="tab:orange")
            ax2.set_ylabel(val_label)
        ax.set_title(self._plot_title())
        fig.legend(loc="upper right")
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _plot_title(self) -> str:
        return f"{self.cfg.model} on {self.cfg.data}"

    # -- signals ------------------------------------------------------------------------------
    def _install_sigint(self):
        def handler(signum, frame):
            if self._stop_requested:  # second Ctrl-C: stop now (the last checkpoint stays intact)
                raise KeyboardInterrupt
            self._stop_requested = True
            self._log("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort)")

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            return signal.getsignal(signal.SIGINT)

    def _log(self, msg: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(msg)
