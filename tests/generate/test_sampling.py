"""Logits processors against HF transformers' LogitsProcessors, and the exponential-race sampler."""

import pytest
import torch

from lmstack.generate import (
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    sample,
    top_h_filter,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

tf = pytest.importorskip("transformers")
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation import logits_process as lp  # noqa: E402

from ..hf_models import hf_penalises_padding, needs_hf_top_h  # noqa: E402

needs_top_h = needs_hf_top_h()

B, V, T = 6, 50, 12


def random_logits(ties: bool = False) -> torch.Tensor:
    logits = torch.randn(B, V) * 3
    if ties:  # coarse values: many exact ties, at the top-k / top-p / min-p boundaries too
        logits = logits.round()
    logits[0, :5] = float("-inf")  # already-filtered tokens must stay filtered
    return logits


def left_padding(lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) bool mask, False on the first T - length positions of each row."""
    return torch.arange(T)[None, :] >= (T - lengths)[:, None]


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "different tokens were removed"
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("ties", [False, True])
def test_filters_match_hf(ties):
    logits = random_logits(ties)
    ids = torch.randint(0, V, (B, T))
    for k in (1, 5, 17, V + 3):
        same(top_k_filter(logits, k), lp.TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.0, 0.3, 0.9, 0.999):
        for keep in (1, 3):
            same(top_p_filter(logits, p, keep), lp.TopPLogitsWarper(p, min_tokens_to_keep=keep)(ids, logits.clone()))
    for p in (0.0, 0.05, 0.5, 1.0):
        for keep in (1, 4):
            same(min_p_filter(logits, p, keep), lp.MinPLogitsWarper(p, min_tokens_to_keep=keep)(ids, logits.clone()))
    for mass in (0.2, 0.9, 0.99):
        for keep in (1, 2):
            hf = lp.TypicalLogitsWarper(mass, min_tokens_to_keep=keep)(ids, logits.clone())
            same(typical_filter(logits, mass, keep), hf)
    for temp in (0.3, 1.7):
        same(apply_temperature(logits, temp), lp.TemperatureLogitsWarper(temp)(ids, logits.clone()))


@needs_top_h
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("vocab", [V, 300])  # 300: more tokens than top-H's 100 candidates
def test_top_h_matches_hf(ties, vocab):
    logits = torch.randn(B, vocab) * torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0, 1.0])[:, None]  # flat to peaked
    if ties:
        logits = logits.round()
    logits[0, :5] = float("-inf")  # already filtered
    logits[5, 3:] = float("-inf")  # three finite logits: -inf among the candidates
    ids = torch.randint(0, vocab, (B, T))
    for h in (0.05, 0.3, 0.6, 0.9, 1.0):
        hf = lp.TopHLogitsWarper(h)(ids, logits.clone())
        ours = top_h_filter(logits, h)
        same(ours, hf)
        kept = torch.isfinite(ours).sum(-1)
        assert kept.min() >= 1 and kept.max() <= 100
    assert (torch.isfinite(top_h_filter(logits, 0.3)).sum(-1) <= torch.isfinite(top_h_filter(logits, 0.9)).sum(-1)).all()


def test_processors_are_pure():
    logits = random_logits()
    before = logits.clone()
    ids = torch.randint(0, V, (B, T))
    process_logits(logits, ids, temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, typical_p=0.9, repetition_penalty=1.3)
    assert torch.equal(logits, before)


def test_repetition_penalty_matches_hf_and_skips_padding():
    logits = random_logits()
    ids = torch.randint(0, V, (B, T))
    for penalty in (0.7, 1.3, 2.0):
        hf = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        same(apply_repetition_penalty(logits, ids, penalty), hf)
    # Left padding is skipped: HF's prompt_ignore_length = the row's leading pad positions (one
    # processor per row: transformers before 5.23 takes one int for the whole batch).
    lengths = torch.randint(1, T + 1, (B,))
    mask = left_padding(lengths)
    hf = torch.cat([lp.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=int(T - n))(
        ids[i : i + 1], logits[i : i + 1].clone()) for i, n in enumerate(lengths)])
    same(apply_repetition_penalty(logits, ids, 1.5, mask), hf)


def hf_processors(ids: torch.Tensor, mask: torch.Tensor, **settings) -> lp.LogitsProcessorList:
    """The processor list HF ``generate`` would build for these settings."""
    h = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16))
    gc = GenerationConfig(**settings)
    return h._get_logits_processor(
        generation_config=gc, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids,
        prefix_allowed_tokens_fn=None, logits_processor=lp.LogitsProcessorList(), device="cpu",
        model_kwargs={"attention_mask": mask.long()},
    )


@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.3),
        dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, min_p=0.05, typical_p=0.9),
        dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.6, min_p=0.1, typical_p=0.95, repetition_penalty=0.8),
        dict(do_sample=False, repetition_penalty=1.4),
        pytest.param(dict(do_sample=True, temperature=0.8, top_h=0.5, top_k=20, min_p=0.02), marks=needs_top_h),
        pytest.param(dict(do_sample=False, top_h=0.2), marks=needs_top_h),  # greedy: top-H does not apply
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_process_logits_matches_hf_generate_pipeline(settings, ties):
    logits = random_logits(ties)
    ids = torch.randint(0, V, (B, T))
    lengths = torch.randint(1, T + 1, (B,))
    if "repetition_penalty" in settings and hf_penalises_padding():
        lengths.fill_(T)  # an older transformers penalises padding too: compare unpadded rows
    mask = left_padding(lengths)
    hf = hf_processors(ids, mask, **settings)(ids, logits.clone())
    ours = dict(settings)
    if not ours.pop("do_sample"):
        ours["temperature"] = 0.0
    same(process_logits(logits, ids, input_mask=mask, **ours), hf)


def test_process_logits_neutral_settings_are_identity():
    logits = random_logits()
    out = process_logits(logits, None, temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
    assert torch.equal(out, logits)


def test_sample_is_seeded_and_never_draws_removed_tokens():
    logits = top_k_filter(torch.randn(64, V), 7)
    a = sample(logits, torch.Generator().manual_seed(11))
    b = sample(logits, torch.Generator().manual_seed(11))
    c = sample(logits, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (64,) and a.dtype == torch.long
    assert torch.isfinite(logits.gather(1, torch.cat([a, c]).view(2, 64).T)).all()


def test_sample_distribution_matches_softmax():
    n, v = 200_000, 8
    logits = torch.randn(v) * 1.5
    logits[3] = float("-inf")
    seed = int(torch.randint(0, 2**31, ()).item())
    draws = sample(logits.expand(n, v), torch.Generator().manual_seed(seed))  # one batched call
    counts = torch.bincount(draws, minlength=v).double()
    probs = torch.softmax(logits.double(), -1)
    assert counts[3] == 0
    live = probs > 0
    expected = probs[live] * n
    chi2 = ((counts[live] - expected) ** 2 / expected).sum().item()
    # 6 degrees of freedom: P(chi2 > 40) ~ 5e-7.
    assert chi2 < 40, f"chi2={chi2:.1f} (seed {seed})"


def test_greedy_process_ignores_warpers():
    logits = random_logits()
    out = process_logits(logits, None, temperature=0.0, top_k=1, typical_p=0.1)
    assert torch.equal(out, logits)
