"""``max_time`` (HF's ``MaxTimeCriteria``): decoding stops after the step that ends past the limit.

Against transformers with a limit every step overruns (1 ns: one new token, in greedy, sampling and
beam search, where that step is the last, as at ``max_new_tokens``), and with a limit none does;
then on a fake clock that ticks one second per reading, so the number of steps is exact.
"""

import types

import pytest
import torch

from lmstack.generate import decode, generate, generate_stream

from ..hf_models import hf_generate, ragged_batch

transformers = pytest.importorskip("transformers")

PAD, EOS = 127, 94  # the tiny vocabulary's last id pads; 94 is an EOS the sharpened model reaches
BATCH = ragged_batch([5, 9])  # (ids, mask): left padding on prompt 0


@pytest.fixture
def ticking(monkeypatch):
    """time.monotonic() as decode reads it: 0, 1, 2, ... (one second per reading)."""
    clock = iter(range(10_000))
    monkeypatch.setattr(decode, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))


@pytest.mark.parametrize("beams", [1, 3])
def test_one_nanosecond_is_one_step_as_in_hf(sharp, beams):
    h, m = sharp
    ids, mask = BATCH
    kw = dict(num_beams=beams, num_return_sequences=min(2, beams), eos_token_id=EOS, pad_token_id=PAD)
    if beams == 1:
        kw.pop("num_return_sequences")
    ref, ref_scores = hf_generate(h, ids, mask, 12, max_time=1e-9, **kw)
    out = generate(m, ids, 12, attention_mask=mask, max_time=1e-9, **kw)
    assert out.sequences.shape[1] == ids.shape[1] + 1
    assert torch.equal(out.sequences, ref)
    one = generate(m, ids, 1, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, one.sequences)
    if beams > 1:
        torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.scores, one.scores, atol=0, rtol=0)
    free = generate(m, ids, 12, attention_mask=mask, **kw)
    assert torch.equal(generate(m, ids, 12, attention_mask=mask, max_time=3600.0, **kw).sequences, free.sequences)
    assert free.sequences.shape[1] > ids.shape[1] + 1  # so the limit did cut something


def test_sampling_keeps_its_draws_up_to_the_limit(sharp, seed, ticking):
    _, m = sharp
    ids, mask = BATCH
    kw = dict(temperature=1.0, top_k=20, seed=seed, pad_token_id=PAD, attention_mask=mask)
    # readings: 0 at the call (deadline 2.5), then 1, 2, 3 after steps 1, 2, 3: three new tokens
    cut = generate(m, ids, 12, max_time=2.5, **kw).sequences
    assert cut.shape[1] == ids.shape[1] + 3
    assert torch.equal(cut, generate(m, ids, 12, **kw).sequences[:, : ids.shape[1] + 3])


def test_beam_search_finishes_at_the_limit(sharp, ticking):
    _, m = sharp
    ids, mask = BATCH
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=EOS, pad_token_id=PAD, attention_mask=mask)
    cut = generate(m, ids, 12, max_time=3.5, **kw)  # four steps, the fourth the last
    four = generate(m, ids, 4, **kw)
    assert torch.equal(cut.sequences, four.sequences) and torch.equal(cut.scores, four.scores)


def test_stream_counts_from_the_first_token(sharp, ticking):
    _, m = sharp
    prompt = BATCH[0][1].tolist()
    stream = generate_stream(m, prompt, 12, max_time=1.5)  # no reading yet: the clock starts at next()
    got = list(stream)  # readings 0 (deadline 1.5), 1, 2: two tokens
    assert got == generate(m, [prompt], 2).sequences[0, len(prompt) :].tolist()


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), "5", True])
def test_bad_max_time_is_a_one_line_error(sharp, bad):
    _, m = sharp
    with pytest.raises(ValueError, match=r"max_time=.* must be a number of seconds >= 0") as e:
        generate(m, [[1, 2, 3]], 4, max_time=bad)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"max_time=.* must be a number of seconds >= 0"):
        generate_stream(m, [1, 2, 3], 4, max_time=bad)
