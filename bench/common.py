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
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    atomic_write_text(path, text)


def hf_twin(model: lmstack.Transformer):
    """An HF LlamaForCausalLM with the same architecture and the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hc = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, intermediate_size=c.ffn_dim, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    p = next(model.parameters())
    with torch.device(p.device):  # built where the weights live (fast init on a GPU)
        hf = LlamaForCausalLM(hc).to(dtype=p.dtype)
    sd = {("model." + k if k != "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=False)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = None
    return hf
