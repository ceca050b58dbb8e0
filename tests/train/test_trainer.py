import json
import math
import os
import signal

import pytest
import torch

import lmstack
from lmstack.train import Trainer, TrainingDiverged, load_checkpoint, lr_at
from lmstack.train import checkpoint as ckpt_mod


def losses(trainer):
    return {r["step"]: r["loss"] for r in trainer.read_metrics() if "loss" in r}


def test_exact_resume(train_cfg, tmp_path):
    straight = Trainer(train_cfg(out_dir=str(tmp_path / "a")), progress=False)
    straight.train()
    first = Trainer(train_cfg(out_dir=str(tmp_path / "b")), progress=False)
    first.train(until=10)
    assert first.step == 10
    resumed = Trainer(train_cfg(out_dir=str(tmp_path / "b")), resume=True, progress=False)
    assert resumed.step == 10
    resumed.train()
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert a == b  # bit-for-bit the same losses
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_training_reduces_loss_and_writes_artifacts(train_cfg, tmp_path):
    t = Trainer(train_cfg(max_steps=30), progress=False)
    result = t.train()
    recs = t.read_metrics()
    train_losses = [r["loss"] for r in recs if "loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0
    assert result["val_bpb"] > 0 and math.isfinite(result["val_loss"])
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 1000
    ck = run / "checkpoint"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt"):
        assert (ck / f).is_file(), f
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 30
    # optimizer state loads with weights_only=True (no pickled code)
    torch.load(ck / "optimizer.pt", weights_only=True)
    model, tok = load_checkpoint(run)
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), t.model.eval()(x))
    assert tok.decode(tok.encode("thou art the king")) == "thou art the king"


def test_bits_per_byte_matches_definition(train_cfg):
    t = Trainer(train_cfg(), progress=False)
    r = t.evaluate()  # all val windows
    tb = t.token_bytes
    T = t.cfg.seq_len
    val = torch.from_numpy(t.data.val.astype("int64"))
    n = (len(val) - 1) // T
    x = val[: n * T].view(n, T)
    y = val[1 : n * T + 1].view(n, T)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(t.model(x).flatten(0, 1), y.flatten(), reduction="none").double()
    b = tb[y.flatten()]
    expect = (nll * (b > 0)).sum() / math.log(2) / b.sum()
    assert abs(r["val_bpb"] - expect.item()) < 1e-6
    assert abs(r["val_loss"] - nll.mean().item()) < 1e-6


def test_interrupted_save_keeps_last_good_checkpoint(train_cfg, tmp_path, monkeypatch):
    t = Trainer(train_cfg(max_steps=6, save_every=3), progress=False)
    t.train(until=3)
    t.save()
    good = (tmp_path / "run" / "checkpoint").resolve()
    t.step = 4

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "save_safetensors", crash)
    with pytest.raises(OSError, match="simulated"):
        t.save()
    assert (tmp_path / "run" / "checkpoint").resolve() == good
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    model, _ = load_checkpoint(tmp_path / "run")
    assert isinstance(model, lmstack.Transformer)


def test_nan_loss_stops_with_step_named_and_keeps_checkpoint(train_cfg, tmp_path, monkeypatch):
    t = Trainer(train_cfg(max_steps=12, save_every=4), progress=False)
    real = t._optimizer_step

    def poisoned(step):
        if step == 6:
            with torch.no_grad():
                t.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        return real(step)

    monkeypatch.setattr(t, "_optimizer_step", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 6.*step_000004"):
        t.train()
    assert (tmp_path / "run" / "checkpoint").resolve().name == "step_000004"
    model, _ = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_scaler_skips_bad_steps(train_cfg):
    t = Trainer(train_cfg(precision="fp16", max_steps=4), progress=False)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflow on the first steps
    before = [p.detach().clone() for p in t.model.parameters()]
    t._optimizer_step(0)
    assert t.scaler.get_scale() < 2.0**40  # the step was skipped and the scale lowered
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_ctrl_c_saves_and_exits_cleanly(train_cfg, tmp_path, monkeypatch):
    t = Trainer(train_cfg(max_steps=50, save_every=100), progress=False)
    real = t._optimizer_step

    def step_then_interrupt(step):
        out = real(step)
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(t, "_optimizer_step", step_then_interrupt)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup
    t.train()
    assert t.step == 7
    assert (tmp_path / "run" / "checkpoint").resolve().name == "step_000007"
    assert signal.getsignal(signal.SIGINT) is before  # the trainer put the caller's handler back


def test_lr_schedule(train_cfg):
    cfg = train_cfg(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_doc_mask_training_runs(train_cfg):
    t = Trainer(train_cfg(doc_mask=True, max_steps=3), progress=False)
    assert math.isfinite(t.train()["val_loss"])


@pytest.mark.parametrize("what", ["truncated", "corrupt", "missing"])
def test_bad_safetensors_give_clear_errors(train_cfg, tmp_path, what):
    t = Trainer(train_cfg(max_steps=1), progress=False)
    path = t.save() / "model.safetensors"
    data = path.read_bytes()
    if what == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif what == "corrupt":
        path.write_bytes(b"\xff" * 64 + data[64:])
    else:
        path.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match="model.safetensors"):
        load_checkpoint(tmp_path / "run")


def test_missing_corpus_and_bad_options(train_cfg):
    with pytest.raises(Exception, match="not found.*lmstack prepare"):
        Trainer(train_cfg(data="no-such-dataset"), progress=False)
    with pytest.raises(ValueError, match="precision='fp8'"):
        train_cfg(precision="fp8")
    with pytest.raises(ValueError, match="seq_len=512 exceeds the model's max_seq_len=256"):
        Trainer(train_cfg(seq_len=512, model_overrides=dict(dim=32, n_layers=1, n_heads=4, max_seq_len=256)),
                progress=False)
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        Trainer(train_cfg(), resume=True, progress=False)
