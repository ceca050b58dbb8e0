"""Shared by the bench scripts: run metadata (device, date, commit) and the docs/benchmarks.md updater."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from lmstack.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The measured tree's commit: LMSTACK_COMMIT for a copy without .git (a lent GPU machine)."""
    if os.environ.get("LMSTACK_COMMIT"):
        return os.environ["LMSTACK_COMMIT"]
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        return git.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def meta() -> dict:
    import transformers

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "")()  # AVX2, AVX512, ...
    cpu += f", {isa}" if isa and isa != "DEFAULT" else ""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu} ({torch.get_num_threads()} threads)"
    return {"date": datetime.date.today().isoformat(), "commit": commit(), "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def publish(name: str, results: dict, table: str, *, docs: bool = True, echo: bool = True) -> None:
    """Write bench/results/<name>.json, put ``table`` in docs/benchmarks.md's <name> section
    (unless ``docs`` is False) and print it (unless ``echo`` is False)."""
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    if docs:
        update_docs(name, table)
    if echo:
        print(table)


def update_docs(section: str, body: str) -> None:
    """Replace the block between `<!-- section -->` markers in docs/benchmarks.md (append if new)."""
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        i = text.index(start)
        j = text.find(end, i)
        if j < 0:
            raise ValueError(f"{path}: {start} has no {end} after it; restore the end marker (or remove the "
                             f"section) and rerun")
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    atomic_write_text(path, text)


def hf_twin(model: lmstack.Transformer):
    """The HF model (Llama, Qwen2 or Mistral, as ``to_hf`` names it) with the same architecture and
    weights, built as ``from_pretrained(dtype=...)`` builds it: RoPE's frequencies stay float32 in a
    bf16 model (``.to(bf16)`` would round them, and HF's outputs with them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmstack.interop.hf import config_to_hf

    p = next(model.parameters())
    settings = config_to_hf(model.config, p.dtype)
    hc = AutoConfig.for_model(settings.pop("model_type"), **settings, bos_token_id=None, eos_token_id=None,
                              pad_token_id=None)
    with torch.device(p.device):  # built where the weights live (fast init on a GPU)
        hf = AutoModelForCausalLM.from_config(hc, dtype=p.dtype)
    sd = {("model." + k if k != "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=True)  # every weight, or an error (a dropped q/k/v bias would be silent)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = None
    return hf
