"""Sampling (``num_beams=1``) against HF ``generate(do_sample=True)`` token for token.

HF draws each step's token with ``torch.multinomial(probs, 1)`` from torch's global generator. On
the CPU that is an exponential race (``probs / E``, ``E ~ Exp(1)`` drawn for the whole ``(B, V)``
block, then argmax), the draw ``lmstack.generate.sampling.sample`` makes, so ``generate(...,
seed=s)`` and HF after ``torch.manual_seed(s)`` must give the same tokens in every row whenever
the processed distributions are the same. A filter that keeps one token too many or too few, a
temperature applied in the wrong place, a position or padding mistake in a ragged batch, a
finished row left unpadded, ``num_return_sequences`` rows in another order or guidance mixed in
wrongly changes them. The model is not sharpened, so the draws decide the text (checked: other
seeds give other text). Seeds are those ``well_drawn_seeds`` keeps (rounding cannot decide their
draws), and the recorded step scores must equal HF's too.
"""

import pytest
import torch

from lmstack.generate import generate, generate_stream

from ..hf_models import needs_hf_top_h, no_special_tokens, ragged_batch, tiny_hf, well_drawn_seeds

pytest.importorskip("transformers")

V = 128
PAD = V - 1
EOS = 94


@pytest.fixture(scope="module")
def prompts():
    return ragged_batch([6, 11, 1], seed=3)  # left padding on prompts 0 and 2; prompt 2 is one token


def hf_sample(h, ids, mask, n, seed, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=True, output_scores=True,
                          return_dict_in_generate=True, **kw)


def assert_samples_match_hf(h, m, ids, mask, n, seed, **kw):
    kw = {"top_k": 0, "eos_token_id": EOS, "pad_token_id": PAD, **kw}  # top-k off unless given (HF's default: 50)
    s, = well_drawn_seeds(seed % 2**31, 1, m, lambda s: generate(m, ids, n, attention_mask=mask, seed=s, **kw))
    ref = hf_sample(h, ids, mask, n, s, **kw)
    out = generate(m, ids, n, attention_mask=mask, seed=s, output_scores=True, **kw)
    T = ids.shape[1]
    assert out.sequences.shape == ref.sequences.shape, (s, out.sequences.shape, ref.sequences.shape)
    assert torch.equal(out.sequences, ref.sequences), (s, out.sequences[:, T:], ref.sequences[:, T:])
    assert len(out.step_scores) == len(ref.scores)
    for t, (a, b) in enumerate(zip(out.step_scores, ref.scores)):
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"seed {s}, step {t}: other tokens removed"
        torch.testing.assert_close(a[torch.isfinite(b)], b[torch.isfinite(b)], atol=1e-4, rtol=1e-5)
    return out


SETTINGS = {
    "plain": dict(temperature=1.0),
    "top-k": dict(temperature=0.7, top_k=5),
    "top-p-min-p": dict(temperature=1.3, top_p=0.9, min_p=0.05),
    "typical-penalty": dict(temperature=1.0, typical_p=0.8, repetition_penalty=1.3),
    "epsilon": dict(temperature=1.5, epsilon_cutoff=0.01),
    "eta-three-samples": dict(temperature=1.0, eta_cutoff=0.003, num_return_sequences=3),
    "min-new-tokens-two-eos": dict(temperature=1.2, top_k=40, min_new_tokens=3, eos_token_id=[23, EOS]),
    "guided": dict(temperature=1.0, top_k=30, guidance_scale=1.5),
    "top-h": dict(temperature=1.0, top_h=0.6),
    "top-h-top-p": dict(temperature=1.4, top_h=0.9, top_p=0.8),
}
NEEDS = {"top-h": needs_hf_top_h(), "top-h-top-p": needs_hf_top_h()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=NEEDS.get(n, ())) for n in SETTINGS])
def test_sampling_matches_hf_token_for_token(unsharp, prompts, seed, name):
    h, m = unsharp
    ids, mask = prompts
    assert_samples_match_hf(h, m, ids, mask, 24, seed, **SETTINGS[name])


def test_guided_by_a_negative_prompt_matches_hf(unsharp, prompts, seed):
    h, m = unsharp
    ids, mask = prompts
    neg, neg_mask = ragged_batch([4, 14, 5], seed=seed % 1000)  # one longer than every prompt
    assert_samples_match_hf(h, m, ids, mask, 16, seed, temperature=0.9, guidance_scale=2.0,
                            negative_prompt_ids=neg, negative_prompt_attention_mask=neg_mask)


def test_the_draws_matter(unsharp, prompts, seed):
    """Without the same draws the text differs: a test of equal sequences would catch a wrong draw."""
    _, m = unsharp
    ids, mask = prompts
    texts = {tuple(generate(m, ids, 12, attention_mask=mask, temperature=1.0, seed=seed + k,
                            pad_token_id=PAD).sequences.flatten().tolist()) for k in range(4)}
    assert len(texts) == 4


def test_rows_end_on_eos_as_hf(unsharp, prompts, seed):
    """Rows 0 and 2 draw an EOS id early (the tokens their free-running samples draw at new tokens
    4 and 7): they pad, as HF's, while the others go on drawing from the same global stream (HF
    draws for finished rows too, and lmstack must as well, or the later rows' draws shift)."""
    h, m = unsharp
    ids, mask = prompts
    T = ids.shape[1]
    kw = dict(temperature=1.3, top_k=0, pad_token_id=PAD)

    def eos_of(s):
        free = generate(m, ids, 30, attention_mask=mask, seed=s, **kw).sequences
        return [int(free[0, T + 3]), int(free[2, T + 6])]

    s, = well_drawn_seeds(seed % 2**31, 1, m, lambda s: generate(m, ids, 30, attention_mask=mask, seed=s,
                                                                   eos_token_id=eos_of(s), **kw))
    eos = eos_of(s)
    out = assert_samples_match_hf(h, m, ids, mask, 30, s, eos_token_id=eos, **kw)
    for row, by in ((0, 4), (2, 7)):  # each ends within its first `by` new tokens, and pads from there on
        new = out.sequences[row, T:].tolist()
        end = next(i for i, t in enumerate(new) if t in eos)
        assert end < by and set(new[end + 1:]) <= {PAD}, (row, new)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_match_hf(family, seed):
    h, m = tiny_hf(family, seed=1)  # mistral: sliding window 8 < prompt + new tokens
    no_special_tokens(h)
    ids, mask = ragged_batch([7, 4], seed=1)
    assert_samples_match_hf(h, m, ids, mask, 16, seed, temperature=0.9, top_p=0.95)


def test_stream_draws_hf_tokens(unsharp, seed):
    """``generate_stream(seed=s)`` yields the tokens HF samples for that prompt after manual_seed(s)."""
    h, m = unsharp
    prompt = torch.randint(0, V - 1, (1, 9), generator=torch.Generator().manual_seed(seed % 1000))
    kw = dict(temperature=0.8, top_k=20, top_p=0.95)
    s, = well_drawn_seeds(seed % 2**31, 1, m, lambda s: generate(m, prompt, 16, seed=s, **kw))
    ref = hf_sample(h, prompt, torch.ones_like(prompt), 16, s, pad_token_id=PAD, **kw).sequences[0, 9:]
    assert list(generate_stream(m, prompt[0].tolist(), 16, seed=s, **kw)) == ref.tolist()
