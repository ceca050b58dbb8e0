"""Token biases, step rules and truncation filters against HF transformers: ``sequence_bias``,
``bad_words_ids``, ``suppress_tokens``, ``begin_suppress_tokens``, ``forced_eos_token_id``,
``exponential_decay_length_penalty``, ``renormalize_logits``, ``epsilon_cutoff`` and ``eta_cutoff``.

Each processor is compared with HF's on fresh random inputs (small alphabets, so multi-token
sequences do match; ties for the filters), then ``generate`` with HF ``generate`` (greedy and beam
search on a ragged batch, beam sampling with a seed) on a sharpened model, with each setting built
from the unconstrained output so that it changes the output (asserted).
"""

import math

import pytest
import torch

from lmstack.generate import generate, generate_stream
from lmstack.generate.sampling import epsilon_filter, eta_filter, process_logits, token_biases

from ..hf_models import (hf_generate, hf_penalises_padding, needs_hf_sorting_beam_samples, ragged_batch, sharp_llama,
                         well_drawn_seeds)

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as lp  # noqa: E402

V = 128
PAD = V - 1
CPU = torch.device("cpu")


def random_table(g, n, alphabet=3, longest=3):
    """n token-id tuples of lengths 1..longest over a small alphabet, with random biases."""
    lengths = torch.randint(1, longest + 1, (n,), generator=g).tolist()
    return {tuple(torch.randint(0, alphabet, (k,), generator=g).tolist()): float(torch.randn((), generator=g) * 3)
            for k in lengths}


def test_sequence_bias_and_bad_words_equal_hf(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(30):
        T = int(torch.randint(3, 10, (), generator=g))  # >= the longest sequence (the edge below differs by version)
        ids = torch.randint(0, 3, (4, T), generator=g)
        logits = torch.randn(4, 8, generator=g)
        table = random_table(g, 6)
        ours = token_biases(sequence_bias=table, vocab_size=8, device=CPU)(logits, ids)
        torch.testing.assert_close(ours, lp.SequenceBiasLogitsProcessor(table)(ids, logits.clone()))
        # generation_config.json's spelling: a list of [ids, bias] pairs
        pairs = [[list(k), b] for k, b in table.items()]
        assert torch.equal(token_biases(sequence_bias=pairs, vocab_size=8, device=CPU)(logits, ids), ours)
        words = [list(k) for k in table] + [[2]]  # a lone EOS id is not banned, as in HF
        ours = token_biases(bad_words_ids=words, eos=[2], vocab_size=8, device=CPU)(logits, ids)
        assert torch.equal(ours, lp.NoBadWordsLogitsProcessor(words, eos_token_id=2)(ids, logits.clone()))
    suppressed = token_biases(suppress_tokens=[1, 5, 99], vocab_size=8, device=CPU)(logits, ids)  # 99: ignored
    assert torch.equal(suppressed, lp.SuppressTokensLogitsProcessor([1, 5])(ids, logits.clone()))


def test_a_prefix_as_long_as_the_text_matches():
    """A sequence whose first L - 1 tokens are the whole text so far applies (transformers 5.24 too;
    5.17 skipped sequences longer than the text)."""
    bias = token_biases(sequence_bias={(3, 1, 4): 2.0}, vocab_size=6, device=CPU)
    assert bias(torch.zeros(1, 6), torch.tensor([[3, 1]]))[0, 4] == 2.0
    assert bias(torch.zeros(1, 6), torch.tensor([[1]]))[0, 4] == 0.0  # too short to hold the prefix


def test_padding_matches_no_prefix():
    """A left-padded row: a prefix that would run into the padding does not match."""
    bias = token_biases(sequence_bias={(3, 3, 4): 5.0}, vocab_size=6, device=CPU)
    ids, mask = torch.tensor([[1, 3, 3], [3, 3, 3]]), torch.tensor([[1, 1, 1], [0, 0, 1]])
    out = bias(torch.zeros(2, 6), ids, mask)
    assert out[0, 4] == 5.0 and out[1, 4] == 0.0  # row 1's (3, 3) runs into padding
    assert bias(torch.zeros(2, 6), ids)[1, 4] == 5.0  # unmasked it would count


@pytest.mark.parametrize("ties", [False, True])
def test_epsilon_and_eta_equal_hf(seed, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 40, generator=g) * 3
    if ties:
        logits[:, 5:15] = logits[:, :1]
    for eps in (1e-4, 3e-3, 0.02, 0.3):
        for keep in (1, 3):
            hf = lp.EpsilonLogitsWarper(eps, min_tokens_to_keep=keep)(None, logits.clone())
            assert torch.equal(epsilon_filter(logits, eps, keep), hf)
            hf = lp.EtaLogitsWarper(eps, min_tokens_to_keep=keep)(None, logits.clone())
            assert torch.equal(eta_filter(logits, eps, keep), hf)
    assert torch.isinf(epsilon_filter(logits, 0.02)).any() and torch.isinf(eta_filter(logits, 0.02)).any()
    flat = logits / 6  # high entropy: eta's cut-off falls below epsilon, so the two differ
    for name, warper in (("epsilon_cutoff", lp.EpsilonLogitsWarper), ("eta_cutoff", lp.EtaLogitsWarper)):
        ours = process_logits(flat, None, temperature=1.0, **{name: 0.02})
        assert torch.equal(ours, warper(0.02)(None, flat.clone())), name
    assert not torch.equal(epsilon_filter(flat, 0.02), eta_filter(flat, 0.02))


@pytest.fixture(scope="module")
def llama():
    return sharp_llama()


@pytest.fixture(scope="module")
def batch(llama):
    """Two ragged prompts and their unconstrained greedy continuations (12 new tokens)."""
    _, m = llama
    ids, mask = ragged_batch([6, 11])
    free = generate(m, ids, 12, attention_mask=mask, pad_token_id=PAD).sequences[:, ids.shape[1]:]
    return ids, mask, free


def settings(free):
    """Each keyword built from the unconstrained text so that it must change it."""
    a = free[0].tolist()
    return {
        "bad-word": dict(bad_words_ids=[[a[2], a[3]]]),  # the bigram row 0 says at steps 2-3
        "bad-token": dict(bad_words_ids=[[a[4]], [a[0], a[1], a[2]]]),
        "bias-up": dict(sequence_bias={(a[1],): 40.0}),  # row 0 would say a[1] again and again
        "bias-pair": dict(sequence_bias=[[[a[0], 7], 50.0], [[a[1]], -3.0]]),
        "suppress": dict(suppress_tokens=[a[0], a[5]]),
        "begin": dict(begin_suppress_tokens=[int(free[0, 0]), int(free[1, 0])]),
        "forced-eos": dict(forced_eos_token_id=[7, 5]),  # the 12th token must be one of them
        # EOS = what row 0 says at step 9; raised from step 2 on, it comes sooner
        "eos-decay": dict(exponential_decay_length_penalty=(2, 1.6), eos_token_id=a[9]),
        # beam scores of penalised log-probs, renormalised (greedy tokens cannot change: not in this list)
        "renormalize": dict(renormalize_logits=True, repetition_penalty=1.5),
    }


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("name", ["bad-word", "bad-token", "bias-up", "bias-pair", "suppress", "begin", "forced-eos",
                                  "eos-decay", "renormalize"])
def test_generate_matches_hf_and_the_setting_bites(llama, batch, name, beams):
    h, m = llama
    ids, mask, free = batch
    kw = dict(pad_token_id=PAD, **settings(free)[name])
    if name == "renormalize" and hf_penalises_padding():
        ids, mask = ids[1:], mask[1:]
    if beams > 1:
        kw.update(num_beams=beams, num_return_sequences=2)
    ref, ref_scores = hf_generate(h, ids, mask, 12, **kw)
    out = generate(m, ids, 12, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, ref), (out.sequences[:, ids.shape[1]:], ref[:, ids.shape[1]:])
    if ref_scores is not None:
        torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=4e-7)
    base = ("pad_token_id", "num_beams", "num_return_sequences", "eos_token_id", "repetition_penalty")
    plain = generate(m, ids, 12, attention_mask=mask, **{k: v for k, v in kw.items() if k in base})
    changed = out.sequences.shape != plain.sequences.shape or not torch.equal(out.sequences, plain.sequences)
    if name == "renormalize" and beams == 1:  # a log-softmax keeps the argmax: greedy tokens cannot change
        assert not changed
        return
    if name == "renormalize":  # beam scores do
        changed = changed or not torch.allclose(out.scores, plain.scores, atol=1e-3)
    assert changed, "the setting changed nothing here"


@needs_hf_sorting_beam_samples()
@pytest.mark.parametrize("kw", [dict(epsilon_cutoff=0.01), dict(eta_cutoff=0.003, top_k=0),
                                dict(suppress_tokens=[3, 9], begin_suppress_tokens=[4], top_k=20)])
def test_beam_sampling_with_them_matches_hf(llama, batch, seed, kw):
    h, m = llama
    ids, mask, _ = batch
    kw = dict(num_beams=3, num_return_sequences=2, temperature=1.5, pad_token_id=PAD, **kw)
    kw.setdefault("top_k", 0)
    s, = well_drawn_seeds(seed % 2**31, 1, m, lambda s: generate(m, ids, 10, attention_mask=mask, seed=s, **kw))
    torch.manual_seed(s)
    with torch.no_grad():
        ref = h.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, output_scores=True,
                         return_dict_in_generate=True, **kw)
    out = generate(m, ids, 10, attention_mask=mask, seed=s, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=4e-7)


def test_stream_takes_them(llama, batch):
    _, m = llama
    ids, _, free = batch
    prompt = ids[1].tolist()
    kw = dict(bad_words_ids=[[int(free[1, 0])]], sequence_bias={(int(free[1, 2]),): -5.0}, begin_suppress_tokens=[3])
    expect = generate(m, [prompt], 10, **kw).sequences[0, len(prompt):].tolist()
    assert list(generate_stream(m, prompt, 10, **kw)) == expect and expect[0] != int(free[1, 0])


@pytest.mark.parametrize("kw, match", [
    (dict(bad_words_ids=[]), "bad_words_ids=\\[\\] must be a non-empty list"),
    (dict(bad_words_ids=[[1], [2, -1]]), "bad_words_ids=.* non-empty token-id lists"),
    (dict(bad_words_ids=[[1, 500]]), "token ids \\[500\\] outside the vocabulary of 128"),
    (dict(sequence_bias={(1,): "up"}), "sequence_bias=.* must map token-id sequences to numbers"),
    (dict(sequence_bias=[[1, 2.0]]), "sequence_bias=.* must map token-id sequences to numbers"),
    (dict(suppress_tokens=5), "suppress_tokens=5 must be a list of token ids"),
    (dict(begin_suppress_tokens=[1.5]), "begin_suppress_tokens=\\[1.5\\] must be a list of token ids"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff=1.0 must be a number in \\[0, 1\\)"),
    (dict(eta_cutoff=-0.1), "eta_cutoff=-0.1 must be a number in \\[0, 1\\)"),
    (dict(top_h=0.0, temperature=1.0), "top_h=0.0 must be a number in \\(0, 1\\]"),
    (dict(top_h=1.5), "top_h=1.5 must be a number in \\(0, 1\\]"),
    (dict(top_h=float("nan")), "top_h=nan must be a number in \\(0, 1\\]"),
    (dict(top_h="0.5"), "top_h='0.5' must be a number in \\(0, 1\\]"),
    (dict(forced_eos_token_id="2"), "forced_eos_token_id='2' must be a token id or a list of them"),
    (dict(exponential_decay_length_penalty=(1.5, 2.0), eos_token_id=1),
     "exponential_decay_length_penalty=.* must be \\(start index, decay factor\\)"),
])
def test_bad_values_are_one_line_errors(llama, kw, match):
    _, m = llama
    with pytest.raises(ValueError, match=match):
        generate(m, [[1, 2]], 3, **kw)


def test_bias_values_accumulate_like_hf():
    """Two sequences that end in the same token and both match: their biases add up (HF too)."""
    table = {(1, 2): 1.5, (2,): 2.0, (0, 1, 2): -math.inf}
    ids = torch.tensor([[5, 5, 1], [4, 0, 1]])
    logits = torch.zeros(2, 6)
    ours = token_biases(sequence_bias=table, vocab_size=6, device=CPU)(logits, ids)
    assert ours[0, 2] == 3.5 and ours[1, 2] == -math.inf
    torch.testing.assert_close(ours, lp.SequenceBiasLogitsProcessor(table)(ids, logits.clone()))
