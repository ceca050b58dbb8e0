"""Beam sampling against HF ``generate(num_beams=N, do_sample=True)`` on the same random weights.

HF draws each step's ``K`` candidates with ``torch.multinomial`` from torch's global generator;
lmstack makes the same draw from a generator seeded with ``seed``, so after
``torch.manual_seed(s)`` HF must return exactly the sequences and scores that
``generate(..., seed=s)`` does. The model is not sharpened (``scale=1``), so the beams really
depend on the draws: a different seed gives different beams (checked), and a mistake in what is
drawn from, how many tokens a filter keeps or how the drawn candidates are ordered changes them.
The seeds compared are those whose beams lmstack draws alike when its logits are shaken by ±1e-5
(``well_drawn_seeds``): a few seeds in 100 hold a near-tie that fp32 rounding decides, and
transformers and lmstack round differently (here 2 runs in 11,000 differed before, the flaky
failures of ``typical-never`` seen in CI).
"""

import pytest
import torch

from lmstack.generate import generate
from lmstack.generate.beam import top_candidates

from ..hf_models import (hf_has_top_h, hf_penalises_padding, needs_hf_sorting_beam_samples, no_special_tokens,
                         ragged_batch, tiny_hf, well_drawn_seeds)

pytest.importorskip("transformers")
needs_sorting_hf = needs_hf_sorting_beam_samples()

V = 128
PAD = V - 1
EOS = 94


@pytest.fixture
def llama(unsharp):
    return unsharp


@pytest.fixture(scope="module")
def batch():
    return ragged_batch([6, 11])  # left padding on prompt 0


def hf_beam_sample(h, ids, mask, n, seed, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        out = h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=True, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, out.sequences_scores


def assert_matches_hf(h, m, ids, mask, n, seed, count: int = 1, **kw):
    """HF's and lmstack's beam sampling on ``count`` well-drawn seeds from ``seed`` on: the same
    sequences and scores."""
    kw.setdefault("top_k", 0)  # off unless given (HF's default is 50, lmstack's none)
    for s in well_drawn_seeds(seed % 2**31, count, m, lambda s: generate(m, ids, n, attention_mask=mask, seed=s, **kw)):
        ref, ref_scores = hf_beam_sample(h, ids, mask, n, s, **kw)
        out = generate(m, ids, n, attention_mask=mask, seed=s, **kw)
        assert out.sequences.shape == ref.shape, (s, out.sequences.shape, ref.shape)
        assert torch.equal(out.sequences, ref), (s, out.sequences[:, ids.shape[1]:], ref[:, ids.shape[1]:])
        torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=4e-7)


SETTINGS = {
    "plain": dict(num_beams=4, num_return_sequences=2, temperature=1.0),
    "top-k": dict(num_beams=4, num_return_sequences=4, temperature=0.7, top_k=5),
    # top_k=1: HF keeps K / N = 3 tokens per beam (two EOS ids), not 1
    "top-k-1-two-eos": dict(num_beams=3, num_return_sequences=3, temperature=1.3, top_k=1, top_p=0.9,
                            eos_token_id=[23, EOS]),
    "min-p-penalty-early": dict(num_beams=4, num_return_sequences=2, temperature=2.0, min_p=0.1,
                                repetition_penalty=1.3, early_stopping=True),
    "typical-never": dict(num_beams=2, temperature=1.0, top_k=50, typical_p=0.8, length_penalty=2.0,
                          early_stopping="never"),
    "top-p-short": dict(num_beams=3, num_return_sequences=2, temperature=0.5, top_p=0.7, length_penalty=-1.0),
    "top-h": dict(num_beams=3, num_return_sequences=2, temperature=1.2, top_h=0.8),
}


@needs_sorting_hf
@pytest.mark.parametrize("name", SETTINGS)
def test_beam_sampling_matches_hf(llama, batch, seed, name):
    h, m = llama
    ids, mask = batch
    kw = {"eos_token_id": EOS, "pad_token_id": PAD, **SETTINGS[name]}
    if "top_h" in kw and not hf_has_top_h():
        pytest.skip("this transformers has no top_h: no reference")
    if "repetition_penalty" in kw and hf_penalises_padding():  # compare on one unpadded prompt
        ids, mask = ragged_batch([9], seed=seed % 1000)
    assert_matches_hf(h, m, ids, mask, 14, seed, count=2, **kw)


def test_the_draws_matter(llama, batch, seed):
    """Different seeds give different beams, none of them the deterministic search's."""
    _, m = llama
    ids, mask = batch
    kw = dict(num_beams=4, num_return_sequences=2, eos_token_id=EOS, pad_token_id=PAD, attention_mask=mask)
    drawn = {tuple(generate(m, ids, 10, temperature=1.0, seed=seed + k, **kw).sequences.flatten().tolist())
             for k in range(4)}
    searched = tuple(generate(m, ids, 10, **kw).sequences.flatten().tolist())
    assert len(drawn) > 1 and searched not in drawn


def test_seed_none_draws_from_the_global_generator(llama, batch, seed):
    _, m = llama
    ids, mask = batch
    kw = dict(num_beams=3, temperature=0.8, top_k=20, eos_token_id=EOS, pad_token_id=PAD, attention_mask=mask)
    torch.manual_seed(seed)
    a = generate(m, ids, 8, **kw)
    b = generate(m, ids, 8, seed=seed, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.scores, b.scores)


@needs_sorting_hf
@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_beam_sampling_matches_hf_other_families(family, seed):
    h, m = tiny_hf(family, seed=1)  # mistral: sliding window 8 < prompt + new tokens
    no_special_tokens(h)
    ids, mask = ragged_batch([7, 4], seed=1)
    assert_matches_hf(h, m, ids, mask, 12, seed, num_beams=4, num_return_sequences=2, temperature=1.0,
                      top_k=30, eos_token_id=EOS, pad_token_id=PAD)


def test_ragged_list_input_equals_padded_tensor(llama, batch, seed):
    _, m = llama
    ids, mask = batch
    prompts = [row[mask_row.bool()].tolist() for row, mask_row in zip(ids, mask)]
    kw = dict(num_beams=4, num_return_sequences=2, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD, seed=seed)
    a = generate(m, prompts, 10, **kw)
    b = generate(m, ids, 10, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.scores, b.scores)


@needs_sorting_hf
def test_filters_that_keep_too_few_tokens(llama, batch, seed):
    """8 beams, top_k=1 and one new token: only 2 real hypotheses per prompt (HF fills the other
    slots with placeholder rows scored -1e9): asking for 8 is a one-line error, for 2 matches HF."""
    h, m = llama
    ids, mask = batch
    kw = dict(num_beams=8, temperature=1.0, top_k=1)
    with pytest.raises(ValueError, match=r"found 2 hypotheses for prompt 0, fewer than num_return_sequences=8.*top_k=1"):
        generate(m, ids, 1, attention_mask=mask, seed=seed, num_return_sequences=8, **kw)
    assert_matches_hf(h, m, ids, mask, 1, seed, num_return_sequences=2, **kw)


def test_no_distribution_to_draw_from():
    logp = torch.full((2, 5), -1.0)
    logp[1, 2] = float("nan")
    with pytest.raises(ValueError, match="beam sampling met scores with no distribution to draw from"):
        top_candidates(logp, torch.zeros(1, 2), 4, sample=True)


def test_static_cache_draws_the_same_beams(llama, batch, seed):
    """The static-shape cache (CUDA graphs' path) feeds beam sampling the same logits: same beams."""
    _, m = llama
    ids, mask = batch
    kw = dict(num_beams=3, num_return_sequences=2, temperature=1.0, top_p=0.9, eos_token_id=EOS, pad_token_id=PAD,
              attention_mask=mask, seed=seed)
    a, b = generate(m, ids, 12, **kw), generate(m, ids, 12, static_cache=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
