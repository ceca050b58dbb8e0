"""End to end through the command line: prepare -> train -> info -> generate, and bad usage."""

import json
from pathlib import Path

import pytest

from lmstack.cli import build_train_config, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_loads():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for r in recipes:
        cfg = build_train_config(str(r), [])
        assert cfg.max_steps > 0


def test_overrides_are_typed():
    cfg = build_train_config(str(ROOT / "recipes" / "shakespeare-tiny.yaml"),
                             ["lr=1e-3", "max_steps=7", "model_overrides.n_layers=2", "doc_mask=true"])
    assert cfg.lr == 0.001 and cfg.max_steps == 7 and cfg.model_overrides == {"n_layers": 2} and cfg.doc_mask


def test_end_to_end(tmp_path, capsys):
    text = tmp_path / "play.txt"
    text.write_text("\n".join(f"LORD.\nWhat news, my lord, of battle number {i}?\n" for i in range(400)))
    assert main(["prepare", "text", str(text), "--name", "play", "--vocab-size", "300"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--recipe", str(ROOT / "recipes" / "shakespeare-tiny.yaml"), "data=play",
                 f"out_dir={run}", "max_steps=4", "seq_len=32", "batch_size=2", "eval_tokens=64", "time_limit=null",
                 "model_overrides.dim=32", "model_overrides.n_layers=1", "model_overrides.n_heads=2",
                 "model_overrides.n_kv_heads=1"]) == 0
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(run)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 4 and info["config"]["dim"] == 32 and "model.safetensors" in info["files"]
    assert main(["generate", "--checkpoint", str(run), "--prompt", "LORD.\\n", "--max-new-tokens", "5",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("LORD.\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--recipe", "missing.yaml"], "recipe missing.yaml not found"),
        (["train", "--recipe", str(ROOT / "recipes" / "shakespeare-tiny.yaml"), "bogus=1"], "unknown training option"),
        (["train", "--recipe", str(ROOT / "recipes" / "shakespeare-tiny.yaml"), "lr=fast"], "lr='fast' must be of type float"),
        (["train", "--recipe", str(ROOT / "recipes" / "shakespeare-tiny.yaml")], "run `lmstack prepare shakespeare`"),
        (["generate", "--checkpoint", "/nonexistent", "--prompt", "x"], "no lmstack checkpoint at /nonexistent"),
        (["prepare", "text", "/nonexistent.txt"], "nonexistent.txt"),
    ],
)
def test_bad_usage_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_over_long_prompt_is_a_clear_error(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello there.\n" * 300)
    assert main(["prepare", "text", str(text), "--name", "t", "--vocab-size", "260"]) == 0
    run = tmp_path / "r"
    assert main(["train", "--quiet", "--recipe", str(ROOT / "recipes" / "shakespeare-tiny.yaml"), "data=t", f"out_dir={run}",
          "max_steps=1", "seq_len=16", "batch_size=1", "eval_tokens=16", "model_overrides.max_seq_len=16",
          "model_overrides.dim=16", "model_overrides.n_layers=1", "model_overrides.n_heads=2",
                 "model_overrides.n_kv_heads=1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "hello world " * 20]) == 2
    assert "max_seq_len" in capsys.readouterr().err
