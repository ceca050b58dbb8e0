"""Prompt tuning with the soft prompt inside the text (``position="end"``): placeholder ids -1 ... -n
stand for learned vectors. Checked against HF transformers fed the same vectors as ``inputs_embeds``
(logits, gradients, greedy decoding of ragged batches), plus the data pipeline, the adapter API and
the one-line errors."""

import copy

import pytest
import torch

import lmstack
import lmstack.peft as peft
from lmstack.data.instruct import IGNORE_INDEX, Example, encode_example, encode_prompt
from lmstack.generate.decode import left_pad
from lmstack.generate.sampling import apply_repetition_penalty
from tests.hf_models import no_special_tokens, tiny_hf

N = 4  # soft tokens
SOFT = [-1 - k for k in range(N)]  # their placeholder ids


def with_soft_prompt(m, n=N, seed=0):
    """``m`` with an in-text soft prompt of random vectors (far from any token's embedding)."""
    peft.apply(m, "prompt", num_virtual_tokens=n, position="end")
    with torch.no_grad():
        m.soft_tokens.weight.copy_(torch.randn(n, m.config.dim, generator=torch.Generator().manual_seed(seed)))
    return m


def hf_embeds(hf, m, ids):
    """HF's ``inputs_embeds`` for ids with placeholders: the token embedding, or the soft vector."""
    emb = hf.get_input_embeddings()(ids.clamp(min=0))
    soft = m.soft_tokens.weight[(-1 - ids).clamp(0, N - 1)]
    return torch.where((ids < 0)[..., None], soft, emb)


def sample_ids(B, T, seed):
    """Random token ids with the N placeholders at a random place in each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (B, T), generator=g)
    for b in range(B):
        at = int(torch.randint(0, T - N + 1, (1,), generator=g))
        ids[b, at : at + N] = torch.tensor(SOFT)
    return ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_and_gradients_equal_hf_inputs_embeds(seed, family):
    hf, m = tiny_hf(family, seed=seed % 1000)
    with_soft_prompt(m, seed=seed)
    ids = sample_ids(3, 13, seed)
    ours = m(ids)
    soft = m.soft_tokens.weight.detach().clone().requires_grad_(True)
    emb = torch.where((ids < 0)[..., None], soft[(-1 - ids).clamp(0, N - 1)],
                      hf.get_input_embeddings()(ids.clamp(min=0)).detach())
    theirs = hf(inputs_embeds=emb).logits
    assert (ours - theirs).abs().max() <= 1e-4
    w = torch.randn_like(ours)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    got, want = m.soft_tokens.weight.grad, soft.grad
    assert got.abs().max() > 0
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("soft_tokens"))


def test_greedy_ragged_batch_equals_hf_generate_on_inputs_embeds(seed):
    """Placeholders at the end of left-padded prompts of three lengths: lmstack's cached greedy
    decoding equals HF ``generate(inputs_embeds=...)`` token for token."""
    hf, m = tiny_hf("llama", scale=4.0, seed=seed % 1000)  # peaked: no near-ties
    no_special_tokens(hf)
    with_soft_prompt(m, seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 127, (n,), generator=g).tolist() + peft.soft_prompt_ids(m) for n in (3, 9, 6)]
    out = lmstack.generate(m, prompts, max_new_tokens=8, pad_token_id=127).sequences
    ids, mask = left_pad(prompts, 127)
    T = ids.shape[1]
    with torch.no_grad():
        new = hf.generate(inputs_embeds=hf_embeds(hf, m, ids), attention_mask=mask.long(), max_new_tokens=8,
                          do_sample=False, pad_token_id=127)
    assert torch.equal(out[:, T:], new)
    assert torch.equal(out[:, :T], ids)
    # the soft prompt matters: without it the model says something else
    plain = lmstack.generate(m, [p[:-N] for p in prompts], max_new_tokens=8, pad_token_id=127).sequences
    assert not torch.equal(plain[:, -8:], out[:, -8:])


def test_packed_rows_equal_rows_alone(seed):
    """Placeholders are ordinary positions: two documents packed in one row (document mask) give
    each the logits it has alone."""
    _, m = tiny_hf("llama", seed=seed % 1000)
    with_soft_prompt(m, seed=seed)
    a, b = sample_ids(1, 9, seed), sample_ids(1, 7, seed + 1)
    seqs = lmstack.Seqs.from_doc_ids(torch.tensor([[0] * 9 + [1] * 7]))
    with torch.no_grad():
        packed = m(torch.cat([a, b], dim=1), seqs=seqs)
        alone = torch.cat([m(a), m(b)], dim=1)
    assert (packed - alone).abs().max() <= 1e-5


def test_adapter_api(tmp_path, seed):
    _, base = tiny_hf("llama", seed=seed % 1000)
    m = with_soft_prompt(copy.deepcopy(base), seed=seed)
    assert peft.trainable_parameters(m) == N * base.config.dim
    assert list(peft.adapter_state_dict(m)) == ["soft_tokens.weight"] and m.virtual_tokens == 0
    assert peft.soft_prompt_ids(m) == SOFT == [-1, -2, -3, -4] and peft.soft_prompt_ids(base) == []
    assert peft.soft_prompt_ids_of("prompt", {"num_virtual_tokens": 2}) == []  # position start: none
    assert peft.soft_prompt_ids_of("lora", {}) == []
    ids = sample_ids(2, 10, seed)
    with torch.no_grad():
        out = m(ids)
        assert torch.equal(m(ids[:, :1].clamp(min=0)), base(ids[:, :1].clamp(min=0)))  # no placeholder: the base
    peft.save_adapter(m, tmp_path / "a")
    loaded = peft.load_adapter(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(ids), out)
    assert loaded.peft_config["options"]["position"] == "end"
    with pytest.raises(ValueError, match="position='end' has no peft equivalent: save it with format='lmstack'"):
        peft.save_adapter(m, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()  # nothing written
    with pytest.raises(ValueError, match="placeholder ids are not tokens"):
        with peft.disable_adapters(m):
            pass
    with pytest.raises(ValueError, match="cannot be merged"):
        peft.merge_and_unload(m)
    with pytest.raises(ValueError, match="position='middle' is not one of 'start', 'end'"):
        peft.apply(copy.deepcopy(base), "prompt", position="middle")
    peft.unload(m)
    assert m.soft_tokens is None and m.state_dict().keys() == base.state_dict().keys()


def test_generate_rejects_ids_the_model_cannot_read(seed):
    _, base = tiny_hf("llama", seed=seed % 1000)
    with pytest.raises(ValueError, match="prompt holds id -1; negative ids stand for .* this model has 0 of them"):
        lmstack.generate(base, [[5, 6, -1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token id 128, outside the model's vocabulary of 128"):
        lmstack.generate(base, [[5, 128]], max_new_tokens=2)
    m = with_soft_prompt(copy.deepcopy(base))
    with pytest.raises(ValueError, match="prompt holds id -5; .* this model has 4 of them"):
        list(lmstack.generate_stream(m, [5, -5], max_new_tokens=2))
    assert lmstack.generate(m, [[5, -4, -1]], max_new_tokens=2).sequences.shape == (1, 5)


def test_repetition_penalty_skips_placeholders(seed):
    logits = torch.randn(2, 10)
    ids = torch.tensor([[3, -1, -2, 7], [0, 9, -1, 9]])
    real = torch.tensor([[3, 3, 3, 7], [0, 9, 9, 9]])  # the same token set without placeholders
    assert torch.equal(apply_repetition_penalty(logits, ids, 1.7), apply_repetition_penalty(logits, real, 1.7))


class CharTok:
    """A stand-in tokenizer: one id per character, EOS 0."""

    eos_id, chat_template, leading_special_ids = 0, None, []

    def encode(self, text, add_special_tokens=False, parse_special=False, continuation=False):
        return [ord(c) for c in text]


@pytest.mark.parametrize("template", ["plain", "alpaca"])
def test_data_puts_placeholders_before_every_reply(template):
    tok, soft = CharTok(), [-1, -2, -3]
    ex = Example(instruction="Who?", input="x", output="Al")
    t = encode_example(ex, tok, template, soft)
    plain = encode_example(ex, tok, template)
    at = len(plain.ids) - 3  # the reply "Al" and EOS end the example
    assert list(t.ids) == list(plain.ids[:at]) + soft + list(plain.ids[at:])
    assert list(t.labels) == list(plain.labels[:at]) + [IGNORE_INDEX] * 3 + list(plain.labels[at:])
    assert encode_prompt(ex, tok, template, soft) == list(plain.ids[:at]) + soft

    chat = Example(messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                             {"role": "user", "content": "and?"}, {"role": "assistant", "content": "so"}))
    t = encode_example(chat, tok, soft_ids=soft)
    runs = [i for i in range(len(t.ids)) if t.ids[i : i + 3] == tuple(soft)]
    assert len(runs) == 2  # before each assistant reply
    for i in runs:
        assert t.labels[i + 3] != IGNORE_INDEX and t.labels[i - 1] == IGNORE_INDEX  # the reply follows at once
    assert encode_prompt(chat, tok, soft_ids=soft)[-3:] == soft
