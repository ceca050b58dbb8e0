"""``no_repeat_ngram_size``, ``min_new_tokens`` and ``min_length`` against HF transformers.

The n-gram ban is checked processor to processor against HF's ``NoRepeatNGramLogitsProcessor`` on
fresh random sequences, then end to end with HF ``generate`` (greedy and beam search, ragged
batches) on a sharpened model whose greedy text repeats itself and reaches its EOS early, so each
setting changes the output (asserted) and the parity is not vacuous.
"""

import pytest
import torch

from lmstack.generate import generate, generate_stream
from lmstack.generate.sampling import no_repeat_ngram_filter, process_logits

from ..hf_models import hf_generate, hf_penalises_padding, ragged_batch, sharp_llama

transformers = pytest.importorskip("transformers")

V = 128
PAD = V - 1


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_filter_equals_hf_processor(seed, n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    for T in (1, n - 1, n, n + 1, 9, 40, 200):
        if T < 1:
            continue
        ids = torch.randint(0, 3, (4, T))  # a small alphabet: n-grams do recur
        logits = torch.randn(4, 7)
        ours = no_repeat_ngram_filter(logits, ids, n)
        ref = NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
        assert torch.equal(ours, ref), (n, T)
    assert torch.isinf(ours).any()  # at T=200 something is banned (all but certainly)


def test_ngram_filter_skips_padding_and_odd_ids():
    """A padded row bans what its unpadded text bans; ids outside the vocabulary (soft-prompt
    placeholders < 0, embedding rows past the head) ban nothing and break nothing."""
    text = torch.tensor([[3, 1, 3, 2, 3]])
    padded = torch.tensor([[3, 3, 3, 1, 3, 2, 3]])  # two pads (id 3, also a real token) first
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    logits = torch.zeros(1, 6)
    alone = no_repeat_ngram_filter(logits, text, 2)
    assert torch.isinf(alone[0, [1, 2]]).all() and torch.isfinite(alone[0, [0, 3, 4, 5]]).all()
    assert torch.equal(no_repeat_ngram_filter(logits, padded, 2, mask), alone)
    assert torch.isinf(no_repeat_ngram_filter(logits, padded, 2)[0, 3])  # unmasked, (3, 3) would count
    odd = torch.tensor([[-1, 9, -1, 9, -1]])
    assert torch.equal(no_repeat_ngram_filter(logits, odd, 2), logits)


@pytest.fixture(scope="module")
def llama():
    return sharp_llama()


@pytest.fixture(scope="module")
def batch(llama):
    """Two ragged prompts and, as EOS, the token prompt 1's greedy text emits at its 3rd new position."""
    h, _ = llama
    ids, mask = ragged_batch([6, 11])
    with torch.no_grad():
        greedy = h.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    return ids, mask, int(greedy[1, ids.shape[1] + 2])


def assert_matches_hf(h, m, ids, mask, n, **kw):
    ref, ref_scores = hf_generate(h, ids, mask, n, **kw)
    out = generate(m, ids, n, attention_mask=mask, **kw)
    assert out.sequences.shape == ref.shape and torch.equal(out.sequences, ref), (out.sequences, ref)
    if ref_scores is not None:
        torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=4e-7)
    return out.sequences


CASES = {
    "ngram-2": dict(no_repeat_ngram_size=2),
    "ngram-1": dict(no_repeat_ngram_size=1),
    "min-new": dict(min_new_tokens=6),
    "min-length": dict(min_length=20),  # the padded prompt is 11 long: 9 new tokens before EOS
    "ngram-3-min-new": dict(no_repeat_ngram_size=3, min_new_tokens=4),
}


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("name", CASES)
def test_generate_matches_hf_and_the_setting_bites(llama, batch, name, beams):
    h, m = llama
    ids, mask, eos = batch
    kw = dict(eos_token_id=eos, pad_token_id=PAD, **({"num_beams": beams, "num_return_sequences": 2} if beams > 1 else {}))
    ours = assert_matches_hf(h, m, ids, mask, 16, **kw, **CASES[name])
    plain = generate(m, ids, 16, attention_mask=mask, **kw).sequences
    assert ours.shape != plain.shape or not torch.equal(ours, plain), "the setting changed nothing here"


def test_with_repetition_penalty_and_two_eos_ids(llama, batch):
    h, m = llama
    ids, mask, eos = batch
    if hf_penalises_padding():
        ids, mask = ids[1:], mask[1:]  # the unpadded prompt only
    for beams in (1, 4):
        assert_matches_hf(h, m, ids, mask, 14, num_beams=beams, no_repeat_ngram_size=2, repetition_penalty=1.3,
                          min_length=15, eos_token_id=[eos, 23], pad_token_id=PAD)


def test_padded_rows_equal_unpadded_runs(llama, batch):
    _, m = llama
    ids, mask, eos = batch
    kw = dict(no_repeat_ngram_size=2, min_new_tokens=3, eos_token_id=eos, pad_token_id=PAD)
    both = generate(m, ids, 12, attention_mask=mask, **kw).sequences
    for r in range(2):
        row = ids[r][mask[r].bool()][None]
        alone = generate(m, row, 12, **kw).sequences[0]
        assert torch.equal(both[r, ids.shape[1] - row.shape[1]:][: len(alone)], alone)


def test_stream_and_sampling_take_them(llama, batch, seed):
    _, m = llama
    ids, mask, eos = batch
    prompt = ids[1].tolist()
    kw = dict(no_repeat_ngram_size=2, min_new_tokens=5, eos_token_id=eos)
    out = generate(m, [prompt], 12, **kw).sequences[0, len(prompt):].tolist()
    out = out[: out.index(eos) if eos in out else len(out)]
    assert list(generate_stream(m, prompt, 12, **kw)) == out and len(out) >= 5
    sampled = generate(m, [prompt], 12, temperature=1.0, seed=seed, **kw).sequences[0, len(prompt):].tolist()
    grams = list(zip(prompt + sampled, (prompt + sampled)[1:]))
    first_eos = sampled.index(eos) if eos in sampled else len(sampled)
    assert first_eos >= 5
    kept = grams[: len(prompt) + first_eos]
    assert len(set(kept)) == len(kept)  # no bigram twice in the text up to the EOS


def test_process_logits_holds_eos_back_and_bans():
    logits = torch.zeros(1, 4)
    out = process_logits(logits, torch.tensor([[1, 2, 1]]), temperature=0, no_repeat_ngram_size=2,
                         suppress_ids=torch.tensor([3, 99]))  # 99: past the vocabulary, ignored
    assert torch.isinf(out[0, [2, 3]]).all() and torch.isfinite(out[0, [0, 1]]).all()
    with pytest.raises(ValueError, match="need input_ids"):
        process_logits(logits, None, no_repeat_ngram_size=2)


@pytest.mark.parametrize("kw, match", [
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1 must be a non-negative integer"),
    (dict(min_new_tokens=1.5), "min_new_tokens=1.5 must be a non-negative integer"),
    (dict(min_length=True), "min_length=True must be a non-negative integer"),
])
def test_bad_values_are_one_line_errors(llama, kw, match):
    _, m = llama
    with pytest.raises(ValueError, match=match):
        generate(m, [[1, 2]], 3, **kw)
    with pytest.raises(ValueError, match=match):
        generate_stream(m, [1, 2], 3, **kw)
