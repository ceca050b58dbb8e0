"""Random-init tiny Hugging Face models and the same weights in lmstack, for parity tests."""

from __future__ import annotations

import json

import torch

import lmstack

FAMILIES = ("llama", "qwen2", "mistral")


def load_hf(path):
    """``AutoModelForCausalLM.from_pretrained(path)`` in fp32, eval mode (transformers before 4.56
    names the dtype keyword ``torch_dtype``)."""
    import transformers as tf

    from lmstack.kernels import version_tuple

    key = "dtype" if version_tuple(tf.__version__) >= (4, 56) else "torch_dtype"
    return tf.AutoModelForCausalLM.from_pretrained(path, **{key: torch.float32}).eval()


def tiny_hf(family: str = "llama", *, vocab=128, dim=64, layers=2, heads=4, kv_heads=2, ffn=96, max_len=128,
            window=None, tied=None, scale=1.0, seed=0):
    """(hf_model, lmstack_model) with identical weights, fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=max_len)
    if family == "llama":
        hc = tf.LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=bool(tied))
        hf = tf.LlamaForCausalLM(hc)
    elif family == "qwen2":
        hc = tf.Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=True if tied is None else tied)
        hf = tf.Qwen2ForCausalLM(hc)
    elif family == "mistral":
        hc = tf.MistralConfig(**common, rms_norm_eps=1e-5, sliding_window=window or 8, tie_word_embeddings=bool(tied))
        hf = tf.MistralForCausalLM(hc)
    else:
        raise ValueError(family)
    hf.eval()
    if scale != 1.0:  # peaked output distributions: no near-ties in greedy/beam comparisons
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if p.dim() == 2:
                    p.mul_(scale)
    cfg = lmstack.ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, ffn_dim=ffn,
        max_seq_len=max_len, norm_eps=hc.rms_norm_eps, tie_embeddings=hc.tie_word_embeddings,
        qkv_bias=family == "qwen2", sliding_window=(window or 8) if family == "mistral" else None,
    )
    m = lmstack.Transformer(cfg)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf, m.eval()


def no_special_tokens(h):
    """Only what a test passes: the config's default EOS would stop HF where lmstack does not."""
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(h.generation_config, name, None)
    return h


def hf_generate(h, ids, mask, n, **kw):
    """HF ``generate`` greedy or beam search with scores: (sequences, sequences_scores or None)."""
    with torch.no_grad():
        out = h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, getattr(out, "sequences_scores", None)


def sharp_llama(seed: int = 0):
    """A tiny random Llama (HF, lmstack) with weights scaled up 3x, so next-token distributions are
    peaked and no greedy or beam comparison is a near-tie; no special tokens (a test passes its own)."""
    h, m = tiny_hf("llama", scale=3.0, seed=seed)
    return no_special_tokens(h), m


def ragged_batch(lengths, seed=0, *, vocab=128, pad=127):
    """Random prompts of the given lengths (ids below ``pad``), left-padded with ``pad``:
    ids (B, T), mask (B, T) 0 at padding."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(0, min(vocab, pad), (n,), generator=g)
        mask[i, T - n :] = 1
    return ids, mask


def hf_sorts_beam_samples() -> bool:
    """Whether this transformers' beam sampling sorts the candidates it draws by score (5.24 does;
    4.57 and 5.17 keep them in draw order, so their "best N" are the first N drawn). lmstack sorts,
    so beam-sampling parity can only be checked against a transformers that sorts."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    fn = getattr(GenerationMixin, "_get_top_k_continuations", None)
    return fn is not None and ".sort(" in inspect.getsource(fn)


def needs_hf_sorting_beam_samples():
    """A skip mark for beam-sampling parity tests under a transformers that does not sort."""
    import pytest

    return pytest.mark.skipif(not hf_sorts_beam_samples(), reason="this transformers keeps drawn beam candidates "
                              "in draw order; newer ones (5.24), and lmstack, sort them: no reference")


# -- beam sampling: seeds that the algorithm decides, not rounding --------------------------------
LOGIT_NOISE = 1e-5


def drawn_alike_under_noise(m, run, noise: float = LOGIT_NOISE, pairs: int = 2) -> bool:
    """Whether ``run()`` (a ``generate`` call on the lmstack model ``m``) returns the same sequences
    when every logit ``m`` computes is moved by +z and by -z, z ~ N(0, noise), for ``pairs`` draws
    of z.

    Sampled beams are a chaotic function of the logits: the order of two candidates a few fp32 ulps
    apart (beam scores summed to -20 .. -60), a filter's cut or a draw's boundary can be decided by
    rounding alone, and transformers and lmstack round differently (their fp32 logits are ~1e-6
    apart). Such a seed tests nothing: measured on the tiny models here, 2 of 11,000 runs differed
    from transformers' at weight scale 1, and 1 in 90 with top-k at scale 3. ±z moves each such
    margin by ~noise, one way or the other, so a run that survives both is decided by the
    algorithm and must equal transformers' exactly: all 17 differing runs examined fail this check
    (13 of them at noise 3e-6 too), and of 4,800 runs checked none that passed it differed."""
    base = run().sequences
    for k in range(2 * pairs):
        g = torch.Generator().manual_seed(k // 2)
        sign = 1.0 if k % 2 == 0 else -1.0

        def shake(module, args, out, g=g, sign=sign):
            return out + sign * noise * torch.randn(out.shape, generator=g, dtype=out.dtype)

        handle = m.register_forward_hook(shake)
        try:
            out = run().sequences
        finally:
            handle.remove()
        if out.shape != base.shape or not torch.equal(out, base):
            return False
    return True


def well_drawn_seeds(first: int, count: int, m, run, tries: int = 12) -> list[int]:
    """The first ``count`` seeds from ``first`` on whose ``run(seed)`` is ``drawn_alike_under_noise``
    (0-13% of seeds fail that here, by setting); an error if fewer than ``count`` of ``tries`` pass,
    which would mean lmstack's beam sampling itself is unstable."""
    seeds = []
    for s in range(first, first + tries):
        if drawn_alike_under_noise(m, lambda: run(s % 2**31)):
            seeds.append(s % 2**31)
            if len(seeds) == count:
                return seeds
    raise AssertionError(f"only {len(seeds)} of {tries} seeds from {first} give beams that logit noise of "
                         f"{LOGIT_NOISE} leaves alone")


def hf_has_top_h() -> bool:
    """Whether this transformers has the top-H sampling filter (``top_h``; 5.x)."""
    from transformers.generation import logits_process

    return hasattr(logits_process, "TopHLogitsWarper")


def needs_hf_top_h():
    """A skip mark for top-H parity tests under a transformers without it."""
    import pytest

    return pytest.mark.skipif(not hf_has_top_h(), reason="this transformers has no top_h (TopHLogitsWarper): "
                              "no reference")


def hf_penalises_padding() -> bool:
    """Whether this transformers' ``generate`` counts left-padding tokens in ``repetition_penalty``
    (5.17 did; 5.24 leaves them out through the attention mask, as lmstack does). Parity tests of
    padded batches with a penalty can only match the newer behaviour."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "prompt_ignore_length=" not in inspect.getsource(GenerationMixin._get_logits_processor)


def edit_json(path, **changes):
    """Rewrite the JSON object in file ``path``: each key set to its value, or removed where the
    value is ``KeyError``. Returns the path's folder."""
    from pathlib import Path

    path = Path(path)
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is KeyError:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj))
    return path.parent


def hf_is_5() -> bool:
    import transformers as tf

    from lmstack.kernels import version_tuple

    return version_tuple(tf.__version__) >= (5, 0)


def rope_as_4x(params: dict) -> dict:
    """transformers 5's ``rope_parameters`` (rope_type, rope_theta and the scaling's fields) as 4.x
    spells them: ``rope_theta`` and ``rope_scaling`` (None when plain)."""
    rest = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": params.get("rope_theta", 10000.0),
            "rope_scaling": None if rest.get("rope_type", "default") == "default" else rest}


def hf_rope_fields(params: dict) -> dict:
    """Config keywords for RoPE ``params`` (5.x's ``rope_parameters``) in the installed transformers'
    spelling: 4.x keeps an unknown ``rope_parameters`` without using it, so it gets ``rope_as_4x``."""
    return {"rope_parameters": dict(params)} if hf_is_5() else rope_as_4x(params)


def hf_rope(hc) -> dict:
    """An HF config's RoPE as transformers 5's ``rope_parameters`` dict, whichever version made it."""
    params = getattr(hc, "rope_parameters", None)
    if params:
        return dict(params)
    return {"rope_type": "default", **(getattr(hc, "rope_scaling", None) or {}), "rope_theta": hc.rope_theta}
