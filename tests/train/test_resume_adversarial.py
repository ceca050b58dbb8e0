"""Adversarial review of training robustness: exact resume after crashes and Ctrl-C, checkpoint
safety when a save is interrupted, resume with a changed configuration, and bad input to
`lmstack train` / `lmstack finetune`.

The reference for "exact resume" is the uninterrupted run (same per-step losses, same fp32
weights bit for bit); the reference for bad input is the project's contract: one clear line, exit
code 2, nothing written.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import lmstack
from lmstack import ModelConfig, Transformer
from lmstack.cli import main
from lmstack.train import Finetuner, Trainer, load_checkpoint, save_checkpoint
from lmstack.train import checkpoint as ckpt_mod
from lmstack.train import trainer as trainer_mod

SMALL = dict(max_steps=8, save_every=3, eval_every=4, eval_tokens=64, seq_len=16, batch_size=2)
CLI_TINY = ["model_overrides.dim=32", "model_overrides.n_layers=1", "model_overrides.n_heads=2",
            "model_overrides.n_kv_heads=1", "model_overrides.ffn_dim=64", "seq_len=16", "batch_size=2",
            "max_steps=2", "eval_tokens=32", "log_every=1", "device=cpu"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A prepared dataset with a short validation split (final evaluations use all of it)."""
    from lmstack.data import prepare_text

    from .conftest import synthetic_plays

    root = tmp_path_factory.mktemp("small_corpus")
    paths = synthetic_plays(root, {"alpha": 200, "beta": 200, "gamma": 40}, speakers=("HAM.", "KING."))
    return prepare_text(paths, name="small", home=root / "home", vocab_size=300, val_files=["gamma"],
                        log=lambda s: None)


@pytest.fixture
def train_cfg(small_dataset, tmp_path):
    """The conftest fixture's shape, on the small dataset."""
    from lmstack.train import TrainConfig

    def make(**kw):
        base = dict(model="tiny", model_overrides=dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64),
                    data=str(small_dataset), out_dir=str(tmp_path / "run"), lr=3e-3, warmup_steps=3, log_every=1,
                    device="cpu", **SMALL)
        base.update(kw)
        return TrainConfig(**base)

    return make


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """loss.png costs a second per run and plays no part in resume."""
    monkeypatch.setattr(Trainer, "plot", lambda self: None)


pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(Exception):
    """A simulated process death in the middle of training."""


def losses(trainer):
    return {r["step"]: r["loss"] for r in trainer.read_metrics() if "loss" in r}


def assert_same_run(a, b):
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, a.cfg.max_steps + 1))
    assert la == lb, {s: (la[s], lb.get(s)) for s in la if la[s] != lb.get(s)}
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def die_at(trainer, step, how="crash"):
    """Make ``trainer`` die before optimizer step ``step`` ("crash") or get Ctrl-C after it ("sigint")."""
    real = trainer._optimizer_step

    def wrapped(s):
        if how == "crash" and s == step:
            raise Crash
        out = real(s)
        if how == "sigint" and s == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer._optimizer_step = wrapped


def run_interrupted(cls, cfg, step, how):
    t = cls(cfg, progress=False)
    die_at(t, step, how)
    try:
        t.train()
    except Crash:
        pass
    r = cls(cfg, resume=True, progress=False)
    r.train()
    return r


# ---- exact resume (these pass today: kept as guards) -------------------------------------------
@pytest.mark.parametrize(
    "opts, step, how",
    [
        (dict(precision="fp32", grad_accum=3, warmup_steps=3, min_lr=0.0), 4, "crash"),  # right after a save
        (dict(precision="bf16", doc_mask=True, grad_accum=2), 5, "crash"),  # at the last step
        (dict(precision="fp16", grad_accum=2, grad_clip=0.5), 4, "sigint"),  # Ctrl-C mid-run, mid-accumulation
        (dict(precision="fp32", doc_mask=True, warmup_steps=0, grad_clip=0.0), 2, "sigint"),  # Ctrl-C on a save step
    ],
)
def test_resume_after_crash_or_ctrl_c_replays_the_straight_run(train_cfg, tmp_path, seed, opts, step, how):
    kw = dict(seed=seed % 2**31, max_steps=6, **opts)
    straight = Trainer(train_cfg(out_dir=str(tmp_path / "a"), **kw), progress=False)
    straight.train()
    resumed = run_interrupted(Trainer, train_cfg(out_dir=str(tmp_path / "b"), **kw), step, how)
    assert_same_run(straight, resumed)


def test_fp16_resume_is_exact_while_the_scaler_is_skipping_steps(train_cfg, tmp_path, seed, monkeypatch):
    """A large initial scale overflows the first steps (then it alternates skip / grow); the scaler's scale and growth tracker must
    survive the checkpoint so the resumed run skips and grows exactly as the straight one."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(trainer_mod.torch.amp, "GradScaler",
                        lambda device: real(device, init_scale=2.0**22, growth_interval=1))
    kw = dict(seed=seed % 2**31, precision="fp16")
    straight = Trainer(train_cfg(out_dir=str(tmp_path / "a"), **kw), progress=False)
    straight.train()
    assert straight.scaler.get_scale() < 2.0**22  # overflowing steps were skipped and the scale lowered
    resumed = run_interrupted(Trainer, train_cfg(out_dir=str(tmp_path / "b"), **kw), 4, "crash")
    assert resumed.scaler.get_scale() == straight.scaler.get_scale()
    assert_same_run(straight, resumed)


@pytest.mark.parametrize("method, options", [("full", {}), ("lora", {"r": 4, "alpha": 8, "dropout": 0.2})])
def test_finetune_resume_replays_the_straight_run(ft_cfg, tmp_path, seed, method, options):
    """Full and LoRA (with dropout: the global RNG must be restored too) fine-tunes, crashed
    right after a checkpoint, across an epoch boundary."""
    kw = dict(method=method, method_options=options, max_steps=6, save_every=3, grad_accum=2, seed=seed % 2**31)
    straight = Finetuner(ft_cfg(out_dir=str(tmp_path / "a"), **kw), progress=False)
    straight.train()
    resumed = run_interrupted(Finetuner, ft_cfg(out_dir=str(tmp_path / "b"), **kw), 4, "crash")
    assert_same_run(straight, resumed)


def test_ctrl_c_during_a_checkpoint_write_keeps_the_last_one_and_resumes_exactly(train_cfg, tmp_path, seed,
                                                                              monkeypatch):
    """The second Ctrl-C raises KeyboardInterrupt wherever the process is: here inside torch.save
    of the step-6 checkpoint. step_000003 must stay the one that loads, and resume must be exact."""
    kw = dict(seed=seed % 2**31)
    straight = Trainer(train_cfg(out_dir=str(tmp_path / "a"), **kw), progress=False)
    straight.train()
    real_save = torch.save

    def interrupted_save(obj, f, *a, **k):
        if "step_000006" in str(f) or ".step_000006" in str(Path(f).parent.name):
            with open(f, "wb") as fh:
                fh.write(b"half a file")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted_save)
    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        Trainer(train_cfg(out_dir=str(run), **kw), progress=False).train()
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert (run / "checkpoint").resolve().name == "step_000003"
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    load_checkpoint(run)
    resumed = Trainer(train_cfg(out_dir=str(run), **kw), resume=True, progress=False)
    assert resumed.step == 3
    resumed.train()
    assert_same_run(straight, resumed)


# ---- bugs: interruption safety ---------------------------------------------------------------
def test_resuming_a_finished_run_leaves_its_checkpoint_alone(train_cfg, tmp_path):
    """`--resume` on a finished run used to evaluate and save the same step again, replacing the
    live checkpoint folder (a kill in between could leave the `checkpoint` link pointing at nothing).
    It now trains nothing and writes nothing."""
    cfg = train_cfg(**dict(max_steps=3))
    Trainer(cfg, progress=False).train()
    run = Path(cfg.out_dir)
    weights = run / "checkpoint" / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    r = Trainer(cfg, resume=True, progress=False)
    assert r.train()["step"] == 3  # the run's last evaluation
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before
    model, _ = load_checkpoint(run)
    assert isinstance(model, lmstack.Transformer)


def test_replacing_a_folder_never_leaves_it_missing(tmp_path, monkeypatch):
    """atomic_dir swaps the new folder in with one atomic rename (renameat2 RENAME_EXCHANGE). It used
    to move the old folder aside and then the new one in: an interrupt between the two renames left
    no folder at all."""
    import lmstack.io as lio

    final = tmp_path / "step_000003"
    final.mkdir()
    (final / "w").write_text("old")
    real = lio.os.replace

    def replace(src, dst):
        if Path(dst) == final:  # the rename that would bring the new folder in
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(lio.os, "replace", replace)
    with lio.atomic_dir(final) as tmp:
        (tmp / "w").write_text("new")
    assert (final / "w").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["step_000003"]  # and no leftover


def test_resuming_a_finished_run_changes_nothing(train_cfg, tmp_path):
    """Resuming a run that already reached max_steps should not append a second final
    evaluation at the same step to metrics.jsonl (info/plots then show it twice)."""
    cfg = train_cfg(**dict(max_steps=3))
    t = Trainer(cfg, progress=False)
    t.train()
    before = (Path(cfg.out_dir) / "metrics.jsonl").read_text()
    r = Trainer(cfg, resume=True, progress=False)
    r.train()
    assert r.step == 3
    assert (Path(cfg.out_dir) / "metrics.jsonl").read_text() == before


def test_pruning_keeps_the_newest_checkpoints_past_a_million_steps(tmp_path):
    """keep_last sorts folder names as strings: step_1000500 < step_999000, so past step 999999
    the newer checkpoint is deleted and the older ones kept."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16))
    for step in (999_000, 999_999, 1_000_500, 1_001_000):
        save_checkpoint(tmp_path, model, step=step, keep_last=2)
    kept = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").iterdir())
    assert kept == [1_000_500, 1_001_000]


def test_a_torn_metrics_line_does_not_block_resume(train_cfg, tmp_path):
    """A crash (power loss, disk full) while appending to metrics.jsonl leaves half a line;
    `--resume` then dies in _trim_metrics with a bare JSONDecodeError instead of resuming."""
    cfg = train_cfg(**dict(max_steps=4))
    t = Trainer(cfg, progress=False)
    t.train(until=3)
    with open(Path(cfg.out_dir) / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1')  # the record of step 4, cut by the crash
    r = Trainer(cfg, resume=True, progress=False)
    assert r.step == 3
    r.train()
    assert sorted(losses(r)) == [1, 2, 3, 4]


# ---- bugs: resume with a changed configuration --------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(rope_theta=500.0),  # same tensor shapes, different model
        dict(n_heads=8, n_kv_heads=4),  # head_dim 8 -> 4: every projection keeps its shape
    ],
)
def test_resume_with_a_different_architecture_is_refused(train_cfg, tmp_path, overrides):
    model = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    Trainer(train_cfg(model_overrides=model, **dict(max_steps=4)), progress=False).train(until=3)
    changed = train_cfg(model_overrides={**model, **overrides}, **dict(max_steps=4))
    name = next(iter(overrides))
    with pytest.raises(ValueError, match=name):
        Trainer(changed, resume=True, progress=False)


@pytest.mark.parametrize("option, value", [("batch_size", 3), ("seed", 1), ("seq_len", 8), ("grad_accum", 2)])
def test_resume_with_different_data_or_batching_is_refused(train_cfg, option, value):
    """The checkpoint records the run's train_config; resuming with another batch size, data
    seed, sequence length or accumulation silently trains a different run under the same name."""
    Trainer(train_cfg(), progress=False).train(until=3)
    with pytest.raises(ValueError, match=option):
        Trainer(train_cfg(**{option: value}), resume=True, progress=False)


def test_finetune_resume_with_another_base_model_is_refused(ft_cfg, tiny_dataset, tmp_path):
    """A LoRA resume loads the adapter onto whatever `base` now says; the checkpoint's
    finetune.json records the base it was trained on (and its config) but is not consulted."""
    kw = dict(method="lora", method_options={"r": 4}, max_steps=6, save_every=3)
    Finetuner(ft_cfg(**kw), progress=False).train(until=3)
    torch.manual_seed(123)
    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                      rope_theta=1000.0)
    other = tmp_path / "other_base"
    save_checkpoint(other, Transformer(cfg), step=0, tokenizer_file=tiny_dataset / "tokenizer.json")
    with pytest.raises(ValueError, match="base"):
        Finetuner(ft_cfg(base=str(other / "checkpoint"), **kw), resume=True, progress=False)


def test_finetune_resume_with_another_lora_alpha_is_refused(ft_cfg):
    """alpha (the LoRA scale) changes nothing's shape, so the trainable-tensor check passes and
    the adapter silently continues at another scale."""
    Finetuner(ft_cfg(method="lora", method_options={"r": 4, "alpha": 8}, max_steps=6, save_every=3),
              progress=False).train(until=3)
    with pytest.raises(ValueError, match="alpha|method_options"):
        Finetuner(ft_cfg(method="lora", method_options={"r": 4, "alpha": 64}, max_steps=6, save_every=3),
                  resume=True, progress=False)


def test_a_fresh_run_into_a_used_out_dir_does_not_mix_the_runs(train_cfg):
    """Forgetting --resume: the new run appends to the old run's metrics.jsonl (plots, `info`
    and last_eval then mix two runs) and keeps the old run's checkpoints beside its own. It should
    refuse (pointing at --resume) or start clean."""
    Trainer(train_cfg(**dict(max_steps=6)), progress=False).train()
    try:
        t = Trainer(train_cfg(**dict(max_steps=4, seed=7)), progress=False)
        t.train()
    except ValueError as e:
        assert "resume" in str(e)
        return
    steps = [r["step"] for r in t.read_metrics() if "loss" in r]
    assert steps == [1, 2, 3, 4]
    names = sorted(p.name for p in (Path(t.cfg.out_dir) / "checkpoints").iterdir())
    assert names == ["step_000003", "step_000004"]


# ---- bugs: bad input to the CLI: one line, exit 2, nothing written ---------------------------------
def run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_train_out_dir_that_is_a_file(small_dataset, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    rc, err = run_cli(["train", "--quiet", *CLI_TINY, f"data={small_dataset}", f"out_dir={out}"], capsys)
    assert rc == 2 and "out_dir" in err and len(err.splitlines()) == 1
    assert out.read_text() == "keep me"


def test_finetune_out_dir_that_is_a_file(base_ckpt, task_dir, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    rc, err = run_cli(["finetune", "--quiet", "--method", "full", "--base", str(base_ckpt), "--data", str(task_dir),
                       "--out", str(out), "max_steps=1", "seq_len=48", "template=plain"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and str(out) in err


@pytest.mark.parametrize("option", ["out_dir=", "data="])
def test_empty_path_override_is_a_usage_error(small_dataset, tmp_path, capsys, option, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--quiet", *CLI_TINY, f"data={small_dataset}", f"out_dir={tmp_path / 'run'}", option]
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and option.rstrip("=") in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("option, field", [("seed=1.5", "seed"), ("model_overrides=5", "model_overrides"),
                                           ("weight_decay=-0.1", "weight_decay")])
def test_wrongly_typed_or_invalid_values_are_usage_errors(small_dataset, tmp_path, capsys, option, field):
    """seed=1.5 dies with a torch RuntimeError traceback after creating out_dir;
    model_overrides=5 with a TypeError; weight_decay<0 trains with anti-decay (torch.optim.AdamW
    itself rejects weight_decay < 0, but per-group values bypass its check)."""
    run = tmp_path / "run"
    rc, err = run_cli(["train", "--quiet", *CLI_TINY, f"data={small_dataset}", f"out_dir={run}", option], capsys)
    assert rc == 2 and field in err and len(err.splitlines()) == 1
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_train_on_a_missing_or_misspelt_device_is_a_usage_error(small_dataset, tmp_path, capsys, device):
    """`eval`/`generate` check --device (cli.resolve_device); `train device=cuda` on a CPU machine
    dies with torch's AssertionError traceback, `device=gpu` with a RuntimeError."""
    rc, err = run_cli(["train", "--quiet", *CLI_TINY, f"data={small_dataset}", f"out_dir={tmp_path / 'r'}",
                       f"device={device}"], capsys)
    assert rc == 2 and "device" in err and len(err.splitlines()) == 1


def test_validation_split_shorter_than_one_window_is_a_clear_error_before_training(tmp_path, capsys):
    """The val split holds fewer than seq_len + 1 tokens: today the whole run trains, then the
    final evaluation divides by zero (ZeroDivisionError traceback) and no checkpoint is saved."""
    from lmstack.data import prepare_text

    (tmp_path / "a.txt").write_text("thou art the king of my heart and I shall not die\n" * 40)
    (tmp_path / "b.txt").write_text("lord\nnight\n")
    ds = prepare_text([tmp_path / "a.txt", tmp_path / "b.txt"], name="small", home=tmp_path / "home",
                      vocab_size=260, val_files=["b"], log=lambda s: None)
    run = tmp_path / "run"
    rc, err = run_cli(["train", "--quiet", *CLI_TINY, f"data={ds}", f"out_dir={run}"], capsys)
    assert rc == 2 and "seq_len" in err and len(err.splitlines()) == 1
    assert not run.exists()


def test_train_split_shorter_than_one_window_writes_nothing(small_dataset, tmp_path, capsys):
    """The message is clear, but it comes from the first batch, after out_dir,
    train_config.json and metrics.jsonl were created."""
    run = tmp_path / "run"
    rc, err = run_cli(["train", "--quiet", *CLI_TINY, f"data={small_dataset}", f"out_dir={run}",
                       "seq_len=1000000", "model_overrides.max_seq_len=1000000"], capsys)
    assert rc == 2 and "seq_len" in err and len(err.splitlines()) == 1
    assert not run.exists()


def test_overrides_on_both_sides_of_a_flag_are_accepted(small_dataset, tmp_path, capsys):
    """`lmstack train max_steps=2 --quiet lr=1e-3`: argparse's nargs='*' positional takes only the
    first run of key=value words, so the rest is rejected as 'unrecognized arguments: lr=1e-3'
    (a two-line argparse error) although it is a valid override."""
    run = tmp_path / "run"
    rc = main(["train", *CLI_TINY, f"data={small_dataset}", "--quiet", f"out_dir={run}", "max_steps=1"])
    capsys.readouterr()
    assert rc == 0
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 1


def test_ctrl_c_of_lmstack_train_exits_non_zero(small_dataset, tmp_path, capsys, monkeypatch):
    """Ctrl-C saves a checkpoint and stops early; the command then exits 0 and prints the last
    evaluation as a finished run does, so `lmstack train ... && lmstack eval ...` carries on with a
    half-trained model. Interrupted commands conventionally exit 130 (as `main` does for a
    KeyboardInterrupt)."""
    real = Trainer._optimizer_step

    def step_then_ctrl_c(self, step):
        out = real(self, step)
        if step == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_ctrl_c)
    run = tmp_path / "run"
    rc = main(["train", "--quiet", *CLI_TINY, f"data={small_dataset}", f"out_dir={run}", "max_steps=3"])
    capsys.readouterr()
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 1  # saved, resumable
    assert rc != 0


def test_a_run_that_died_before_its_first_checkpoint_starts_again_clean(train_cfg):
    """No checkpoint to resume (--resume refuses), so a plain start must be allowed, and the dead
    run's metrics records must not mix into the new run's."""
    cfg = train_cfg(**dict(max_steps=4, save_every=100))
    t = Trainer(cfg, progress=False)
    die_at(t, 2)
    with pytest.raises(Crash):
        t.train()
    assert not (Path(cfg.out_dir) / "checkpoint").exists() and sorted(losses(t)) == [1, 2]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(cfg, resume=True, progress=False)
    again = Trainer(train_cfg(**dict(max_steps=3, save_every=100, seed=5)), progress=False)
    again.train()
    assert sorted(losses(again)) == [1, 2, 3]
    assert [r["step"] for r in again.read_metrics() if "loss" in r] == [1, 2, 3]
