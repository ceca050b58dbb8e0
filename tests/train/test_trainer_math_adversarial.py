"""Adversarial review of the training math: the Trainer / Finetuner against a from-scratch float64
loop written with plain PyTorch (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_), the LR
schedule as documented (linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at
``max_steps``; the cosine part checked against transformers' scheduler) and hand-computed
evaluations.

The reference never calls the trainer's loss, optimizer or schedule: it takes the same initial
weights (a deep copy, float64), the same data (the windows / examples of each micro-batch, replayed
from the trainer's sampler and checked to be genuine windows of the split), treats the
``grad_accum`` micro-batches of a step as ONE big batch (the token mean over all of the step's
trained targets), builds AdamW's parameter groups from the documented rule (weight decay on
matrices and embeddings, none on norm gains and biases), clips the global norm over the
trainable parameters (a tied embedding counted once), and compares per-step loss, LR, tokens and
the final weights in float64.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.data.corpus import TokenDataset, load_dataset
from lmstack.data.instruct import IGNORE_INDEX, encode_example, load_split
from lmstack.train import Finetuner, Trainer, TrainConfig, lr_at
from lmstack.train.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """loss.png costs a second per run and plays no part in the math."""
    monkeypatch.setattr(Trainer, "plot", lambda self: None)


# ---- references -----------------------------------------------------------------------------------
def hf_cosine_lr(step: int, *, lr: float, min_lr: float | None, warmup: int, max_steps: int) -> float:
    """The documented schedule. Decay: transformers' cosine-with-min-lr schedule at the same step.
    Warmup: linear, reaching ``lr`` at the last warmup step, so step s (0-based) trains with
    lr * (s + 1) / warmup (never with lr 0; transformers' lambda at s + 1)."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    min_lr = lr / 10 if min_lr is None else min_lr
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, max_steps, min_lr=min_lr)
    at = step + 1 if step < warmup else min(step, max_steps)
    return sched.lr_lambdas[0](at) * lr


def decay_groups(model: nn.Module, trainable: list[nn.Parameter]):
    """Documented rule: weight decay on matrices (Linear weights, LoRA A/B) and embeddings, none on
    norm gains and biases. Built from module types, not from tensor shapes."""
    want = {id(p) for p in trainable}
    decay, seen = [], set()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and id(m.weight) in want and id(m.weight) not in seen:
            decay.append(m.weight)
            seen.add(id(m.weight))
    no_decay = []
    for p in trainable:
        if id(p) not in seen:
            no_decay.append(p)
            seen.add(id(p))
    return decay, no_decay


def unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    out, seen = [], set()
    for p in model.parameters():  # (already deduplicated by torch; kept explicit)
        if p.requires_grad and id(p) not in seen:
            out.append(p)
            seen.add(id(p))
    return out


def reference_adamw(model, cfg):
    decay, no_decay = decay_groups(model, unique_trainable(model))
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def global_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))


def assert_weights_close(got: nn.Module, want: nn.Module, rtol=1e-9, atol=1e-12):
    sg, sw = got.state_dict(), want.state_dict()
    assert sg.keys() == sw.keys()
    for name in sw:
        torch.testing.assert_close(sg[name], sw[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def losses(t):
    return {r["step"]: r for r in t.read_metrics() if "loss" in r}


def first_parting(got: list[float], want: list[float], rel=1e-10) -> int | None:
    for i, (a, b) in enumerate(zip(got, want)):
        if not abs(a - b) <= rel * max(abs(b), 1e-300):
            return i
    return None


# ---- pretraining ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_val(tiny_dataset):
    """The tiny dataset with a shorter validation split (the final eval reads all of it)."""
    base = load_dataset(tiny_dataset)
    return TokenDataset(dir=base.dir, meta=dict(base.meta), train=base.train, val=np.asarray(base.val[: 16 * 9 + 5]))


def pretrainer(tiny_dataset, tmp_path, data, **kw):
    base = dict(model="tiny", model_overrides=dict(TINY), data=str(tiny_dataset), out_dir=str(tmp_path / "run"),
                seq_len=16, batch_size=2, max_steps=8, lr=3e-3, warmup_steps=3, eval_every=1000, eval_tokens=0,
                save_every=1000, log_every=1, device="cpu")
    overrides = kw.pop("model_overrides", {})
    base["model_overrides"] = {**base["model_overrides"], **overrides}
    base.update(kw)
    t = Trainer(TrainConfig(**base), dataset=data, progress=False)
    t.model.double()  # the optimizer holds the same Parameter objects (converted in place)
    return t


def assert_genuine_windows(train: np.ndarray, x: torch.Tensor, y: torch.Tensor):
    """Each row is inputs/targets of one window of seq_len + 1 consecutive training tokens."""
    T = x.shape[1]
    win = np.lib.stride_tricks.sliding_window_view(np.asarray(train, dtype=np.int64), T + 1)
    for xr, yr in zip(x.tolist(), y.tolist()):
        row = np.array([xr[0]] + yr)
        assert xr[1:] == yr[:-1]
        assert (win == row).all(1).any(), "a training row is not a window of the train split"


PRETRAIN_CASES = {
    # name: options
    "plain": dict(grad_clip=0.0, weight_decay=0.1),
    "accum3-clipped-untied": dict(grad_accum=3, grad_clip=0.05, weight_decay=0.2, beta1=0.8, beta2=0.9,
                                  warmup_steps=0, min_lr=0.0, model_overrides=dict(tie_embeddings=False)),
    "accum2-clipped-tied-bias": dict(grad_accum=2, grad_clip=0.1, weight_decay=0.3, warmup_steps=2, min_lr=3e-4,
                                     model_overrides=dict(qkv_bias=True)),
    "warmup-longer-than-run": dict(grad_accum=2, grad_clip=1.0, warmup_steps=12),
}


@pytest.mark.parametrize("case", list(PRETRAIN_CASES))
def test_pretraining_trajectory_equals_a_float64_reference_loop(tiny_dataset, short_val, tmp_path, seed, case):
    opts = dict(PRETRAIN_CASES[case])
    t = pretrainer(tiny_dataset, tmp_path, short_val, seed=seed % 100_000, **opts)
    cfg = t.cfg
    assert t.model.config.tie_embeddings == opts.get("model_overrides", {}).get("tie_embeddings", True)
    ref = copy.deepcopy(t.model)  # the same init, float64
    t.train()
    recs = losses(t)
    assert sorted(recs) == list(range(1, cfg.max_steps + 1))

    opt = reference_adamw(ref, cfg)
    params = unique_trainable(ref)
    want_loss, want_lr, norms = [], [], []
    for step in range(cfg.max_steps):
        lr = hf_cosine_lr(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [t._batch(step, m)[:2] for m in range(cfg.grad_accum)]
        for x, y in micro:
            assert_genuine_windows(t.data.train, x, y)
        x = torch.cat([x for x, _ in micro])  # grad_accum x batch_size rows: ONE batch of k*b
        y = torch.cat([y for _, y in micro])
        loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
        loss.backward()
        norms.append(global_norm(params))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        want_loss.append(loss.item())
        want_lr.append(lr)
    if cfg.grad_clip > 0 and case != "warmup-longer-than-run":
        assert max(norms) > cfg.grad_clip  # clipping really acted in this case
    got_loss = [recs[s + 1]["loss"] for s in range(cfg.max_steps)]
    got_lr = [recs[s + 1]["lr"] for s in range(cfg.max_steps)]
    part = first_parting(got_lr, want_lr, 1e-12)
    assert part is None, f"LR parts at step {part}: {got_lr} vs {want_lr}"
    part = first_parting(got_loss, want_loss, 1e-10)
    assert part is None, f"loss parts at step {part}: trainer {got_loss[part]} vs reference {want_loss[part]}"
    assert [recs[s + 1]["tokens"] for s in range(cfg.max_steps)] == \
        [(s + 1) * cfg.grad_accum * cfg.batch_size * cfg.seq_len for s in range(cfg.max_steps)]
    assert_weights_close(t.model, ref)


def test_optimizer_groups_follow_the_documented_weight_decay_rule(tiny_dataset, short_val, tmp_path):
    t = pretrainer(tiny_dataset, tmp_path, short_val, weight_decay=0.25, beta1=0.7, beta2=0.85,
                   model_overrides=dict(qkv_bias=True))
    opt = t.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = decay_groups(t.model, unique_trainable(t.model))
    by_wd = {}
    for g in opt.param_groups:
        assert g["betas"] == (0.7, 0.85) and g["eps"] == 1e-8
        by_wd.setdefault(g["weight_decay"], set()).update(id(p) for p in g["params"])
    assert by_wd.get(0.25) == {id(p) for p in decay}
    assert by_wd.get(0.0) == {id(p) for p in no_decay}
    names = {id(p): n for n, p in t.model.named_parameters()}
    assert any(names[id(p)].endswith("q_proj.bias") for p in no_decay)  # biases: no decay
    assert any(names[id(p)].endswith("layernorm.weight") for p in no_decay)  # norm gains: no decay
    assert any(names[id(p)] == "embed_tokens.weight" for p in decay)  # embeddings: decay
    # the tied LM head is the embedding: one tensor, in the optimizer once
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(t.model.parameters()))


@pytest.mark.parametrize("warmup, max_steps, min_lr", [(0, 7, None), (4, 9, 0.0), (5, 5, 1e-4), (9, 4, None),
                                                        (1, 2, 2e-3)])
def test_lr_schedule_equals_the_documented_rule(train_cfg, warmup, max_steps, min_lr):
    cfg = train_cfg(lr=3e-3, min_lr=min_lr, warmup_steps=warmup, max_steps=max_steps)
    got = [lr_at(s, cfg) for s in range(max_steps + 1)]
    want = [hf_cosine_lr(s, lr=3e-3, min_lr=min_lr, warmup=warmup, max_steps=max_steps) for s in range(max_steps + 1)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[0] > 0  # step 0 never trains with lr 0
    assert max(got) <= 3e-3 * (1 + 1e-12)
    floor = 3e-3 / 10 if min_lr is None else min_lr
    if warmup < max_steps:
        assert got[max_steps] == pytest.approx(floor, rel=1e-12, abs=1e-18)


def test_fp16_clipping_acts_on_the_unscaled_accumulated_gradient(tiny_dataset, short_val, tmp_path, seed):
    """fp16: the loss is scaled for backward; clip_grad_norm_ must see the unscaled gradient of the
    whole step (after all micro-batches), so the update's gradient has global norm grad_clip."""
    clip = 0.05
    t = Trainer(TrainConfig(model="tiny", model_overrides=dict(TINY), data=str(tiny_dataset),
                            out_dir=str(tmp_path / "run"), seq_len=16, batch_size=2, grad_accum=2, max_steps=4,
                            precision="fp16", grad_clip=clip, seed=seed % 100_000, device="cpu"),
                dataset=short_val, progress=False)
    ref = copy.deepcopy(t.model)
    params = t.trainable()
    seen = {}

    def fake_step(*a, **k):
        seen["g"] = [p.grad.detach().clone() for p in params]

    t.optimizer.step = fake_step  # GradScaler.step calls optimizer.step when the gradients are finite
    t._optimizer_step(0)
    assert "g" in seen, "the scaler skipped the step (inf/nan gradients) at the default scale"
    got = seen["g"]
    got_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in got))
    # reference: fp32, no autocast, no scaler, one batch of both micro-batches, clipped by hand
    micro = [t._batch(0, m)[:2] for m in range(2)]
    x, y = torch.cat([a for a, _ in micro]), torch.cat([b for _, b in micro])
    rparams = unique_trainable(ref)
    F.cross_entropy(ref(x).flatten(0, 1), y.flatten()).backward()
    pre = global_norm(rparams)
    assert pre > clip * 2
    torch.nn.utils.clip_grad_norm_(rparams, clip)
    assert got_norm == pytest.approx(clip, rel=1e-3), f"norm at the update {got_norm}, pre-clip norm {pre}"
    g1 = torch.cat([g.flatten().double() for g in got])
    g2 = torch.cat([p.grad.flatten().double() for p in rparams])
    assert F.cosine_similarity(g1, g2, dim=0) > 0.995


# ---- evaluation -----------------------------------------------------------------------------------
def token_bytes_by_decoding(tokenizer_file) -> dict:
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tokenizer_file))
    cache = {}

    def nbytes(i: int) -> int:
        if i not in cache:
            cache[i] = len(hf.decode([i], skip_special_tokens=True).encode("utf-8"))
        return cache[i]

    return nbytes


@pytest.mark.parametrize("eval_tokens", [0, 16 * 4 + 7, 5, 16 * 1000])
def test_val_loss_and_bpb_equal_a_hand_computation(tiny_dataset, short_val, tmp_path, seed, eval_tokens):
    T = 16
    t = pretrainer(tiny_dataset, tmp_path, short_val, seed=seed % 100_000)
    val = np.asarray(t.data.val, dtype=np.int64)
    total = (len(val) - 1) // T
    n = total if eval_tokens == 0 else min(total, max(1, eval_tokens // T))
    # n of the split's aligned windows, spread evenly (window i*total/n, rounded down)
    idx = [(i * total) // n for i in range(n)]
    assert len(set(idx)) == n and idx[-1] < total
    nbytes = token_bytes_by_decoding(tiny_dataset / "tokenizer.json")
    nats = text_nats = 0.0
    n_bytes = 0
    with torch.no_grad():
        for w in idx:
            chunk = torch.from_numpy(val[w * T : w * T + T + 1])
            logp = torch.log_softmax(t.model(chunk[None, :-1])[0], -1)
            for pos, target in enumerate(chunk[1:].tolist()):
                nll = -float(logp[pos, target])
                nats += nll
                b = nbytes(target)
                n_bytes += b
                if b:
                    text_nats += nll
    assert n_bytes > 0
    got = t.evaluate(eval_tokens)
    assert got["val_tokens"] == n * T
    assert got["val_loss"] == pytest.approx(nats / (n * T), rel=1e-10)
    assert got["val_bpb"] == pytest.approx(text_nats / math.log(2) / n_bytes, rel=1e-10)


# ---- fine-tuning ------------------------------------------------------------------------------------
def micro_items(ft: Finetuner, k: int):
    """The TokenizedExamples of micro-batch k, row by row (the sampler's rows and epoch order)."""
    b = ft.batches
    epoch, i = divmod(k, len(b))
    order = b._epoch_order(epoch)[i * b.batch_size : (i + 1) * b.batch_size]
    return [[b.items[j] for j in b.rows[r]] for r in order]


def example_nll_sum(model, item) -> tuple[torch.Tensor, int]:
    """Summed NLL over the response targets of one example run alone (no padding, no packing)."""
    logits = model(torch.tensor([item.ids[:-1]]))[0]
    labels = torch.tensor(item.labels[1:])
    keep = labels != IGNORE_INDEX
    assert keep.any()
    return F.cross_entropy(logits[keep], labels[keep], reduction="sum"), int(keep.sum())


FT_CASES = {
    # ragged, padded rows; the epoch's last batch is smaller (48 examples, batch 5); 7 steps x 2 micro
    # crosses an epoch boundary
    "full-padded-accum2": dict(method="full", packing=False, batch_size=5, grad_accum=2, grad_clip=0.2,
                               weight_decay=0.1, max_steps=7),
    "lora-padded-accum3": dict(method="lora", method_options=dict(r=4, alpha=8, target_modules="all-linear"),
                               packing=False, batch_size=3, grad_accum=3, grad_clip=0.05, weight_decay=0.2,
                               max_steps=5, lr=1e-2),
    "lora-packed-accum2": dict(method="lora", method_options=dict(r=2, alpha=4), packing=True, batch_size=2,
                               grad_accum=2, grad_clip=0.0, weight_decay=0.1, max_steps=5, lr=1e-2,
                               warmup_steps=0),
}


@pytest.mark.parametrize("case", list(FT_CASES))
def test_finetune_trajectory_equals_a_float64_reference_loop(ft_cfg, base_ckpt, seed, case):
    opts = dict(FT_CASES[case])
    ft = Finetuner(ft_cfg(device="cpu", eval_every=1000, save_every=1000, seed=seed % 100_000, **opts), progress=False)
    ft.model.double()
    cfg = ft.cfg
    params = ft.trainable()
    if cfg.method != "full":  # only the adapter is optimised
        from lmstack import peft

        in_opt = {id(p) for g in ft.optimizer.param_groups for p in g["params"]}
        assert in_opt == {id(p) for p in peft.adapter_parameters(ft.model)} == {id(p) for p in params}
    ref = copy.deepcopy(ft.model)
    ft.train()
    recs = losses(ft)

    opt = reference_adamw(ref, cfg)
    rparams = unique_trainable(ref)
    want_loss, want_lr, want_tokens, counts, tokens = [], [], [], [], 0
    for step in range(cfg.max_steps):
        lr = hf_cosine_lr(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        total, n = 0.0, 0
        per_micro = []
        for m in range(cfg.grad_accum):
            items = [it for row in micro_items(ft, step * cfg.grad_accum + m) for it in row]
            c = 0
            for it in items:
                s, k = example_nll_sum(ref, it)
                total, c = total + s, c + k
                tokens += it.n_inputs
            per_micro.append(c)
            n += c
        counts.append(per_micro)
        loss = total / n  # the token mean over every response target of the optimizer step
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(rparams, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        want_loss.append(loss.item())
        want_lr.append(lr)
        want_tokens.append(tokens)
    assert any(len(set(c)) > 1 for c in counts)  # micro-batches hold different numbers of targets
    got_loss = [recs[s + 1]["loss"] for s in range(cfg.max_steps)]
    part = first_parting([recs[s + 1]["lr"] for s in range(cfg.max_steps)], want_lr, 1e-12)
    assert part is None, f"LR parts at step {part}"
    part = first_parting(got_loss, want_loss, 1e-9)
    assert part is None, (f"loss parts at step {part}: trainer {got_loss[part]} vs reference {want_loss[part]} "
                          f"(targets per micro-batch {counts[part]})")
    assert [recs[s + 1]["tokens"] for s in range(cfg.max_steps)] == want_tokens
    assert_weights_close(ft.model, ref, rtol=1e-8, atol=1e-11)
    if cfg.method != "full":  # frozen base weights: bit for bit the base checkpoint's
        base = load_model(base_ckpt).double()
        trained = {n.replace(".base_layer", ""): p for n, p in ft.model.state_dict().items()}
        for name, w in base.state_dict().items():
            assert torch.equal(trained[name], w), name


@pytest.mark.parametrize("method, options", [("full", {}), ("lora", dict(r=4, alpha=8, target_modules="all-linear")),
                                             ("prompt", dict(num_virtual_tokens=2))])
def test_finetune_eval_loss_equals_masked_cross_entropy_per_example(ft_cfg, task_dir, method, options, seed):
    ft = Finetuner(ft_cfg(method=method, method_options=options, batch_size=5, device="cpu"), progress=False)
    ft.model.double()
    with torch.no_grad():  # move the adapter off its init so it takes part in the loss
        for p in ft.trainable():
            p.add_(torch.randn_like(p) * 0.05)
    examples = load_split(task_dir, "test")
    soft = ft.cfg.soft_ids()
    items = [encode_example(ex, ft.tokenizer, "plain", soft) for ex in examples]
    got = ft.evaluate()
    total, n = 0.0, 0
    with torch.no_grad():
        for it in items:
            s, k = example_nll_sum(ft.model, it)
            total, n = total + float(s), n + k
    assert got["val_tokens"] == n
    assert got["val_loss"] == pytest.approx(total / n, rel=1e-10)
    # partial eval: whole batches in file order until at least max_tokens response tokens
    limit = n // 3
    part = ft.evaluate(limit)
    seen, total2 = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(items), ft.cfg.batch_size):
            for it in items[i : i + ft.cfg.batch_size]:
                s, k = example_nll_sum(ft.model, it)
                total2, seen = total2 + float(s), seen + k
            if seen >= limit:
                break
    assert part["val_tokens"] == seen
    assert part["val_loss"] == pytest.approx(total2 / seen, rel=1e-10)


# ---- optimizer and RNG state across resume ----------------------------------------------------------
def run_cfg(tiny_dataset, tmp_path, **kw) -> TrainConfig:
    base = dict(model="tiny", model_overrides=dict(TINY), data=str(tiny_dataset), out_dir=str(tmp_path / "run"),
                seq_len=16, batch_size=2, max_steps=6, lr=3e-3, warmup_steps=2, eval_every=1000, eval_tokens=16,
                save_every=1000, log_every=1, device="cpu", weight_decay=0.1, beta1=0.9, beta2=0.95)
    base.update(kw)
    return TrainConfig(**base)


def test_a_resumed_run_optimises_with_the_changed_settings_it_reports(tiny_dataset, short_val, tmp_path, monkeypatch,
                                                                      seed):
    """Resume may change the optimizer settings (TUNABLE_FIELDS) and reports each change; AdamW must
    then use the new weight_decay and betas with the saved moments, as a user rebuilding
    torch.optim.AdamW(new settings) + load of the moments would. optimizer.load_state_dict restores
    the *saved* hyperparameters over the new ones unless they are put back."""
    first = Trainer(run_cfg(tiny_dataset, tmp_path, seed=seed % 100_000), dataset=short_val, progress=False)
    first.train(until=3)
    logged = []
    monkeypatch.setattr(Trainer, "_log", lambda self, msg: logged.append(msg))
    new = dict(weight_decay=0.5, beta1=0.8, beta2=0.99)
    t = Trainer(run_cfg(tiny_dataset, tmp_path, seed=seed % 100_000, **new), resume=True, dataset=short_val,
                progress=False)
    assert t.step == 3
    for k in new:
        assert any(f"resuming with {k} changed" in m for m in logged), (k, logged)
    # the reference: AdamW built with the new settings, the saved moments loaded into it
    ref_model = copy.deepcopy(t.model)
    ref = reference_adamw(ref_model, t.cfg)
    saved = torch.load(tmp_path / "run" / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]
    ref.load_state_dict(saved)
    for g, wd in zip(ref.param_groups, (0.5, 0.0)):
        g["weight_decay"], g["betas"] = wd, (0.8, 0.99)
    got = [(g["weight_decay"], tuple(g["betas"])) for g in t.optimizer.param_groups]
    want = [(g["weight_decay"], tuple(g["betas"])) for g in ref.param_groups]
    assert got == want, f"resumed optimizer groups (weight_decay, betas): {got}, configured: {want}"
    # and the next step's update is the reference's
    t.train(until=4)
    x, y = t._batch(3, 0)[:2]
    for g in ref.param_groups:
        g["lr"] = lr_at(3, t.cfg)
    F.cross_entropy(ref_model(x).flatten(0, 1), y.flatten()).backward()
    torch.nn.utils.clip_grad_norm_(unique_trainable(ref_model), t.cfg.grad_clip)
    ref.step()
    assert_weights_close(t.model, ref_model, rtol=1e-5, atol=1e-7)


def test_a_resumed_run_reports_a_changed_max_steps(tiny_dataset, short_val, tmp_path, monkeypatch):
    """max_steps fixes the cosine schedule of every step: resuming step 3 of 6 with max_steps=12
    trains the next steps at another LR than the run did (lr_at(3) goes from ~0.55 lr to ~0.93 lr).
    Allowed (extending a run is common), but like the other schedule settings (lr, min_lr,
    warmup_steps) the change should be reported, not silent."""
    Trainer(run_cfg(tiny_dataset, tmp_path), dataset=short_val, progress=False).train(until=3)
    logged = []
    monkeypatch.setattr(Trainer, "_log", lambda self, msg: logged.append(msg))
    t = Trainer(run_cfg(tiny_dataset, tmp_path, max_steps=12), resume=True, dataset=short_val, progress=False)
    assert lr_at(3, t.cfg) != lr_at(3, run_cfg(tiny_dataset, tmp_path))
    assert any("max_steps" in m for m in logged), logged


def test_resume_restores_the_saved_cuda_rng_state(tiny_dataset, short_val, tmp_path, monkeypatch):
    """On a GPU, save_checkpoint stores torch.cuda.get_rng_state_all() as rng_cuda beside rng_cpu;
    resume must put it back, or everything random on the GPU after a resume (LoRA dropout, which
    draws from the CUDA generator) differs from the straight run, breaking the bit-for-bit resume
    the docs promise. (The GPU is faked: this machine has none.)"""
    cfg = run_cfg(tiny_dataset, tmp_path)
    t = Trainer(cfg, dataset=short_val, progress=False)
    t.train(until=2)
    cuda_state = [torch.arange(16, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in cuda_state])
    t.save()
    assert "rng_cuda" in torch.load(tmp_path / "run" / "checkpoint" / "optimizer.pt", weights_only=True)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append([state]))
    Trainer(cfg, resume=True, dataset=short_val, progress=False)
    assert restored and all(torch.equal(a, b) for a, b in zip(restored[-1], cuda_state)), \
        "the checkpoint's rng_cuda was never restored"


def test_micro_batches_of_consecutive_steps_are_drawn_independently(tiny_dataset, short_val, tmp_path):
    """The batch of micro-step (step, i) is 'drawn from a generator seeded by (seed, step, i)': distinct
    (step, i) must get distinct draws. batch_size=1 x grad_accum=1024 (a large effective batch on a
    small device) must not train micro-batch i + 1009 of step s on the same window as micro-batch i of
    step s + 1."""
    t = Trainer(run_cfg(tiny_dataset, tmp_path, batch_size=1, grad_accum=1024), dataset=short_val, progress=False)
    same = [i for i in range(1009, 1024) if torch.equal(t._batch(0, i)[0], t._batch(1, i - 1009)[0])]
    assert not same, f"micro-batches {same} of step 0 repeat micro-batches {[i - 1009 for i in same]} of step 1"


def test_stream_seeds_are_distinct_for_nearby_tuples_and_take_negative_seeds():
    """stream_seed names one draw by its whole tuple: no two of these nearby tuples share a seed
    (the old linear formula made (s, t, i + 1009) equal (s, t + 1, i)), and a negative run seed works."""
    from lmstack.train.trainer import stream_seed

    tuples = [(s, t, i) for s in (-1, 0, 1, 2) for t in range(30) for i in range(1100)]
    seeds = {stream_seed(*tup) for tup in tuples}
    assert len(seeds) == len(tuples)
    assert all(0 <= x < 2**63 for x in seeds)  # what torch.Generator.manual_seed takes
