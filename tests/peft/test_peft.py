"""lmstack.peft: every method trains only its own parameters, saves/loads exactly, works with the
KV cache and generate, merges exactly (LoRA, IA3) and switches off to exactly the base model."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lmstack
import lmstack.peft as peft
from lmstack.peft.common import AdapterModule

V, DIM, L, H, HKV, HD, FFN = 128, 64, 2, 4, 2, 16, 96
KV = HKV * HD
OPTIONS = {
    "lora": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "adapter": dict(bottleneck=8),
    "prefix": dict(num_virtual_tokens=3, encoder_hidden_size=24),
    "ptuning_v2": dict(num_virtual_tokens=4),
    "prompt": dict(num_virtual_tokens=5),
    "ia3": dict(),
}
METHODS = list(OPTIONS)


def tiny(qkv_bias=True, std=0.2):
    """A tiny GQA model; std 0.2 makes next-token distributions peaked (no greedy near-ties)."""
    cfg = lmstack.ModelConfig(vocab_size=V, dim=DIM, n_layers=L, n_heads=H, n_kv_heads=HKV, ffn_dim=FFN,
                              max_seq_len=64, qkv_bias=qkv_bias, init_std=std)
    m = lmstack.Transformer(cfg).eval()
    if qkv_bias:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return m


def adapted(method, base=None):
    """(base model, a deep copy with ``method`` applied and its adapter weights randomised)."""
    base = base if base is not None else tiny()
    m = peft.apply(copy.deepcopy(base), method, **OPTIONS[method])
    with torch.no_grad():
        for p in peft.adapter_parameters(m):
            p.add_(torch.randn_like(p) * 0.2)
    return base, m


def logits(m, x, **kw):
    with torch.no_grad():
        return m(x, **kw)


# -- trainable parameters --------------------------------------------------------------------------
LINEAR_SHAPES = {"q_proj": (DIM, H * HD), "k_proj": (DIM, KV), "v_proj": (DIM, KV), "o_proj": (H * HD, DIM),
                 "gate_proj": (DIM, FFN), "up_proj": (DIM, FFN), "down_proj": (FFN, DIM)}  # (in, out)


def expected_count(method, o):
    if method == "lora":  # r * (in + out) per targeted linear map
        return L * sum(o["r"] * sum(LINEAR_SHAPES[t]) for t in o["target_modules"])
    if method == "adapter":  # two biased maps dim -> b -> dim, after attention and after the MLP
        b = o["bottleneck"]
        return L * 2 * (2 * DIM * b + b + DIM)
    if method == "prefix":  # embedding (P, kv) + Linear(kv, h) + Linear(h, L*2*kv)
        P, h = o["num_virtual_tokens"], o["encoder_hidden_size"]
        return P * KV + (KV * h + h) + (h * L * 2 * KV + L * 2 * KV)
    if method == "ptuning_v2":  # one key and one value vector per layer and virtual token
        return o["num_virtual_tokens"] * L * 2 * KV
    if method == "prompt":  # one embedding per virtual token
        return o["num_virtual_tokens"] * DIM
    if method == "ia3":  # a scale per k and v output channel and per FFN activation
        return L * (KV + KV + FFN)
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameter_count(method):
    m = peft.apply(tiny(), method, **OPTIONS[method])
    n = expected_count(method, OPTIONS[method])
    assert peft.trainable_parameters(m) == n
    assert sum(p.numel() for p in peft.adapter_state_dict(m).values()) == n
    assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in peft.adapter_parameters(m)}


def test_lora_all_linear_and_rslora_scale():
    m = peft.apply(tiny(), "lora", r=4, alpha=8, target_modules="all-linear", use_rslora=True)
    wrapped = [n for n, mod in m.named_modules() if isinstance(mod, peft.lora.LoRALinear)]
    assert len(wrapped) == L * 7 and "lm_head" not in wrapped
    assert peft.trainable_parameters(m) == L * sum(4 * (i + o) for i, o in LINEAR_SHAPES.values())
    assert all(mod.scaling == 8 / 2 for mod in m.modules() if isinstance(mod, peft.lora.LoRALinear))


# -- identity at init, disable_adapters ------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "adapter", "ia3"])
def test_identity_at_init(seed, method):
    base = tiny()
    m = peft.apply(copy.deepcopy(base), method, **OPTIONS[method])
    x = torch.randint(0, V, (2, 9))
    assert torch.equal(logits(m, x), logits(base, x))


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapters_is_exactly_the_base_model(seed, method):
    base, m = adapted(method)
    x = torch.randint(0, V, (2, 11))
    out = logits(m, x)
    with peft.disable_adapters(m):
        assert torch.equal(logits(m, x), logits(base, x))
    assert torch.equal(logits(m, x), out)
    assert (out - logits(base, x)).abs().max() > 1e-3


# -- training touches only the adapter ---------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_base_weights_bit_identical_after_training(seed, method):
    _, m = adapted(method)
    m.train()
    params = list(m.parameters())
    before = [p.detach().clone() for p in params]
    trainable = {id(p) for p in peft.adapter_parameters(m)}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)  # all of them: frozen ones get no grad
    for _ in range(3):
        x = torch.randint(0, V, (2, 12))
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, b in zip(params, before):
        if id(p) in trainable:
            assert not torch.equal(p, b)
        else:
            assert torch.equal(p, b), "a frozen base weight changed"


# -- save / load -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_load_lmstack_format_exact(tmp_path, seed, method):
    base, m = adapted(method)
    x = torch.randint(0, V, (2, 10))
    out = logits(m, x)
    peft.save_adapter(m, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.json", "adapter.safetensors"]
    loaded = peft.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(logits(loaded, x), out)
    assert loaded.peft_config == m.peft_config
    # the same method and options: weights go into the existing adapter
    _, other = adapted(method, base)
    assert torch.equal(logits(peft.load_adapter(other, tmp_path / "a"), x), out)


def test_load_adapter_errors(tmp_path, seed):
    base, m = adapted("lora")
    peft.save_adapter(m, tmp_path / "a")
    with pytest.raises(ValueError, match="holds a 'lora' adapter.*already has"):
        peft.load_adapter(peft.apply(copy.deepcopy(base), "ia3"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        peft.load_adapter(copy.deepcopy(base), tmp_path)
    other = tiny()
    other_cfg = lmstack.ModelConfig(**{**other.config.to_dict(), "ffn_dim": 80})
    with pytest.raises(ValueError, match="down_proj.lora_A.weight' has shape"):
        peft.load_adapter(lmstack.Transformer(other_cfg), tmp_path / "a")


# -- KV cache and generate --------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_cache_matches_full_forward(seed, method):
    _, m = adapted(method)
    x = torch.randint(0, V, (2, 12))
    full = logits(m, x)
    cache = m.setup_cache(2, 12)
    steps = [logits(m, x[:, :7], cache=cache)] + [logits(m, x[:, t : t + 1], cache=cache) for t in range(7, 12)]
    # fp32 rounding: the plain model shows ~1e-6 relative differences at this weight scale too
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5 * full.abs().max()


@pytest.mark.parametrize("method", METHODS)
def test_generate_greedy_equals_argmax_loop(seed, method):
    _, m = adapted(method)
    x = torch.randint(0, V, (2, 6))
    out = lmstack.generate(m, x, max_new_tokens=6).sequences
    seq = x
    for _ in range(6):
        seq = torch.cat([seq, logits(m, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_left_padded_batch_equals_single_prompts(seed, method):
    """Padding masks get columns for the virtual positions: a padded row decodes as it does alone."""
    _, m = adapted(method)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 7, 5)]
    batch = lmstack.generate(m, prompts, max_new_tokens=5).sequences[:, -5:]
    for row, p in zip(batch, prompts):
        assert torch.equal(row, lmstack.generate(m, [p], max_new_tokens=5).sequences[0, -5:])


def test_virtual_tokens_count_against_the_context(seed):
    _, m = adapted("prompt")  # 5 virtual tokens, context 64
    with pytest.raises(ValueError, match=r"= 64 exceeds the model context of 59 \(max_seq_len=64 less 5 virtual tokens\)"):
        lmstack.generate(m, torch.randint(0, V, (1, 40)), max_new_tokens=24)
    assert m(torch.randint(0, V, (1, 59))).shape == (1, 59, V)
    with pytest.raises(ValueError, match="exceeds the model context"):
        m(torch.randint(0, V, (1, 60)))


def test_packed_batches_refused_with_virtual_tokens(seed):
    _, m = adapted("ptuning_v2")
    x = torch.randint(0, V, (1, 8))
    seqs = lmstack.Seqs.from_doc_ids(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="packed sequences"):
        m(x, seqs=seqs)


# -- merge / unmerge -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merge_unmerge_and_merge_and_unload(tmp_path, seed, method):
    base, m = adapted(method, tiny(std=0.02))  # HF's init scale: logits ~1, so 1e-5 is fp32 rounding
    x = torch.randint(0, V, (2, 10))
    out = logits(m, x)
    weights = {n: p.detach().clone() for n, p in m.named_parameters() if "base_layer" in n}
    peft.merge(m)
    assert (logits(m, x) - out).abs().max() < 1e-5
    changed = [n for n, p in m.named_parameters() if "base_layer" in n and not torch.equal(p, weights[n])]
    assert changed  # the update really went into the base weights
    peft.unmerge(m)
    for n, p in m.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=1e-7)
    assert (logits(m, x) - out).abs().max() < 1e-5

    plain = peft.merge_and_unload(m)
    assert not any(isinstance(mod, AdapterModule) for mod in plain.modules())
    assert plain.state_dict().keys() == base.state_dict().keys()
    assert not hasattr(plain, "peft_config") and all(p.requires_grad for p in plain.parameters())
    assert (logits(plain, x) - out).abs().max() < 1e-5
    back = lmstack.from_hf(lmstack.to_hf(plain, tmp_path / "hf"))
    assert torch.equal(logits(back, x), logits(plain, x))


@pytest.mark.parametrize("method", ["adapter", "prompt"])
def test_unmergeable_methods_refuse(method):
    _, m = adapted(method)
    with pytest.raises(ValueError, match="cannot be merged"):
        peft.merge_and_unload(m)


@pytest.mark.parametrize("method", METHODS)
def test_to_hf_refuses_an_adapted_model(tmp_path, method):
    """Its adapter tensors have no HF names; nothing is written."""
    _, m = adapted(method)
    with pytest.raises(ValueError, match=f"has a '{method}' adapter; to_hf writes plain models"):
        lmstack.to_hf(m, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_fold_prefix_is_exact(seed):
    _, m = adapted("prefix")
    x = torch.randint(0, V, (2, 9))
    out = logits(m, x)
    peft.fold(m)
    assert not any(n.startswith("prefix_encoder.mlp") for n in peft.adapter_state_dict(m))
    assert peft.trainable_parameters(m) == 3 * L * 2 * KV
    assert torch.equal(logits(m, x), out)


@pytest.mark.parametrize("method", METHODS)
def test_unload_restores_the_plain_model(seed, method):
    base, m = adapted(method)
    peft.unload(m)
    x = torch.randint(0, V, (1, 8))
    assert torch.equal(logits(m, x), logits(base, x))
    assert m.state_dict().keys() == base.state_dict().keys() and m.virtual_tokens == 0
    peft.apply(m, "lora")  # a plain model again: another method can go on


# -- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,targets", [
    ("lora", ["q_proj", "qq_proj"]), ("ia3", ["k_proj", "down_proj", "qq_proj"]), ("adapter", ["mlp", "qq_proj"]),
])
def test_unmatched_target_names_raise(method, targets):
    m = tiny()
    with pytest.raises(ValueError, match=r"target_modules \['qq_proj'\] matched no .*names that exist: .*'q_proj'"):
        peft.apply(m, method, target_modules=targets)
    assert all(p.requires_grad for p in m.parameters())  # nothing changed
    assert not any(isinstance(mod, AdapterModule) for mod in m.modules())


def test_bad_method_options_and_stacking_raise():
    m = tiny()
    with pytest.raises(ValueError, match="unknown PEFT method 'loha'; valid: lora, adapter"):
        peft.apply(m, "loha")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\] for PEFT method 'lora'"):
        peft.apply(m, "lora", rank=4)
    with pytest.raises(ValueError, match="feedforward_modules \\['up_proj'\\] must also be in target_modules"):
        peft.apply(m, "ia3", feedforward_modules=["up_proj"])
    peft.apply(m, "lora")
    with pytest.raises(ValueError, match="already has a 'lora' adapter; stacking"):
        peft.apply(m, "prompt")
    with pytest.raises(ValueError, match="no PEFT adapter"):
        peft.merge(tiny())


def test_prompt_init_from_vocabulary():
    m = tiny()
    emb = m.embed_tokens.weight.detach().clone()
    peft.apply(m, "prompt", num_virtual_tokens=5, init_token_ids=[7, 3])
    assert torch.equal(m.virtual_embeds.weight, emb[[7, 3, 7, 3, 7]])

    class Tok:
        def encode(self, text):
            return [ord(c) % V for c in text]

    m2 = peft.apply(tiny(), "prompt", num_virtual_tokens=2, init_text="hello", tokenizer=Tok())
    assert torch.equal(m2.virtual_embeds.weight, m2.embed_tokens.weight[[ord("h"), ord("e")]])
    assert "init_text" not in m2.peft_config["options"]
    with pytest.raises(ValueError, match="init_text needs tokenizer"):
        peft.apply(tiny(), "prompt", init_text="hi")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["prefix", "ptuning_v2"])
def test_prefix_init_from_text_is_the_base_model_reading_the_text(seed, method):
    """Initialised from text, the prefixes are the model's own keys/values for it: the adapted model
    on x gives exactly the base model's logits on [text, x] at x's positions, with and without a cache."""
    torch.manual_seed(seed)
    base = tiny()
    P = 5
    text = torch.randint(0, V, (3,)).tolist()  # shorter than P: repeated to length, as prompt tuning's
    m = peft.apply(copy.deepcopy(base), method, num_virtual_tokens=P, init_token_ids=text)
    x = torch.randint(0, V, (2, 9))
    ids = (text * 2)[:P]
    want = logits(base, torch.cat([torch.tensor([ids] * 2), x], dim=1))[:, P:]
    got = logits(m, x)
    assert (got - want).abs().max() <= 1e-4
    cache = m.setup_cache(2, 9)
    stepped = torch.cat([logits(m, x[:, :4], cache=cache), logits(m, x[:, 4:], cache=cache)], dim=1)
    assert (stepped - want).abs().max() <= 1e-4
    assert m.prefix_encoder.folded == (method == "ptuning_v2")  # prefix: the MLP was solved, not folded
    assert not {"init_token_ids", "init_text", "tokenizer"} & set(m.peft_config["options"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        peft.apply(copy.deepcopy(base), method, num_virtual_tokens=P, init_token_ids=[V + 1])


@pytest.mark.parametrize("target, what", [("k_proj", "outputs 32 features, not dim=64"), ("layers", "is a container")])
def test_adapter_targets_must_write_the_residual_width(target, what):
    """A Houlsby adapter reads and writes its sublayer's (..., dim) output: a narrower projection
    or the layer list is refused when applied, not at the first forward with a shape error."""
    m = tiny()
    assert m.config.dim == 64 and m.config.n_kv_heads * m.config.head_dim == 32
    with pytest.raises(ValueError, match=what):
        peft.apply(m, "adapter", target_modules=[target])
    assert not any(isinstance(x, AdapterModule) for x in m.modules())


def test_adapters_on_a_bf16_base_are_float32():
    """As HF peft: in bf16 most of AdamW's small adapter updates would round away."""
    for method in ("lora", "ia3", "adapter", "prompt", "prefix"):
        m = tiny().to(torch.bfloat16)
        peft.apply(m, method)
        assert {p.dtype for p in peft.adapter_parameters(m)} == {torch.float32}, method
        assert {p.dtype for n, p in m.named_parameters() if not p.requires_grad} == {torch.bfloat16}
        assert m(torch.randint(0, m.config.vocab_size, (2, 5))).dtype == torch.bfloat16
