"""Adversarial review of PEFT *training*: gradients, optimizer steps and train/eval behaviour of every
lmstack.peft method, against HF peft 0.21 on the same HF weights (``tests/hf_models.tiny_hf``) and,
for the Houlsby adapter (no peft equivalent), against a float64 re-implementation from the paper.

Each case builds the same adapter in both libraries with identical random (nonzero) weights, runs one
left- or right-padded batch whose labels are -100 on padding and on a prompt part, and compares the
loss and every trainable parameter's gradient (names mapped between the libraries), in fp32 and in
float64, then three AdamW steps. Name correspondences (peft prefix ``base_model.model.model.``):

- LoRA ``<module>.lora_A.weight`` <-> ``<module>.lora_A.default.weight`` (B likewise)
- IA3 ``<module>.ia3_l`` (n,) <-> ``<module>.ia3_l.default`` (n, 1) or, feed-forward, (1, n)
- prompt ``virtual_embeds.weight`` <-> ``prompt_encoder.default.embedding.weight``
- P-tuning v2 ``prefix_encoder.table`` <-> ``prompt_encoder.default.embedding.weight``
- prefix tuning (training parameterisation) ``prefix_encoder.embedding`` (P, kv) <->
  ``prompt_encoder.default.embedding.weight``; ``prefix_encoder.mlp.{0,2}`` <->
  ``prompt_encoder.default.transform.{0,2}`` (peft's PrefixEncoder with prefix_projection=True and
  token_dim = n_kv_heads * head_dim: the same MLP, so the mapping is one-to-one).

Float64: HF's RMSNorm computes in float32 whatever the input dtype, and HF's loss upcasts logits to
float32, so a double HF model is only float32-exact; the ``f64_reference`` fixture patches the three
RMSNorm classes to compute in the input dtype, and the float64 loss is taken from HF's logits.

Left padding: the first real token of a left-padded row is never a label here. HF would predict it
from the last padding position, whose query sees no key in HF (its output is arbitrary) and its own
key in lmstack; neither is meaningful, so that label is outside what can be compared.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lmstack.peft as lp
from lmstack.train.objectives import causal_lm_loss
from lmstack.train.trainer import Trainer, TrainConfig

from ..hf_models import tiny_hf

pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 128
PAD = V - 1
C = "CAUSAL_LM"
TOL32 = 1e-4  # fp32: abs on the loss, relative (to the largest entry) on each gradient
TOL64 = 1e-9  # float64 (both sides compute in float64; typically ~1e-14, up to ~3e-10 on near-zero gradients)

# (family, method, lmstack options, tiny_hf options)
CASES = {
    "lora_llama": ("llama", "lora", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), {}),
    "lora_qwen2_qkv_bias": ("qwen2", "lora", dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]), {}),
    "lora_rslora_all_linear": ("llama", "lora", dict(r=3, alpha=5, target_modules="all-linear", use_rslora=True), {}),
    "lora_lm_head_untied": ("llama", "lora", dict(r=2, alpha=4, target_modules=["lm_head", "o_proj", "gate_proj"]), {}),
    "lora_mistral_window": ("mistral", "lora", dict(r=4, alpha=16, target_modules=["q_proj", "k_proj", "up_proj"]),
                            dict(window=4)),
    "ia3_llama": ("llama", "ia3", dict(), {}),
    "ia3_qwen2_ff": ("qwen2", "ia3", dict(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                                          feedforward_modules=["up_proj", "down_proj"]), {}),
    "prompt_llama": ("llama", "prompt", dict(num_virtual_tokens=5), {}),
    "prompt_mistral_window": ("mistral", "prompt", dict(num_virtual_tokens=5), dict(window=7)),
    "ptuning_v2_llama": ("llama", "ptuning_v2", dict(num_virtual_tokens=4), {}),
    "ptuning_v2_mistral_window": ("mistral", "ptuning_v2", dict(num_virtual_tokens=3), dict(window=6)),
    "prefix_qwen2": ("qwen2", "prefix", dict(num_virtual_tokens=3, encoder_hidden_size=24), {}),
    "prefix_llama_mha": ("llama", "prefix", dict(num_virtual_tokens=4, encoder_hidden_size=16), dict(kv_heads=4)),
}


def peft_config(method, o):
    """The HF peft config of lmstack ``method`` with full options ``o``."""
    if method == "lora":
        return LoraConfig(r=o["r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"],
                          target_modules=o["target_modules"], use_rslora=o["use_rslora"], task_type=C)
    if method == "ia3":
        return IA3Config(target_modules=o["target_modules"], feedforward_modules=o["feedforward_modules"], task_type=C)
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=o["num_virtual_tokens"], task_type=C)
    if method == "ptuning_v2":
        return PrefixTuningConfig(num_virtual_tokens=o["num_virtual_tokens"], prefix_projection=False, task_type=C)
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=o["num_virtual_tokens"], prefix_projection=True,
                                  encoder_hidden_size=o["encoder_hidden_size"], task_type=C)
    raise AssertionError(method)


def peft_name(method, name):
    """lmstack adapter parameter name -> HF peft parameter name (module docstring)."""
    root = "base_model.model." if name.startswith("lm_head.") else "base_model.model.model."
    if method == "lora":
        module, leaf = name.rsplit(".", 1)
        return f"{root}{module}.default.{leaf}"
    if method == "ia3":
        return f"{root}{name}.default"
    if method in ("prompt", "ptuning_v2") or name == "prefix_encoder.embedding":
        return "prompt_encoder.default.embedding.weight"
    return name.replace("prefix_encoder.mlp.", "prompt_encoder.default.transform.")


def pair(case, seed, scale=0.3, base_dtype=None, **extra):
    """(lmstack model, peft model, {lmstack name: peft name}) with the same base and adapter weights,
    both in train mode; ``base_dtype``: the base models' dtype before the adapters are added (each
    library then picks its adapter's dtype)."""
    family, method, opts, hf_kw = CASES[case]
    opts = {**opts, **extra}
    hf, m = tiny_hf(family, seed=seed % 10_000, **hf_kw)
    if base_dtype is not None:
        hf.to(base_dtype), m.to(base_dtype)
    lp.apply(m, method, **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lp.adapter_parameters(m):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(hf, peft_config(method, m.peft_config["options"]))
    names = {n: peft_name(method, n) for n in lp.adapter_state_dict(m)}
    theirs = dict(pm.named_parameters())
    assert set(names.values()) == {n for n, p in theirs.items() if p.requires_grad}, "the name map misses some"
    assert lp.trainable_parameters(m) == pm.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        for n, p in lp.adapter_state_dict(m).items():
            theirs[names[n]].copy_(p.reshape(theirs[names[n]].shape).to(theirs[names[n]].dtype))
    return m.train(), pm.train(), names


@pytest.fixture
def f64_reference(monkeypatch):
    """HF's RMSNorm in the input's dtype (it upcasts to float32 only, which caps a double model at
    float32 accuracy); the same formula otherwise."""
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.mistral.modeling_mistral as mistral
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for cls in (llama.LlamaRMSNorm, qwen2.Qwen2RMSNorm, mistral.MistralRMSNorm):
        monkeypatch.setattr(cls, "forward", forward)


def ragged(B, T, left, g):
    """Random ids (B, T) padded with PAD, mask (B, T), HF-style labels (B, T): -100 on padding and on
    a prompt part of each row (at least the first real token, see the module docstring; at most half,
so that the prefix keys a sliding window hides from later queries still get a gradient)."""
    ids = torch.randint(0, PAD, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = ids.clone()
    for i in range(B):
        n = T if i == 0 else int(torch.randint(3, T + 1, (1,), generator=g))
        prompt = int(torch.randint(1, max(2, n // 2), (1,), generator=g))
        pad = slice(T - n, T) if left else slice(0, n)
        mask[i, pad] = 1
        ids[i][mask[i] == 0] = PAD
        labels[i][mask[i] == 0] = -100
        labels[i, pad.start : pad.start + prompt] = -100
    return ids, mask, labels


def shifted(labels):
    """HF labels -> lmstack targets (targets[t] = labels[t + 1])."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def ours_loss(m, ids, mask, labels, positions=None):
    return causal_lm_loss(m(ids, pad_mask=mask.bool(), positions=positions), shifted(labels))


def theirs_loss(pm, ids, mask, labels, positions=None):
    kw = {} if positions is None else {"position_ids": positions}
    if pm.dtype == torch.float32:  # HF's own shift and mean
        return pm(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    logits = pm(input_ids=ids, attention_mask=mask, **kw).logits[:, -ids.shape[1]:]  # prompt: drop virtual rows
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def assert_grads_match(m, pm, names, tol):
    theirs = dict(pm.named_parameters())
    for n, p in lp.adapter_state_dict(m).items():
        ref = theirs[names[n]].grad
        assert p.grad is not None and ref is not None, n
        ref = ref.reshape(p.shape)
        assert ref.abs().max() > 0, f"{n}: zero gradient, the comparison would mean nothing"
        err = ((p.grad - ref).abs().max() / ref.abs().max()).item()
        assert err <= tol, f"{n}: gradient differs from peft's by {err:.3g} (relative)"


def assert_base_has_no_grad(m):
    adapter = {id(p) for p in lp.adapter_parameters(m)}
    for n, p in m.named_parameters():
        if id(p) not in adapter:
            assert not p.requires_grad and p.grad is None, f"frozen base parameter {n} got a gradient"


# -- loss and gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_peft(request, seed, case, dtype, padding):
    if dtype == torch.float64:
        request.getfixturevalue("f64_reference")
    m, pm, names = pair(case, seed)
    m.to(dtype), pm.to(dtype)
    ids, mask, labels = ragged(3, 11, padding == "left", torch.Generator().manual_seed(seed))
    ours, theirs = ours_loss(m, ids, mask, labels), theirs_loss(pm, ids, mask, labels)
    assert ours.dtype == theirs.dtype == dtype
    assert abs(ours.item() - theirs.item()) <= (TOL32 if dtype == torch.float32 else TOL64)
    ours.backward()
    theirs.backward()
    assert_grads_match(m, pm, names, TOL32 if dtype == torch.float32 else TOL64)
    assert_base_has_no_grad(m)


@pytest.mark.parametrize("case", ["lora_qwen2_qkv_bias", "ia3_qwen2_ff", "prefix_qwen2", "ptuning_v2_mistral_window"])
def test_gradients_match_peft_with_explicit_positions(seed, case):
    """Left padding with position ids counting real tokens only (what generate uses; peft shifts them
    past the virtual tokens for prefix tuning, as lmstack does)."""
    m, pm, names = pair(case, seed)
    ids, mask, labels = ragged(3, 12, True, torch.Generator().manual_seed(seed))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    ours, theirs = ours_loss(m, ids, mask, labels, pos), theirs_loss(pm, ids, mask, labels, pos)
    assert abs(ours.item() - theirs.item()) <= TOL32
    ours.backward()
    theirs.backward()
    assert_grads_match(m, pm, names, TOL32)


# -- optimizer steps ------------------------------------------------------------------------------------
class _Stub(Trainer):
    """lmstack's Trainer around a given model and batches: its optimizer (param groups: no weight decay
    on 1-D parameters), its gradient accumulation (micro-batch means weighted by their target counts),
    clipping and step, without data files."""

    def __init__(self, cfg, model, batches):
        self._model, self._batches = model, batches
        super().__init__(cfg, progress=False)

    def _setup_data(self, dataset):
        pass

    def _build_model(self, resume_from):
        self.model_cfg = self._model.config
        return self._model

    def _batch(self, step, micro):
        x, y = self._batches[step * self.cfg.grad_accum + micro]
        return x, y, None, x.numel()


HP = dict(lr=3e-2, beta1=0.85, beta2=0.97, weight_decay=0.1)


def reference_adamw(pm, names, m):
    """torch AdamW on the peft parameters with lmstack's grouping rule (weight decay on parameters of
    2+ dims) applied to the *lmstack* shape of each (IA3 scales are 1-D in lmstack, 2-D in peft)."""
    shapes = {names[n]: p.dim() for n, p in lp.adapter_state_dict(m).items()}
    params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if shapes[n] >= 2], "weight_decay": HP["weight_decay"]},
              {"params": [p for n, p in params if shapes[n] < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_three_trainer_steps_match_peft_adamw(request, tmp_path, seed, case, dtype):
    """Three optimizer steps of lmstack's Trainer (2 micro-batches each, grad clipping on) against the
    same steps done by hand on the peft model: same adapter weights after, base weights bit-identical."""
    if dtype == torch.float64:
        request.getfixturevalue("f64_reference")
    m, pm, names = pair(case, seed)
    m.to(dtype), pm.to(dtype)
    base_before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(seed)
    micro = [ragged(2, 10, False, g) for _ in range(6)]  # the Trainer's batches are right-padded, no mask
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), grad_accum=2, max_steps=100, warmup_steps=0, min_lr=HP["lr"],
                      grad_clip=0.5, device="cpu", **HP)
    t = _Stub(cfg, m, [(x, shifted(y)) for x, _, y in micro])
    opt = reference_adamw(pm, names, m)
    theirs_params = [p for p in pm.parameters() if p.requires_grad]
    theirs = dict(pm.named_parameters())
    start = {n: p.detach().clone() for n, p in lp.adapter_state_dict(m).items()}
    for step in range(3):
        t._optimizer_step(step)
        pair_ = micro[2 * step : 2 * step + 2]
        n_all = sum(int((y[:, 1:] != -100).sum()) for _, _, y in pair_)
        for x, mask, y in pair_:  # the step's loss: mean over all its targets
            n = int((y[:, 1:] != -100).sum())
            (theirs_loss(pm, x, torch.ones_like(mask), y) * n / n_all).backward()
        torch.nn.utils.clip_grad_norm_(theirs_params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for n, p in lp.adapter_state_dict(m).items():
            ref = theirs[names[n]].detach().reshape(p.shape)
            if dtype == torch.float64:
                assert (p.detach() - ref).abs().max() <= 1e-10, f"{n} after AdamW step {step + 1}"
            else:
                # fp32 Adam is ill-conditioned element by element: an entry whose gradient is ~0 (1e-7 of
                # the largest) moves by +-lr on the sign of its rounding error (seen: one entry of a
                # LoRA A off by lr after step 1 while the gradients agreed to 1e-6). Compare the
                # displacement as a whole; float64 above is the strict check.
                moved = ref - start[n]
                assert moved.norm() > 0
                assert (p.detach() - ref).norm() <= 0.25 * moved.norm(), f"{n} after AdamW step {step + 1}"
    for n, p in m.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"frozen base weight {n} moved"


@pytest.mark.parametrize("case", ["lora_llama", "ia3_llama", "prompt_llama", "ptuning_v2_llama", "prefix_qwen2"])
def test_adapter_on_a_bf16_base_trains_like_peft(seed, case):
    """A bf16 base (``lmstack.from_hf`` loads most checkpoints so; the README suggests
    dtype="bfloat16"), the adapter added, three AdamW steps at a usual PEFT lr (1e-4): the adapter
    weights move as peft's do. peft keeps adapter weights in float32 on a bf16/fp16 base
    (``get_peft_model(..., autocast_adapter_dtype=True)``, its default; prompt encoders are created in
    float32), so lr-sized updates are kept; in bf16 (8 significant bits) an update below half an ulp of
    the weight (e.g. 1e-4 on an IA3 scale near 1, ulp 2^-7) is rounded away and the weight never moves."""
    m, pm, names = pair(case, seed, base_dtype=torch.bfloat16)
    theirs = dict(pm.named_parameters())
    assert all(theirs[names[n]].dtype == torch.float32 for n in names)  # peft's choice
    start = {n: p.detach().float().clone() for n, p in lp.adapter_state_dict(m).items()}
    ours_opt = torch.optim.AdamW(lp.adapter_parameters(m), lr=1e-4, weight_decay=0.0)
    theirs_opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        ids, mask, labels = ragged(3, 11, False, g)
        losses = (ours_loss(m, ids, mask, labels), theirs_loss(pm, ids, mask, labels))
        for loss, opt in zip(losses, (ours_opt, theirs_opt)):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for n, p in lp.adapter_state_dict(m).items():
        ours_moved = p.detach().float() - start[n]
        theirs_moved = theirs[names[n]].detach().reshape(p.shape) - start[n]
        stuck = (ours_moved == 0).float().mean().item()
        err = ((ours_moved - theirs_moved).norm() / theirs_moved.norm()).item()
        assert stuck <= 0.1 and err <= 0.3, (
            f"{n} ({p.dtype}): {stuck:.0%} of its entries never moved in 3 AdamW steps at lr 1e-4 (peft's float32 "
            f"copy: {(theirs_moved == 0).float().mean().item():.0%}); displacement off by {err:.0%} of peft's")


# -- dropout --------------------------------------------------------------------------------------------
def test_lora_dropout_train_vs_eval_and_peft_parity(seed):
    """LoRA dropout: active in train mode (two forwards differ), off in eval mode (deterministic, equal
    to the model without dropout); in train mode the same RNG state gives the same masks as peft (both
    drop the input of lora_A, module by module in the same order), so loss and gradients match."""
    m, pm, names = pair("lora_llama", seed, dropout=0.4)
    m0 = pair("lora_llama", seed)[0].eval()
    ids, mask, labels = ragged(2, 10, False, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = m(ids), m(ids)
        assert (a - b).abs().max() > 1e-3, "dropout does nothing in train mode"
        m.eval()
        e1, e2 = m(ids), m(ids)
        assert torch.equal(e1, e2) and (e1 - m0(ids)).abs().max() <= 1e-6, "dropout is not off in eval mode"
        m.train()
    torch.manual_seed(seed + 1)
    ours = ours_loss(m, ids, mask, labels)
    torch.manual_seed(seed + 1)
    theirs = theirs_loss(pm, ids, mask, labels)
    assert abs(ours.item() - theirs.item()) <= TOL32
    ours.backward()
    theirs.backward()
    assert_grads_match(m, pm, names, TOL32)


@pytest.mark.parametrize("method", ["ia3", "prompt", "ptuning_v2", "prefix", "adapter"])
def test_methods_without_dropout_are_deterministic_in_train_mode(seed, method):
    family, _, opts, kw = next(c for c in CASES.values() if c[1] == method) if method != "adapter" else (
        "llama", "adapter", dict(bottleneck=8), {})
    _, m = tiny_hf(family, seed=seed % 10_000, **kw)
    lp.apply(m, method, **opts)
    with torch.no_grad():
        for p in lp.adapter_parameters(m):
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randint(0, PAD, (2, 9))
    m.train()
    with torch.no_grad():
        a, b = m(x), m(x)
        m.eval()
        c = m(x)
    assert torch.equal(a, b) and (a - c).abs().max() <= 1e-6


# -- Houlsby adapter: float64 reference from the paper -------------------------------------------------
def _act(name, x):
    if name == "gelu":  # exact GELU (Hendrycks & Gimpel): x * Phi(x)
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "relu":
        return x.clamp(min=0)
    if name == "silu":
        return x / (1.0 + torch.exp(-x))
    return torch.tanh(x)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family,activation,targets", [
    ("qwen2", "gelu", ["self_attn", "mlp"]), ("qwen2", "relu", ["mlp"]), ("mistral", "silu", ["self_attn"]),
    ("llama", "tanh", ["self_attn", "mlp"])])
def test_houlsby_adapter_gradients_match_float64_reference(f64_reference, seed, family, activation, targets, padding):
    """Houlsby et al. 2019: after a sublayer's output h (attention after o_proj, the MLP after down_proj),
    before the residual add: h + W_up act(W_down h + b_down) + b_up. Reference: the HF model in float64
    with that bottleneck added by forward hooks on its self_attn / mlp modules, weights copied from
    lmstack's adapter."""
    hf, m = tiny_hf(family, seed=seed % 10_000, window=4)  # qwen2: q/k/v bias, tied; mistral: window < T
    lp.apply(m, "adapter", bottleneck=6, activation=activation, target_modules=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lp.adapter_state_dict(m).items():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
            if n.endswith("down.bias"):  # the sublayer outputs are tiny: keep some relu units alive
                p.abs_()
    m.double().train()
    hf.double().train().requires_grad_(False)
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in lp.adapter_state_dict(m).items()}

    def hook(prefix):
        def add_bottleneck(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            z = _act(activation, h @ ref[f"{prefix}.down.weight"].T + ref[f"{prefix}.down.bias"])
            h = h + z @ ref[f"{prefix}.up.weight"].T + ref[f"{prefix}.up.bias"]
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return add_bottleneck

    hooks = [hf.get_submodule(f"model.layers.{i}.{t}").register_forward_hook(hook(f"layers.{i}.{t}"))
             for i in range(m.config.n_layers) for t in targets]
    assert len(ref) == 4 * len(hooks)
    ids, mask, labels = ragged(3, 11, padding == "left", g)
    try:
        theirs = theirs_loss(hf, ids, mask, labels)
    finally:
        for h in hooks:
            h.remove()
    ours = ours_loss(m, ids, mask, labels)
    assert abs(ours.item() - theirs.item()) <= TOL64
    ours.backward()
    theirs.backward()
    for n, p in lp.adapter_state_dict(m).items():
        r = ref[n].grad
        assert r.abs().max() > 0, n
        assert ((p.grad - r).abs().max() / r.abs().max()).item() <= TOL64, n
    assert_base_has_no_grad(m)
