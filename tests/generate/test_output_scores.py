"""``output_scores`` / ``output_logits`` / ``transition_scores`` against HF ``generate(output_scores=True,
output_logits=True, return_dict_in_generate=True)`` and ``compute_transition_scores``.

Greedy and beam search run on a sharpened model (no near-ties), with processors that change the
scores (repetition penalty, min_new_tokens, a length penalty), ragged batches and EOS (a finished
row feeds the model its padding, as HF's, so its later scores are HF's too). Sampling's recorded
scores are checked against HF's processors applied to lmstack's own logits and prefix, for any
seed: what was recorded is what was drawn from (test_sample_parity.py checks that HF, seeded
alike, draws the same tokens with the same scores).
"""

import pytest
import torch

from lmstack.generate import generate, transition_scores

from ..hf_models import hf_penalises_padding, ragged_batch

transformers = pytest.importorskip("transformers")

V = 128
PAD = V - 1
EOS = 94


def for_penalty(batch, kw):
    """The batch, or with a repetition penalty under a transformers that penalises left padding
    too (5.17; 5.24 and lmstack do not) three unpadded prompts."""
    return ragged_batch([6, 6, 6], seed=4) if kw.get("repetition_penalty") and hf_penalises_padding() else batch


def hf_out(h, ids, mask, n, **kw):
    with torch.no_grad():
        return h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_scores=True,
                          output_logits=True, return_dict_in_generate=True, **kw)


def assert_steps_close(ours, theirs):
    assert len(ours) == len(theirs)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == torch.float32 and a.shape == b.shape, t
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"step {t}: other tokens removed"
        torch.testing.assert_close(a[torch.isfinite(b)], b[torch.isfinite(b)], atol=1e-4, rtol=1e-5)


# (no n-gram ban: HF's counts left padding, lmstack's does not, a documented difference)
@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.4, min_new_tokens=4)], ids=["plain", "processed"])
def test_greedy_scores_logits_and_transition_scores_match_hf(sharp, batch, kw):
    h, m = sharp
    ids, mask = for_penalty(batch, kw)
    T = ids.shape[1]
    free = hf_out(h, ids, mask, 12, pad_token_id=PAD, **kw).sequences
    kw = dict(eos_token_id=int(free[0, T + 5]), pad_token_id=PAD, **kw)  # row 0 ends early: its later steps
    ref = hf_out(h, ids, mask, 12, **kw)  # feed padding, as HF's do
    out = generate(m, ids, 12, attention_mask=mask, output_scores=True, output_logits=True, **kw)
    assert torch.equal(out.sequences, ref.sequences) and out.beam_indices is None
    assert kw["eos_token_id"] in out.sequences[0, T:-1].tolist() and len(out.step_scores) == 12
    assert_steps_close(out.step_scores, ref.scores)
    assert_steps_close(out.logits, ref.logits)
    if not kw.get("repetition_penalty"):  # no processors: the scores are the logits
        assert all(torch.equal(s, raw) for s, raw in zip(out.step_scores, out.logits))
    for norm in (False, True):
        want = h.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=norm)
        torch.testing.assert_close(transition_scores(out, normalize_logits=norm), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_beam_scores_indices_and_transition_scores_match_hf(sharp, batch, early_stopping):
    h, m = sharp
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=EOS, pad_token_id=PAD, length_penalty=0.7,
              early_stopping=early_stopping, repetition_penalty=1.2)
    ids, mask = for_penalty(batch, kw)
    ref = hf_out(h, ids, mask, 12, **kw)
    out = generate(m, ids, 12, attention_mask=mask, output_scores=True, output_logits=True, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=1e-5)
    assert out.beam_indices.tolist() == ref.beam_indices.tolist()
    assert (out.beam_indices == -1).any() or early_stopping == "never"  # some hypothesis ended early
    assert_steps_close(out.step_scores, ref.scores)
    assert_steps_close(out.logits, ref.logits)
    want = h.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices)
    got = transition_scores(out)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # the sum of a hypothesis's transition scores, length-penalised, is its beam score (HF's identity)
    lengths = (out.beam_indices >= 0).sum(dim=1)
    torch.testing.assert_close(got.sum(dim=1) / lengths.float() ** 0.7, out.scores, atol=1e-4, rtol=1e-5)


def test_sampling_records_what_it_drew_from(sharp, batch, seed):
    from .test_edge_parity import hf_processors

    h, m = sharp
    settings = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    ids, mask = for_penalty(batch, settings)
    out = generate(m, ids, 8, attention_mask=mask, pad_token_id=PAD, seed=seed, num_return_sequences=2,
                   output_scores=True, output_logits=True, **settings)
    rows = torch.arange(ids.shape[0]).repeat_interleave(2)
    T = ids.shape[1]
    for t, (scores, raw) in enumerate(zip(out.step_scores, out.logits)):
        prefix, prefix_mask = out.sequences[:, : T + t], torch.cat([mask[rows], torch.ones(6, t, dtype=mask.dtype)], 1)
        want = hf_processors(h, prefix, prefix_mask, **settings)(prefix, raw.clone())
        assert torch.equal(torch.isinf(scores), torch.isinf(want)), t
        torch.testing.assert_close(scores[torch.isfinite(want)], want[torch.isfinite(want)], atol=1e-5, rtol=1e-5)
    chosen = transition_scores(out, normalize_logits=True)
    assert chosen.shape == (6, 8) and torch.isfinite(chosen).all() and (chosen <= 0).all()  # never a removed token


def test_static_cache_records_each_step(sharp, batch):
    """Each step's logits are copied out, not a view of a buffer the next step overwrites."""
    _, m = sharp
    ids, mask = batch
    kw = dict(attention_mask=mask, pad_token_id=PAD, output_scores=True, output_logits=True)
    a, b = generate(m, ids, 6, **kw), generate(m, ids, 6, static_cache=True, **kw)
    assert len({id(x) for x in b.logits}) == 6 and not torch.equal(b.logits[0], b.logits[1])
    for x, y in zip(a.logits + a.step_scores, b.logits + b.step_scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_off_by_default_and_transition_scores_needs_them(sharp, batch):
    _, m = sharp
    out = generate(m, batch[0], 4, attention_mask=batch[1], pad_token_id=PAD)
    assert out.step_scores is None and out.logits is None and out.beam_indices is None
    with pytest.raises(ValueError, match="pass output_scores=True to generate"):
        transition_scores(out)
