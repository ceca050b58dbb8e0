"""Beam search against HF ``generate(num_beams=N, do_sample=False)`` on the same random weights
(beam sampling, ``do_sample=True``: test_beam_sample.py).

The weights are scaled up (``tiny_hf(scale=...)``) so next-token distributions are peaked and no
candidate comparison is a near-tie that float rounding could flip; the EOS id is taken from a greedy
run so beams do finish early and the store, length penalty and early-stopping rules all act.
"""

import pytest
import torch

from lmstack.generate import generate

from ..hf_models import hf_generate, no_special_tokens, ragged_batch, sharp_llama, tiny_hf

pytest.importorskip("transformers")

V = 128
PAD = V - 1  # a pad id that is not the EOS id, so padded hypotheses are told apart from finished ones


@pytest.fixture(scope="module")
def llama():
    return sharp_llama()


def eos_from_greedy(h, ids, mask, step=3):
    """A token the model does emit: the greedy continuation of prompt 0 at ``step``."""
    with torch.no_grad():
        greedy = h.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=step + 1, do_sample=False)
    return int(greedy[0, ids.shape[1] + step])


def assert_matches_hf(h, m, ids, mask, n, **kw):
    ref, ref_scores = hf_generate(h, ids, mask, n, **kw)
    out = generate(m, ids, n, attention_mask=mask, **kw)
    assert out.sequences.shape == ref.shape, (out.sequences.shape, ref.shape)
    assert torch.equal(out.sequences, ref), (out.sequences[:, ids.shape[1]:], ref[:, ids.shape[1]:])
    # Scores are float32 sums scaled by L ** -length_penalty: with length_penalty=-1 they reach ~1e3,
    # where one float32 step is 6e-5, so the tolerance is 1e-4 or a few steps of the value's size.
    torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=4e-7)
    return ref


EOS = 94  # a token prompt 1's beams emit under the llama fixture (asserted in ``batch``)


@pytest.fixture(scope="module")
def batch(llama):
    """Two ragged prompts (left padding) and an EOS id that prompt 1's beams hit (prompt 0's do not,
    so one prompt finishes early while the other runs to the length limit)."""
    h, _ = llama
    ids, mask = ragged_batch([6, 11])
    ref, _ = hf_generate(h, ids, mask, 16, num_beams=4, num_return_sequences=4, eos_token_id=EOS, pad_token_id=PAD)
    assert (ref[4:, ids.shape[1]:] == EOS).any(dim=1).all()  # prompt 1's hypotheses all end on EOS
    return ids, mask, EOS


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("num_beams,num_return", [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4)])
def test_beam_matches_hf(llama, batch, num_beams, num_return, length_penalty, early_stopping):
    h, m = llama
    ids, mask, eos = batch
    ref = assert_matches_hf(
        h, m, ids, mask, 16, num_beams=num_beams, num_return_sequences=num_return, length_penalty=length_penalty,
        early_stopping=early_stopping, eos_token_id=eos, pad_token_id=PAD,
    )
    assert ref.shape[0] == 2 * num_return


def test_early_stopping_values_differ_and_match_hf(llama, batch):
    """A setting where True, False and "never" all return different beams: each rule is exercised."""
    h, m = llama
    ids, mask, eos = batch
    kw = dict(num_beams=4, num_return_sequences=2, length_penalty=2.0, eos_token_id=eos, pad_token_id=PAD)
    outs = [assert_matches_hf(h, m, ids, mask, 24, early_stopping=es, **kw) for es in (True, False, "never")]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("early_stopping", [False, "never"])
@pytest.mark.parametrize("length_penalty", [0.0, -1.0])
def test_non_positive_length_penalty_matches_hf(llama, batch, length_penalty, early_stopping):
    """length_penalty <= 0: "never" judges the best running beam at its current length, like False."""
    h, m = llama
    ids, mask, eos = batch
    assert_matches_hf(h, m, ids, mask, 16, num_beams=4, num_return_sequences=2, length_penalty=length_penalty,
                      early_stopping=early_stopping, eos_token_id=eos, pad_token_id=PAD)


def test_several_eos_ids_match_hf(llama, batch):
    """Two EOS ids: HF keeps 3 * num_beams candidates per step instead of 2 * num_beams."""
    h, m = llama
    ids, mask, _ = batch
    assert_matches_hf(h, m, ids, mask, 16, num_beams=4, num_return_sequences=4, eos_token_id=[23, 94], pad_token_id=PAD)


def test_finished_hypotheses_are_padded(llama, batch):
    """Returned hypotheses of different lengths: the shorter end in EOS and then PAD, as HF."""
    h, m = llama
    ids, mask, eos = batch
    kw = dict(num_beams=4, num_return_sequences=4, eos_token_id=eos, pad_token_id=PAD)
    ref = assert_matches_hf(h, m, ids, mask, 16, **kw)
    new = ref[:, ids.shape[1]:]
    assert (new == PAD).any() and (new[:, -1] != PAD).any()


def test_beam_without_eos_matches_hf(llama):
    h, m = llama
    ids, _ = ragged_batch([9])
    ref = assert_matches_hf(h, m, ids, None, 12, num_beams=3, num_return_sequences=3)
    assert ref.shape == (3, 21) and len({tuple(r) for r in ref.tolist()}) == 3  # distinct beams


def test_beam_with_repetition_penalty_matches_hf(llama, batch):
    h, m = llama
    ids, mask, eos = batch
    assert_matches_hf(h, m, ids, mask, 12, num_beams=3, num_return_sequences=2, repetition_penalty=1.3,
                      eos_token_id=eos, pad_token_id=PAD)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_beam_matches_hf_other_families(family):
    h, m = tiny_hf(family, scale=3.0, seed=1)  # mistral: sliding window 8 < prompt + new tokens
    no_special_tokens(h)
    ids, mask = ragged_batch([7, 4], seed=1)
    eos = eos_from_greedy(h, ids, mask)
    assert_matches_hf(h, m, ids, mask, 14, num_beams=4, num_return_sequences=2, eos_token_id=eos, pad_token_id=PAD)


def test_ragged_list_input_equals_padded_tensor(llama, batch):
    _, m = llama
    ids, mask, eos = batch
    prompts = [row[mask_row.bool()].tolist() for row, mask_row in zip(ids, mask)]
    kw = dict(num_beams=4, num_return_sequences=2, eos_token_id=eos, pad_token_id=PAD)
    a = generate(m, prompts, 10, **kw)
    b = generate(m, ids, 10, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.scores, b.scores)


def test_float64_gives_the_same_beams(llama, batch):
    """No near-ties in this setting: a float64 copy of the model picks the same hypotheses."""
    _, m = llama
    ids, mask, eos = batch
    kw = dict(num_beams=4, num_return_sequences=4, length_penalty=0.5, eos_token_id=eos, pad_token_id=PAD)
    m64 = tiny_hf("llama", scale=3.0, seed=0)[1].double()
    a, b = generate(m, ids, 16, attention_mask=mask, **kw), generate(m64, ids, 16, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)


def test_greedy_path_unchanged(llama):
    h, m = llama
    ids, _ = ragged_batch([8, 8])
    out = generate(m, ids, 10)
    assert out.scores is None
    with torch.no_grad():
        assert torch.equal(out.sequences, h.generate(ids, max_new_tokens=10, do_sample=False))
    same = generate(m, ids, 10, num_beams=1, length_penalty=2.0, early_stopping=True)
    assert torch.equal(same.sequences, out.sequences) and same.scores is None


def test_bad_beam_arguments(llama):
    _, m = llama
    with pytest.raises(ValueError, match="num_return_sequences=5.*num_beams=4"):
        generate(m, [[1, 2]], 5, num_beams=4, num_return_sequences=5)
    with pytest.raises(ValueError, match="num_return_sequences=2 with greedy decoding .* num_beams >= 2"):
        generate(m, [[1, 2]], 5, num_return_sequences=2)
    with pytest.raises(ValueError, match="early_stopping"):
        generate(m, [[1, 2]], 5, num_beams=2, early_stopping="always")
    with pytest.raises(ValueError, match="num_beams=0"):
        generate(m, [[1, 2]], 5, num_beams=0)
