"""Reduced precision on the CPU against HF transformers, both measured against float64.

bf16 and fp16 weights, and fp32 weights under ``torch.autocast("cpu", dtype=torch.bfloat16)``:
lmstack's logits and gradients may round differently from HF's, but their error against a float64
run of the *same* (already rounded) weights must not be materially larger than HF's. Covered: each
family and option that changes the numerics (RoPE scalings at positions ~4000 with rope_theta 5e5,
q/k/v bias, tied embeddings, sliding window, GQA / MQA); greedy decoding of a ragged batch (tokens
may part only where float64 calls it a tie at bf16's resolution); the trainer's bf16 / fp16 runs
(loss tracks fp32, fp32 master weights in the checkpoint, the fp16 scaler skips an overflowing
step without touching weights or optimizer state); from_hf's dtype choice and to_hf's dtype field.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import lmstack  # noqa: E402
from lmstack.interop import from_hf, to_hf  # noqa: E402

from ..hf_models import hf_rope_fields, no_special_tokens, ragged_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 128
AUTOCAST = "autocast-bf16"  # fp32 weights under CPU bf16 autocast
MODES = (torch.bfloat16, torch.float16, AUTOCAST)
CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
FAR = 4000  # positions ~4000: RoPE angles large enough that table precision matters

# case -> (family, config fields, first position of the test rows)
CASES = {
    "llama-theta5e5": ("llama", dict(**hf_rope_fields({"rope_type": "default", "rope_theta": 5e5}),
                                     max_position_embeddings=4200), FAR),
    "llama-linear": ("llama", dict(**hf_rope_fields({"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}),
                                   max_position_embeddings=4200), FAR),
    "llama-llama3-tied-mqa": ("llama", dict(
        **hf_rope_fields({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 512, "rope_theta": 5e5}),
        max_position_embeddings=4200, tie_word_embeddings=True, num_key_value_heads=1), FAR),
    # dynamic NTK scales past max_position_embeddings (the original context): ~4000 > 512
    "llama-dynamic": ("llama", dict(**hf_rope_fields({"rope_type": "dynamic", "factor": 8.0, "rope_theta": 5e5}),
                                    max_position_embeddings=512), FAR),
    "llama-yarn": ("llama", dict(**hf_rope_fields({"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                                  "original_max_position_embeddings": 1050}),
                                 max_position_embeddings=4200), FAR),
    "qwen2-bias-tied": ("qwen2", dict(**hf_rope_fields({"rope_type": "default", "rope_theta": 1e6}),
                                      max_position_embeddings=4200, tie_word_embeddings=True), FAR),
    "qwen2-bias-untied-mha": ("qwen2", dict(max_position_embeddings=256, tie_word_embeddings=False,
                                            num_key_value_heads=4), 0),
    "mistral-window": ("mistral", dict(sliding_window=7, max_position_embeddings=4200,
                                       **hf_rope_fields({"rope_type": "default", "rope_theta": 1e6})), FAR),
}


def _hf_model(family: str, fields: dict, seed: int) -> transformers.PreTrainedModel:
    """A tiny random HF model, fp32, eval; Qwen2's q/k/v biases made non-zero (HF starts them at 0)."""
    cfg_cls, model_cls = CLASSES[family]
    base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = model_cls(cfg_cls(**{**base, **fields})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("norm.weight"):  # not all ones: the weight multiply's order shows
                p.uniform_(0.5, 1.5)
    return hf


def _round_params(hf, dtype) -> None:
    """Round the parameters (not RoPE's inv_freq buffer) to ``dtype`` and back to fp32 in place, so
    the float64 reference and the reduced-precision runs hold exactly the same weights."""
    if dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.to(dtype).float())


def _save(hf, path):
    hf.save_pretrained(path)
    return path


def _load_hf(path, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).abs().max().item()


def _autocast(mode):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == AUTOCAST else torch.autocast("cpu", enabled=False)


def _pair(tmp_path, case, mode, seed):
    """(hf, lmstack model, float64 HF reference) of one case's weights, in ``mode``."""
    family, fields, start = CASES[case]
    hf32 = _hf_model(family, fields, seed)
    _round_params(hf32, mode)
    path = _save(hf32, tmp_path / "hf")
    dtype = torch.float32 if mode == AUTOCAST else mode
    ref = copy.deepcopy(hf32).double()
    return _load_hf(path, dtype), from_hf(path, dtype=dtype), ref, start


# -- 1. logits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES, ids=lambda m: str(m).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
def test_half_precision_logits_no_worse_than_hf(tmp_path, seed, case, mode):
    """Logits error against float64 of the same weights: lmstack's <= 1.5 x HF's (+ slack), and the
    logits in the dtype HF returns them in (the model's; bf16 under autocast)."""
    hf, m, ref, start = _pair(tmp_path, case, mode, seed)
    T = 40
    pos = torch.arange(start, start + T)[None].expand(2, T)
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        want = ref(x, position_ids=pos).logits
        with _autocast(mode):
            theirs = hf(x, position_ids=pos).logits
            ours = m(x, positions=pos if start else None)
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    e_hf, e_lm = _err(theirs, want), _err(ours, want)
    assert e_hf < 0.1 * want.abs().max()  # the yardstick itself is sane
    assert e_lm <= 1.5 * e_hf + 1e-6, (e_lm, e_hf)


def test_half_precision_logits_with_left_padding(tmp_path, seed):
    """A left-padded bf16 batch (pad_mask + shifted positions) against HF's attention_mask run."""
    hf, m, ref, _ = _pair(tmp_path, "qwen2-bias-tied", torch.bfloat16, seed)
    ids, mask = ragged_batch([5, 17, 11], seed=seed, vocab=V, pad=V - 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        ours = m(ids, positions=pos, pad_mask=mask.bool())
    real = mask.bool()
    e_hf, e_lm = _err(theirs[real], want[real]), _err(ours[real], want[real])
    assert e_lm <= 1.5 * e_hf + 1e-6, (e_lm, e_hf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_load_then_upcast_keeps_full_precision_rope(tmp_path, seed, dtype):
    """Load a checkpoint in bf16/fp16 (to save memory), then ``.float()`` it to fine-tune or evaluate
    in fp32: the weights are exact in fp32, so the logits must be as good as a direct fp32 load.
    transformers keeps RoPE's inv_freq in fp32 when it loads in half precision, so its upcast model
    is exact; lmstack's RoPE cos/sin tables are buffers that ``from_hf(dtype=...)`` rounds to the half
    dtype, and ``.float()`` keeps that rounding."""
    family, fields, start = CASES["llama-theta5e5"]
    hf32 = _hf_model(family, fields, seed)
    with torch.no_grad():  # sharper attention (scores x 16), where the rotation's precision shows
        for layer in hf32.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    _round_params(hf32, dtype)
    path = _save(hf32, tmp_path / "hf")
    ref = copy.deepcopy(hf32).double()
    T = 24
    pos = torch.arange(start, start + T)[None]
    x = torch.randint(0, V, (1, T))
    with torch.no_grad():
        want = ref(x, position_ids=pos).logits
        theirs = _load_hf(path, dtype).float()(x, position_ids=pos).logits
        ours = from_hf(path, dtype=dtype).float()(x, positions=pos)
        direct = from_hf(path, dtype=torch.float32)(x, positions=pos)
    e_hf, e_lm, e_direct = _err(theirs, want), _err(ours, want), _err(direct, want)
    slack = 1e-6 * want.abs().max().item()
    assert e_direct <= 1.5 * e_hf + slack
    assert e_lm <= 1.5 * e_hf + slack, f"upcast lmstack {e_lm:.2e} vs HF {e_hf:.2e} (direct fp32 load {e_direct:.2e})"


# -- 2. gradients ----------------------------------------------------------------------------------
def _grads(model, x, y, mode, hf: bool) -> dict[str, torch.Tensor]:
    model.train()
    with _autocast(mode):
        out = model(x).logits if hf else model(x)
    F.cross_entropy(out.float().flatten(0, 1), y.flatten()).backward()
    return {n.removeprefix("model."): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: str(m).removeprefix("torch."))
@pytest.mark.parametrize("case", ["llama-llama3-tied-mqa", "qwen2-bias-untied-mha", "mistral-window"])
def test_half_precision_gradients_no_worse_than_hf(tmp_path, seed, case, mode):
    """Every parameter's gradient: in the parameter's dtype, and its error against float64 (relative
    Frobenius norm) <= 2 x HF's per tensor and <= 1.3 x HF's over all of them."""
    hf, m, ref, _ = _pair(tmp_path, case, mode, seed)
    x, y = torch.randint(0, V, (2, 24)), torch.randint(0, V, (2, 24))
    want = _grads(ref, x, y, None, hf=True)
    theirs = _grads(hf, x, y, mode, hf=True)
    ours = _grads(m, x, y, mode, hf=False)
    assert set(ours) == set(want)
    tot_hf = tot_lm = 0.0
    for name, g in ours.items():
        p = dict(m.named_parameters())[name]
        assert g.dtype == p.dtype, name
        w = want[name]
        e_hf, e_lm = (theirs[name].double() - w).norm().item(), (g.double() - w).norm().item()
        slack = 1e-3 * w.norm().item() + 1e-12
        assert e_lm <= 2 * e_hf + slack, (name, e_lm, e_hf)
        tot_hf, tot_lm = tot_hf + e_hf**2, tot_lm + e_lm**2
    assert tot_lm**0.5 <= 1.3 * tot_hf**0.5, (tot_lm**0.5, tot_hf**0.5)


# -- 3. greedy decoding ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES, ids=lambda m: str(m).removeprefix("torch."))
# untied cases: a tied random model mostly repeats its last token, whatever its attention sees
@pytest.mark.parametrize("static", [False, True], ids=["cache", "static-cache"])
@pytest.mark.parametrize("case", ["llama-linear", "qwen2-bias-untied-mha", "mistral-window"])
def test_half_precision_greedy_matches_hf_up_to_ties(tmp_path, seed, case, mode, static):
    """Greedy decoding of a ragged, left-padded batch: lmstack's tokens equal HF's (same dtype) until
    a row parts, and where it parts the two chosen tokens are a tie at half precision: their float64
    logits differ by no more than a few times HF's own half-precision logit error at that step.
    The final norm's gain is scaled up (peaked distributions) so most steps have clear winners.
    Both KV caches: the usual one and the static-shape one (``static_cache=True``, the default when
    compiling on CUDA); under autocast the values arrive in bf16 and the keys in fp32 (RoPE's fp32
    tables), and a cache allocated in the weights' fp32 must take both, as HF's static cache does."""
    family, fields, _ = CASES[case]
    hf32 = _hf_model(family, fields, seed)
    with torch.no_grad():
        hf32.model.norm.weight.mul_(8.0)  # the logits x 8 (not the LM head: tied, it is the embedding)
    _round_params(hf32, mode)
    path = _save(hf32, tmp_path / "hf")
    dtype = torch.float32 if mode == AUTOCAST else mode
    ref = copy.deepcopy(hf32).double()
    hf, m = no_special_tokens(_load_hf(path, dtype)), from_hf(path, dtype=dtype)
    ids, mask = ragged_batch([4, 13, 9, 1], seed=seed, vocab=V, pad=V - 1)
    N = 24
    with torch.no_grad(), _autocast(mode):
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=V - 1)
        ours = lmstack.generate(m, ids, attention_mask=mask, max_new_tokens=N, temperature=0.0,
                                static_cache=static).sequences
    assert ours.shape == theirs.shape
    T = ids.shape[1]
    agreed = 0
    for b in range(ids.shape[0]):
        differ = (ours[b, T:] != theirs[b, T:]).nonzero()
        if not len(differ):
            agreed += N
            continue
        t = T + differ[0].item()
        agreed += t - T
        prefix = theirs[b : b + 1, :t]
        pm = torch.cat([mask[b : b + 1], torch.ones(1, t - T, dtype=mask.dtype)], dim=1)
        pos = (pm.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            exact = ref(prefix, attention_mask=pm, position_ids=pos).logits[0, -1]
            with _autocast(mode):
                noisy = hf(prefix, attention_mask=pm, position_ids=pos).logits[0, -1]
        noise = (noisy.double() - exact).abs().max().item()
        a, c = theirs[b, t].item(), ours[b, t].item()
        gap = abs(exact[a] - exact[c]).item()
        assert gap <= 4 * noise + 1e-6, (
            f"row {b} step {t - T}: HF chose {a}, lmstack {c}; float64 logits differ by {gap:.4f}, far above "
            f"HF's half-precision logit error {noise:.4f} (not a tie)")
    assert agreed >= ids.shape[0] * N // 3  # the comparison covered real decoding, not only ties


# -- 4. the trainer --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from lmstack.data import prepare_text

    from ..train.conftest import synthetic_plays

    root = tmp_path_factory.mktemp("corpus")
    paths = synthetic_plays(root, {"alpha": 300, "beta": 300, "gamma": 200})
    return prepare_text(paths, name="tiny", home=root / "home", vocab_size=300, val_files=["gamma"],
                        log=lambda s: None)


def _train_cfg(corpus, out, **kw):
    from lmstack.train import TrainConfig

    base = dict(model="tiny", model_overrides=dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64),
                data=str(corpus), out_dir=str(out), seq_len=32, batch_size=4, max_steps=6, lr=3e-3,
                warmup_steps=2, eval_every=100, eval_tokens=256, save_every=100, log_every=1)
    return TrainConfig(**{**base, **kw})


def _losses(t):
    return [r["loss"] for r in t.read_metrics() if "loss" in r]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_tracks_fp32_and_saves_fp32_master_weights(tiny_corpus, tmp_path, seed, precision):
    """A few steps in bf16 / fp16 autocast: the parameters stay fp32 throughout (autocast, not a
    half-precision model), the checkpoint holds fp32 weights close to an fp32 run's, and the losses
    and final validation loss track the fp32 run's."""
    from safetensors import safe_open

    from lmstack.train import Trainer, load_checkpoint

    s = seed % 2**31
    runs = {}
    for prec in ("fp32", precision):
        t = Trainer(_train_cfg(tiny_corpus, tmp_path / prec, precision=prec, seed=s), progress=False)
        runs[prec] = (t, t.train())
        assert {p.dtype for p in t.model.parameters()} == {torch.float32}
    (t32, r32), (th, rh) = runs["fp32"], runs[precision]
    assert _losses(th) == pytest.approx(_losses(t32), abs=0.03)
    assert rh["val_loss"] == pytest.approx(r32["val_loss"], abs=0.03)
    f = safe_open(str(tmp_path / precision / "checkpoint" / "model.safetensors"), "pt")
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    saved, _ = load_checkpoint(tmp_path / precision)
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), th.model.parameters()))
    for a, b in zip(th.model.parameters(), t32.model.parameters()):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-3


def test_fp16_scaler_skips_one_overflowing_step_mid_run(tiny_corpus, tmp_path, seed):
    """An inf gradient at step 2 of an fp16 run (as an fp16 overflow makes it): that step leaves the
    weights and AdamW's state (moments, step counts) exactly as they were, halves the loss scale,
    and the run goes on training (the next step moves the weights) to the end without diverging."""
    from lmstack.train import Trainer

    t = Trainer(_train_cfg(tiny_corpus, tmp_path / "run", precision="fp16", seed=seed % 2**31, max_steps=5,
                           grad_clip=1.0), progress=False)
    real = t._optimizer_step
    poison = t.model.layers[1].mlp.down_proj.weight
    seen = {}

    def step(i):
        if i != 2:
            if i == 3:  # the step after the skipped one trains again
                before = [p.detach().clone() for p in t.model.parameters()]
                out = real(i)
                assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
                return out
            return real(i)
        seen["scale"] = t.scaler.get_scale()
        seen["params"] = [p.detach().clone() for p in t.model.parameters()]
        seen["state"] = copy.deepcopy(t.optimizer.state_dict()["state"])
        handle = poison.register_hook(lambda g: torch.full_like(g, float("inf")))
        try:
            return real(i)
        finally:
            handle.remove()
            seen["after_scale"] = t.scaler.get_scale()
            seen["after_params"] = [p.detach().clone() for p in t.model.parameters()]
            seen["after_state"] = copy.deepcopy(t.optimizer.state_dict()["state"])

    t._optimizer_step = step
    t.train()
    assert t.step == 5
    assert seen["after_scale"] == seen["scale"] / 2
    assert all(torch.equal(a, b) for a, b in zip(seen["params"], seen["after_params"]))
    assert seen["state"].keys() == seen["after_state"].keys()
    for k, st in seen["state"].items():
        for name, v in st.items():
            assert torch.equal(v, seen["after_state"][k][name]), (k, name)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    losses = _losses(t)
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)


# -- 5. dtypes in and out --------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_from_hf_auto_dtype_follows_the_config_field_as_hf(tmp_path, seed, key, stored):
    """dtype None / "auto" take config.json's ``dtype`` (transformers 5) or ``torch_dtype`` (4.x)
    as transformers' dtype="auto" does, even where the weights are stored in fp32."""
    family, fields, _ = CASES["qwen2-bias-untied-mha"]
    path = _save(_hf_model(family, fields, seed), tmp_path / "hf")  # fp32 tensors
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    cfg[key] = stored
    (path / "config.json").write_text(json.dumps(cfg))
    want = _load_hf(path, "auto").dtype
    assert str(want).removeprefix("torch.") == stored
    for dtype in (None, "auto"):
        assert {p.dtype for p in from_hf(path, dtype=dtype).parameters()} == {want}, dtype


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_from_hf_auto_written_in_config_json_means_the_stored_dtype(tmp_path, seed, stored):
    family, fields, _ = CASES["qwen2-bias-untied-mha"]
    path = _save(_hf_model(family, fields, seed).to(stored), tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "auto"
    (path / "config.json").write_text(json.dumps(cfg))
    for dtype in (None, "auto"):
        assert {p.dtype for p in from_hf(path, dtype=dtype).parameters()} == {stored}, dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_to_hf_of_half_model_reloads_as_the_same_model(tmp_path, seed, dtype):
    """to_hf of a bf16 / fp16 model writes its dtype (tensors and config), and transformers'
    dtype="auto" load gives the logits lmstack gives, exactly (same weights, same precision)."""
    family, fields, _ = CASES["llama-llama3-tied-mqa"]
    src = _save(_hf_model(family, fields, seed), tmp_path / "hf")
    m = from_hf(src, dtype=dtype)
    out = to_hf(m, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == str(dtype).removeprefix("torch.")
    back = _load_hf(out, "auto")
    assert back.dtype == dtype
    x = torch.randint(0, V, (2, 30))
    pos = torch.arange(FAR, FAR + 30)[None].expand(2, 30)
    with torch.no_grad():
        assert torch.equal(back(x, position_ids=pos).logits, m(x, positions=pos))
        assert torch.equal(from_hf(out)(x, positions=pos), m(x, positions=pos))


def test_from_hf_refuses_torch_dtypes_it_cannot_run(tmp_path, seed):
    """A torch dtype object is checked as a dtype name is: int8 / bool fail inside torch's
    ``Module.to`` (a TypeError that says nothing of from_hf), complex64 and float8 load silently and
    fail only in the forward pass (embedding / neg not implemented). Each should be from_hf's own
    one-line ValueError naming the dtypes it loads."""
    family, fields, _ = CASES["qwen2-bias-untied-mha"]
    path = _save(_hf_model(family, fields, seed), tmp_path / "hf")
    for bad in (torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=r"dtype.*bfloat16") as e:
            from_hf(path, dtype=bad)
        assert "\n" not in str(e.value), bad
