"""``prefix_allowed_tokens_fn``, ``logits_processor`` and ``stopping_criteria`` against HF ``generate``
with the same arguments.

The constraint and the caller's processors read each row's text (left padding included, as HF's
``input_ids``), so ragged batches, beams and sampled copies (they share their prompt's index in
the constraint) are compared. Greedy and beam search run on the sharpened model;
sampling on the unsharpened one, seeded alike (HF's draws are lmstack's, test_sample_parity.py).
The caller's processors come after the built-in ones and before the sampling filters, as HF's:
``Shift`` below changes the result if applied after the temperature or top-k.
"""

import pytest
import torch

from lmstack.generate import generate, generate_stream

from ..hf_models import ragged_batch, well_drawn_seeds

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import LogitsProcessor  # noqa: E402
from transformers.generation.stopping_criteria import StoppingCriteria  # noqa: E402

V = 128
PAD = V - 1
EOS = 94


def allowed_fn(width: int = 9):
    """A constraint that depends on the prompt index and the row's last token; records its calls."""
    calls = []

    def fn(batch_id, sent):
        calls.append((batch_id, sent.shape[0]))
        last = int(sent[-1])
        return [(last * 7 + 3 * batch_id + k * 11) % (V - 1) for k in range(width)]

    fn.calls = calls
    return fn


class Shift(LogitsProcessor):
    """Raises the scores of tokens whose id plus the text length is divisible by 4 (reads input_ids)."""

    def __call__(self, input_ids, scores):
        ids = torch.arange(scores.shape[-1], device=scores.device)
        return scores + 4.0 * ((ids + input_ids.shape[1]) % 4 == 0)


def hf_gen(h, ids, mask, n, **kw):
    with torch.no_grad():
        return h.generate(ids, attention_mask=mask, max_new_tokens=n, output_scores=True, return_dict_in_generate=True,
                          **{"pad_token_id": PAD, **kw})


def assert_steps_close(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        torch.testing.assert_close(a[torch.isfinite(b)], b[torch.isfinite(b)], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("what", ["prefix", "custom", "both"])
def test_greedy_matches_hf(sharp, batch, what):
    h, m = sharp
    ids, mask = batch
    kw = {}
    if what in ("prefix", "both"):
        kw["prefix_allowed_tokens_fn"] = allowed_fn()
    if what in ("custom", "both"):
        kw["logits_processor"] = [Shift()]
    ref = hf_gen(h, ids, mask, 12, do_sample=False, eos_token_id=EOS, **kw)
    out = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, eos_token_id=EOS, output_scores=True, **kw)
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    assert_steps_close(out.step_scores, ref.scores)
    plain = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, eos_token_id=EOS).sequences
    assert not torch.equal(plain, out.sequences)  # they changed the text
    if "prefix_allowed_tokens_fn" in kw:
        T = ids.shape[1]
        for row, prompt in zip(out.sequences, range(ids.shape[0])):  # every new token was allowed
            for t in range(T, row.shape[0]):
                if int(row[t]) != PAD:
                    assert int(row[t]) in allowed_fn()(prompt, row[:t])


def test_beam_search_matches_hf(sharp, batch):
    h, m = sharp
    ids, mask = batch
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=EOS, length_penalty=0.7)
    fn = allowed_fn(12)
    ref = hf_gen(h, ids, mask, 10, do_sample=False, prefix_allowed_tokens_fn=fn, logits_processor=[Shift()], **kw)
    fn.calls.clear()
    out = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, prefix_allowed_tokens_fn=fn,
                   logits_processor=[Shift()], **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=1e-5)
    assert {b for b, _ in fn.calls} == {0, 1, 2}  # the prompt's index, not the beam row's


@pytest.mark.parametrize("copies", [1, 3])
def test_sampling_matches_hf_token_for_token(unsharp, seed, copies):
    """Sampled with the custom processor before temperature and top-k, as HF: the same draws."""
    h, m = unsharp
    ids, mask = ragged_batch([6, 11, 1], seed=3)
    kw = dict(temperature=0.7, top_k=20, num_return_sequences=copies, eos_token_id=EOS, pad_token_id=PAD)
    fn = allowed_fn(30)
    run = dict(prefix_allowed_tokens_fn=fn, logits_processor=[Shift()])
    s, = well_drawn_seeds(seed % 2**31, 1, m, lambda s: generate(m, ids, 16, attention_mask=mask, seed=s, **kw, **run))
    torch.manual_seed(s)
    ref = hf_gen(h, ids, mask, 16, do_sample=True, **kw, **run)
    fn.calls.clear()
    out = generate(m, ids, 16, attention_mask=mask, seed=s, output_scores=True, **kw, **run)
    assert torch.equal(out.sequences, ref.sequences)
    assert_steps_close(out.step_scores, ref.scores)
    assert sorted(b for b, _ in fn.calls[: 3 * copies]) == sorted(list(range(3)) * copies)  # the prompt's index


def test_an_unsatisfiable_constraint_falls_back_as_hf(sharp, batch):
    """Every allowed token banned (bad_words_ids) for some rows: HF then gives those rows their
    allowed tokens at 0 (so the constraint holds), and lmstack must too."""
    h, m = sharp
    ids, mask = batch

    def fn(batch_id, sent):
        return [5, 6] if batch_id == 1 else list(range(20, 60))

    kw = dict(prefix_allowed_tokens_fn=fn, bad_words_ids=[[5], [6]], eos_token_id=EOS)
    ref = hf_gen(h, ids, mask, 6, do_sample=False, **kw)
    out = generate(m, ids, 6, attention_mask=mask, pad_token_id=PAD, output_scores=True, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert_steps_close(out.step_scores, ref.scores)
    assert set(out.sequences[1, ids.shape[1]:].tolist()) <= {5, 6}


def test_stream_takes_them(sharp):
    _, m = sharp
    prompt = [3, 17, 44, 9]
    kw = dict(prefix_allowed_tokens_fn=allowed_fn(), logits_processor=[Shift()])
    expect = generate(m, [prompt], 10, **kw).sequences[0, len(prompt):].tolist()
    assert list(generate_stream(m, prompt, 10, **kw)) == expect
    hf_list = transformers.LogitsProcessorList(kw["logits_processor"])  # HF's own list type is taken as it is
    out = generate(m, [prompt], 10, **{**kw, "logits_processor": hf_list}).sequences
    assert out[0, len(prompt):].tolist() == expect


@pytest.mark.parametrize("kw, match", [
    (dict(prefix_allowed_tokens_fn=lambda b, s: []), "prefix_allowed_tokens_fn returned no token ids for prompt 0"),
    (dict(prefix_allowed_tokens_fn=[1, 2]), "prefix_allowed_tokens_fn=\\[1, 2\\] must be a function"),
    (dict(prefix_allowed_tokens_fn=lambda b, s: [3, 500]), "returned \\[3, 500\\] for prompt 0: it must return ids in"),
    (dict(prefix_allowed_tokens_fn=lambda b, s: ["a"]), "returned \\['a'\\] for prompt 0"),
    (dict(prefix_allowed_tokens_fn=lambda b, s: 7), "returned 7 for prompt 0: it must return ids in"),
    (dict(logits_processor=[3]), "logits_processor=\\[3\\] must be a list of callables"),
    (dict(logits_processor=[lambda i, s: s[:, :5]]), "logits_processor\\[0\\] \\(function\\) returned \\(1, 5\\)"),
    (dict(logits_processor=[lambda i, s: None]), "logits_processor\\[0\\] \\(function\\) returned NoneType"),
])
def test_bad_values_are_one_line_errors(sharp, kw, match):
    _, m = sharp
    with pytest.raises(ValueError, match=match):
        generate(m, [[1, 2]], 3, **kw)


# -- stopping criteria ----------------------------------------------------------------------------
class StopAfter(StoppingCriteria):
    """Done where the last token is ``token`` and the text is longer than ``length``; records the
    ``scores`` it was given (None, or a tuple of steps)."""

    def __init__(self, token, length=0):
        self.token, self.length, self.seen = token, length, []

    def __call__(self, input_ids, scores, **kw):
        self.seen.append(None if scores is None else len(scores))
        return (input_ids[:, -1] == self.token) & (input_ids.shape[1] > self.length)


def stop_token(free, T, row=0):
    """A token row ``row`` of the free-running ``free`` emits a few tokens in that some other row
    does not emit early."""
    for k in range(2, 8):
        tok = int(free[row, T + k])
        if tok not in free[row, T:T + k].tolist() and any(tok not in r[T:T + k + 2].tolist() for r in free[1:]):
            return tok
    pytest.fail(f"no token to stop on: {free[:, T:].tolist()}")


def test_greedy_stops_as_hf(sharp, batch):
    h, m = sharp
    ids, mask = batch
    T = ids.shape[1]
    free = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD).sequences
    tok = stop_token(free, T)
    ref = hf_gen(h, ids, mask, 12, do_sample=False, eos_token_id=EOS, stopping_criteria=[StopAfter(tok)])
    crit = StopAfter(tok)
    out = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, eos_token_id=EOS, stopping_criteria=[crit])
    assert torch.equal(out.sequences, ref.sequences), (out.sequences[:, T:], ref.sequences[:, T:])
    row = out.sequences[0, T:].tolist()
    end = row.index(tok)
    assert set(row[end + 1:]) == {PAD} and any(PAD not in r[T:].tolist() for r in out.sequences[1:])
    assert set(crit.seen) == {None}  # no output_scores: HF passes no scores either
    crit = StopAfter(tok)
    out = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD, eos_token_id=EOS, stopping_criteria=[crit],
                   output_scores=True)
    assert crit.seen == list(range(1, len(crit.seen) + 1))  # the steps so far, this one included


def test_beam_search_stops_as_hf(sharp, batch):
    h, m = sharp
    ids, mask = batch
    T = ids.shape[1]
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=EOS, length_penalty=1.3)
    free = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, **kw).sequences
    crit = [StopAfter(stop_token(free[::2], T), length=T + 1)]
    ref = hf_gen(h, ids, mask, 10, do_sample=False, stopping_criteria=crit, **kw)
    out = generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, stopping_criteria=crit, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=1e-5)
    assert not torch.equal(out.sequences[:, :free.shape[1]], free[:, :out.sequences.shape[1]])  # it stopped some


def test_sampling_stops_as_hf(unsharp, seed):
    h, m = unsharp
    ids, mask = ragged_batch([6, 11, 1], seed=3)
    # top_k=0: HF's default is 50
    kw = dict(temperature=1.0, top_k=0, num_return_sequences=2, eos_token_id=EOS, pad_token_id=PAD)
    crit = [StopAfter(tok) for tok in range(20, 40)]  # 20 stop tokens: some row stops early
    s, = well_drawn_seeds(seed % 2**31, 1, m, lambda s: generate(m, ids, 20, attention_mask=mask, seed=s,
                                                                   stopping_criteria=crit, **kw))
    torch.manual_seed(s)
    ref = hf_gen(h, ids, mask, 20, do_sample=True, stopping_criteria=crit, **kw)
    out = generate(m, ids, 20, attention_mask=mask, seed=s, stopping_criteria=crit, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    new = out.sequences[:, ids.shape[1]:]
    stopped = ((new >= 20) & (new < 40)).any(dim=1)
    assert stopped.sum() >= 2, new  # (each row has 20 steps at ~1/6 a step to draw one)


def test_stream_stops_after_the_token(sharp):
    _, m = sharp
    prompt = [3, 17, 44, 9]
    free = generate(m, [prompt], 10).sequences[0, 4:].tolist()
    tok = next(t for k, t in enumerate(free) if k >= 2 and t not in free[:k])
    assert list(generate_stream(m, prompt, 10, stopping_criteria=[StopAfter(tok)])) == free[: free.index(tok) + 1]


@pytest.mark.parametrize("crit, match", [
    (5, "stopping_criteria=5 must be a list of callables"),
    ([lambda i, s: torch.ones(3, dtype=torch.bool)], "stopping_criteria\\[0\\] \\(function\\) returned \\(3,\\)"),
    ([lambda i, s: "yes"], "stopping_criteria\\[0\\] \\(function\\) returned str"),
])
def test_bad_criteria_are_one_line_errors(sharp, crit, match):
    _, m = sharp
    with pytest.raises(ValueError, match=match):
        generate(m, [[1, 2]], 3, stopping_criteria=crit)


def test_a_bool_stops_every_row(sharp, batch):
    _, m = sharp
    ids, mask = batch
    out = generate(m, ids, 8, attention_mask=mask, pad_token_id=PAD, stopping_criteria=[lambda i, s: i.shape[1] > 10])
    assert out.sequences.shape[1] == 11  # batch's prompts are 9 wide: two new tokens, then every row is done
