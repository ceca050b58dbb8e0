"""Classifier-free guidance (``generate(guidance_scale=..., negative_prompt_ids=...)``) against HF
transformers.

Greedy decoding and its recorded scores are checked against HF ``generate(guidance_scale=...)``
itself, on ragged batches, with and without negative prompts (padded ones too), with the other
processors after it and with rows that end early. Beam search is checked against HF's beam
search guided by a reference processor that recomputes the unconditional logits from each beam's
whole text: HF's own guidance does not follow the beams (row i is guided by what was fed to row
i, whatever beam it holds; with a negative prompt it fails on a shape mismatch), and the inputs
here are ones where following them changes the result. Sampling's recorded scores are checked
against HF's processors (guidance included) applied to lmstack's own text; test_sample_parity.py
checks guided sampling token for token against HF seeded alike.
"""

import pytest
import torch

from lmstack.generate import generate, generate_stream

from ..hf_models import hf_penalises_padding, ragged_batch
from .test_output_scores import EOS, PAD, V, assert_steps_close, hf_out

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList  # noqa: E402


@pytest.fixture(scope="module")
def negatives():
    """Ragged negative prompts, one per prompt of ``batch``: ids (3, 6), mask (3, 6)."""
    return ragged_batch([2, 6, 4], seed=5)


def mix(scores, uncond_logits, scale):
    c, u = scores.log_softmax(-1), uncond_logits.log_softmax(-1)
    return u + scale * (c - u)


class WholeTextGuidance(LogitsProcessor):
    """The reference: each call runs HF's model on each row's whole unconditional text (the negative
    prompt, or the prompt's last token, then the row's new tokens), so under beam search the
    unconditional text is always the beam's own."""

    def __init__(self, h, scale, prompt_len, negative=None, negative_mask=None, copies=1):
        self.h, self.scale, self.T = h, scale, prompt_len
        self.neg = None if negative is None else negative.repeat_interleave(copies, 0)
        self.neg_mask = None if negative_mask is None else negative_mask.repeat_interleave(copies, 0)

    def __call__(self, input_ids, scores):
        new = input_ids[:, self.T :]
        ctx = input_ids[:, self.T - 1 : self.T] if self.neg is None else self.neg
        ctx_mask = torch.ones_like(ctx) if self.neg_mask is None else self.neg_mask
        ctx, ctx_mask = torch.cat([ctx, new], 1), torch.cat([ctx_mask, torch.ones_like(new)], 1)
        with torch.no_grad():
            u = self.h(ctx, attention_mask=ctx_mask, position_ids=(ctx_mask.cumsum(-1) - 1).clamp(min=0)).logits
        return mix(scores, u[:, -1], self.scale)


class RowGuidance(LogitsProcessor):
    """HF's guidance as it acts under beam search: row i's unconditional text is what was fed to
    row i, step after step, whatever beam the row holds now."""

    def __init__(self, h, scale):
        self.h, self.scale, self.fed = h, scale, None

    def __call__(self, input_ids, scores):
        col = input_ids[:, -1:]
        self.fed = col if self.fed is None else torch.cat([self.fed, col], 1)
        with torch.no_grad():
            return mix(scores, self.h(self.fed).logits[:, -1], self.scale)


def ends_row_0(free, T):
    """An EOS id that ends row 0 of the free-running ``free`` a few tokens in, while another row runs on."""
    for k in range(3, 9):
        tok = int(free[0, T + k])
        if tok not in free[0, T : T + k].tolist() and any(tok not in row[T : T + k + 2].tolist() for row in free[1:]):
            return tok
    pytest.fail(f"no token ends row 0 alone: {free[:, T:].tolist()}")


@pytest.mark.parametrize("negative", ["none", "one-per-prompt", "padded", "one-for-all", "longer"])
@pytest.mark.parametrize("scale", [1.8, 0.4])
def test_greedy_sequences_and_scores_match_hf(sharp, batch, negatives, negative, scale):
    h, m = sharp
    ids, mask = batch
    T = ids.shape[1]
    neg, neg_mask = negatives
    theirs, ours = {}, {}
    if negative == "one-per-prompt":
        theirs = ours = dict(negative_prompt_ids=neg[:, -2:])
    elif negative == "padded":  # ragged lists here, a padded tensor and its mask for HF
        theirs = dict(negative_prompt_ids=neg, negative_prompt_attention_mask=neg_mask)
        ours = dict(negative_prompt_ids=[row[m_.bool()].tolist() for row, m_ in zip(neg, neg_mask)])
    elif negative == "one-for-all":
        theirs = dict(negative_prompt_ids=neg[1:2].expand(3, -1))
        ours = dict(negative_prompt_ids=neg[1].tolist())
    elif negative == "longer":  # longer than every prompt: the prompts' rows get more left padding in the batch
        long, long_mask = ragged_batch([13, 10, 12], seed=7)
        theirs = ours = dict(negative_prompt_ids=long, negative_prompt_attention_mask=long_mask)
    free = hf_out(h, ids, mask, 12, pad_token_id=PAD, guidance_scale=scale, **theirs).sequences
    kw = dict(eos_token_id=ends_row_0(free, T), pad_token_id=PAD, guidance_scale=scale)  # row 0 ends early
    ref = hf_out(h, ids, mask, 12, **kw, **theirs)
    out = generate(m, ids, 12, attention_mask=mask, output_scores=True, **kw, **ours)
    assert torch.equal(out.sequences, ref.sequences), (out.sequences[:, T:], ref.sequences[:, T:])
    assert kw["eos_token_id"] in out.sequences[0, T:-1].tolist()
    assert_steps_close(out.step_scores, ref.scores)
    plain = generate(m, ids, 12, attention_mask=mask, **kw | dict(guidance_scale=None))
    assert not torch.equal(plain.sequences, out.sequences)  # guidance changed the text


def test_guidance_comes_before_the_other_processors_as_hf(sharp, batch):
    h, m = sharp
    kw = dict(guidance_scale=1.5, repetition_penalty=1.4, min_new_tokens=5, no_repeat_ngram_size=2,
              pad_token_id=PAD, eos_token_id=EOS)
    ids, mask = ragged_batch([6, 6, 6], seed=4) if hf_penalises_padding() else batch
    ids, mask = (ids, None) if bool(mask.all()) else (ids, mask)  # (HF's n-gram ban counts left padding)
    if mask is not None:
        kw.pop("no_repeat_ngram_size")
    ref = hf_out(h, ids, mask, 10, **kw)
    out = generate(m, ids, 10, attention_mask=mask, output_scores=True, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert_steps_close(out.step_scores, ref.scores)


@pytest.mark.parametrize("negative", [False, True])
def test_beam_search_guides_each_beam_by_its_own_text(sharp, batch, negatives, negative):
    h, m = sharp
    ids, mask = batch
    T = ids.shape[1]
    neg, neg_mask = negatives if negative else (None, None)
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=EOS, pad_token_id=PAD, length_penalty=0.7)
    ref = hf_out(h, ids, mask, 10, **kw,
                 logits_processor=LogitsProcessorList([WholeTextGuidance(h, 1.6, T, neg, neg_mask, copies=3)]))
    ours = {} if neg is None else dict(negative_prompt_ids=neg, negative_prompt_attention_mask=neg_mask)
    out = generate(m, ids, 10, attention_mask=mask, guidance_scale=1.6, output_scores=True, **kw, **ours)
    assert torch.equal(out.sequences, ref.sequences), (out.sequences[:, T:], ref.sequences[:, T:])
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=1e-5)
    assert_steps_close(out.step_scores, ref.scores)
    if not negative:  # following the beams matters here: the rows' own histories (HF's way) decode otherwise
        rows = hf_out(h, ids, mask, 10, **kw, logits_processor=LogitsProcessorList([RowGuidance(h, 1.6)]))
        assert not torch.equal(rows.sequences, ref.sequences)


def test_sampling_records_the_guided_scores_it_drew_from(sharp, batch, negatives, seed):
    """num_return_sequences=2: each prompt's negative prompt serves both of its samples."""
    from transformers import GenerationConfig

    h, m = sharp
    ids, mask = batch
    neg, neg_mask = negatives
    T = ids.shape[1]
    settings = dict(temperature=0.9, top_k=30, guidance_scale=2.0)
    out = generate(m, ids, 8, attention_mask=mask, pad_token_id=PAD, seed=seed, num_return_sequences=2,
                   output_scores=True, output_logits=True, negative_prompt_ids=neg,
                   negative_prompt_attention_mask=neg_mask, **settings)
    rows = torch.arange(3).repeat_interleave(2)
    hf_procs = h._get_logits_processor(  # built once: HF's guidance keeps its own cache between steps
        # (use_cache as generate() sets it: left None, this guidance feeds its cache the whole text again)
        generation_config=GenerationConfig(do_sample=True, use_cache=True, **settings), input_ids_seq_length=T,
        encoder_input_ids=ids[rows], prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(),
        device="cpu", model_kwargs={"attention_mask": mask[rows]}, negative_prompt_ids=neg[rows],
        negative_prompt_attention_mask=neg_mask[rows])
    for t, (scores, raw) in enumerate(zip(out.step_scores, out.logits)):
        with torch.no_grad():
            want = hf_procs(out.sequences[:, : T + t], raw.clone())
        assert torch.equal(torch.isinf(scores), torch.isinf(want)), t
        torch.testing.assert_close(scores[torch.isfinite(want)], want[torch.isfinite(want)], atol=1e-5, rtol=1e-5)


def test_stream_yields_what_generate_returns(sharp, seed):
    _, m = sharp
    prompt = torch.randint(0, PAD, (7,)).tolist()
    neg = torch.randint(0, PAD, (3,)).tolist()
    for kw in (dict(), dict(temperature=0.8, seed=seed)):
        for guidance in (dict(guidance_scale=1.7), dict(guidance_scale=2.5, negative_prompt_ids=neg)):
            out = generate(m, [prompt], 10, **kw, **guidance).sequences[0, 7:].tolist()
            assert list(generate_stream(m, prompt, 10, **kw, **guidance)) == out, (kw, guidance)


def test_scale_one_or_none_is_plain_decoding(sharp, batch):
    _, m = sharp
    ids, mask = batch
    plain = generate(m, ids, 8, attention_mask=mask, pad_token_id=PAD, output_scores=True)
    for scale in (1, 1.0, None):
        out = generate(m, ids, 8, attention_mask=mask, pad_token_id=PAD, output_scores=True, guidance_scale=scale)
        assert torch.equal(out.sequences, plain.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.step_scores, plain.step_scores))


def test_finished_rows_with_padding_outside_the_vocabulary(sharp, batch):
    """A row that ended feeds its own token, not the padding, to the unconditional branch when the
    padding is no token; the other rows decode as they would with any padding."""
    _, m = sharp
    ids, mask = batch
    T = ids.shape[1]
    free = generate(m, ids, 10, attention_mask=mask, guidance_scale=1.5, pad_token_id=PAD).sequences
    kw = dict(attention_mask=mask, guidance_scale=1.5, eos_token_id=ends_row_0(free, T))
    a = generate(m, ids, 10, pad_token_id=V + 5, **kw).sequences
    b = generate(m, ids, 10, pad_token_id=PAD, **kw).sequences
    end = a[0, T:].tolist().index(kw["eos_token_id"]) + T + 1
    assert end < a.shape[1] and (a[0, end:] == V + 5).all() and (b[0, end:] == PAD).all()
    assert torch.equal(a[1:], b[1:])


def test_bad_guidance_arguments_say_what_to_do(sharp, batch, negatives):
    _, m = sharp
    ids, mask = batch
    neg, neg_mask = negatives
    cases = [
        (dict(guidance_scale="1.5"), "guidance_scale='1.5' must be a finite number"),
        (dict(guidance_scale=float("nan")), "guidance_scale=nan must be a finite number"),
        (dict(guidance_scale=True), "guidance_scale=True must be a finite number"),
        (dict(negative_prompt_ids=neg), "apply only with guidance .*guidance_scale=None.*pass guidance_scale != 1"),
        (dict(guidance_scale=1.0, negative_prompt_ids=neg), "apply only with guidance"),
        (dict(guidance_scale=2.0, negative_prompt_attention_mask=neg_mask), "without negative_prompt_ids; pass both"),
        (dict(guidance_scale=2.0, negative_prompt_ids=neg[:2]), "holds 2 prompts for 3 prompts; pass one negative"),
        (dict(guidance_scale=2.0, negative_prompt_ids=neg, negative_prompt_attention_mask=neg_mask[:, 1:]),
         r"negative_prompt_ids: attention_mask \(3, 5\) must match input_ids \(3, 6\)"),
        (dict(guidance_scale=2.0, negative_prompt_ids=[[1, 2], []]), "negative_prompt_ids: empty prompt"),
        (dict(guidance_scale=2.0, negative_prompt_ids=[[1, V]]), f"token id {V}, outside the model's vocabulary"),
        (dict(guidance_scale=2.0, negative_prompt_ids=[list(range(120))]),
         "negative prompt of 120 tokens .* exceeds the model context .*; shorten the negative prompt"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            generate(m, ids, 10, attention_mask=mask, pad_token_id=PAD, **kw)
    with pytest.raises(ValueError, match=r"one negative prompt, a 1-D list or tensor of ids; got \(1, 2\)"):
        generate_stream(m, [1, 2, 3], 4, guidance_scale=2.0, negative_prompt_ids=[[4, 5]])
    with pytest.raises(ValueError, match="one negative prompt, a 1-D list or tensor of ids; got list"):
        generate_stream(m, [1, 2, 3], 4, guidance_scale=2.0, negative_prompt_ids=[[4, 5], [6]])


def test_compiled_steps_and_the_static_cache_guide_alike(sharp, batch, negatives):
    """compile=True runs the joint rows' steps compiled, and a static cache holds the unconditional
    rows too: the same tokens either way, beam search included."""
    _, m = sharp
    ids, mask = batch
    neg, neg_mask = negatives
    kw = dict(attention_mask=mask, pad_token_id=PAD, guidance_scale=1.6, negative_prompt_ids=neg,
              negative_prompt_attention_mask=neg_mask)
    want = generate(m, ids, 10, **kw).sequences
    assert torch.equal(generate(m, ids, 10, compile=True, **kw).sequences, want)
    assert torch.equal(generate(m, ids, 10, static_cache=True, **kw).sequences, want)
    beams = generate(m, ids, 10, num_beams=2, **kw).sequences
    assert torch.equal(generate(m, ids, 10, num_beams=2, static_cache=True, **kw).sequences, beams)


def test_a_prefix_guides_both_branches(seed):
    """A prefix tuned from text (``lmstack.peft``, "prefix") is the base model reading that text
    first, in the unconditional branch too: HF guided on [text, prompt] with the negative prompt
    [text, negative] gives the same tokens."""
    import lmstack.peft as lp

    from ..hf_models import no_special_tokens, tiny_hf

    h, m = tiny_hf("llama", scale=3.0, seed=seed % 1000)
    h = no_special_tokens(h)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, PAD, (5,), generator=g)
    lp.apply(m, "prefix", num_virtual_tokens=5, init_token_ids=text.tolist())
    m.eval()
    ids, neg = torch.randint(0, PAD, (2, 6), generator=g), torch.randint(0, PAD, (2, 3), generator=g)
    with torch.no_grad():
        ref = h.generate(torch.cat([text[None].expand(2, -1), ids], 1), max_new_tokens=10, do_sample=False,
                         guidance_scale=1.7, negative_prompt_ids=torch.cat([text[None].expand(2, -1), neg], 1),
                         pad_token_id=PAD)
    out = generate(m, ids, 10, guidance_scale=1.7, negative_prompt_ids=neg, pad_token_id=PAD)
    assert torch.equal(out.sequences[:, 6:], ref[:, 11:])
