"""Shared by the bench scripts: run metadata (device, date, commit) and the docs/benchmarks.md updater."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def meta() -> dict:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu} ({torch.get_num_threads()} threads)"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


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
    path.write_text(text)
