"""``num_return_sequences`` when sampling: independent samples per prompt, as HF's
``generate(do_sample=True, num_return_sequences=k)``, each prompt prefilled once and its keys copied
to its k rows (HF prefills all k). The samples' distribution against HF's is checked in
test_edge_parity.py (4,000 samples per prompt); here, that they are the rows of the prompts repeated."""

import pytest
import torch

from lmstack.generate import generate

from ..hf_models import ragged_batch

V = 128
PAD = V - 1
EOS = 94


@pytest.fixture
def llama(sharp):
    return sharp[1]


@pytest.mark.parametrize("static", [False, True])
def test_samples_are_the_repeated_prompts_rows(llama, seed, static):
    """k samples of each prompt = sampling the batch with each prompt repeated k times (same seed,
    so the same draws): rows b * k ... belong to prompt b, and copying the prefilled keys changes
    nothing."""
    ids, mask = ragged_batch([5, 9, 2], seed=seed % 1000)
    # Prefilling 3 rows or 12 rounds differently in the last bits (every prefill here does), so a draw
    # within rounding of a tie could go either way: none did in 1,000 runs, with top-k 30 or without;
    # no filter here, so only the draws themselves could.
    kw = dict(temperature=1.0, eos_token_id=EOS, pad_token_id=PAD, seed=seed, static_cache=static)
    out = generate(llama, ids, 10, attention_mask=mask, num_return_sequences=4, **kw).sequences
    rep = generate(llama, ids.repeat_interleave(4, 0), 10, attention_mask=mask.repeat_interleave(4, 0), **kw).sequences
    assert out.shape[0] == 12 and torch.equal(out, rep)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(4, 0))
    assert len({tuple(r) for r in out[:4, ids.shape[1]:].tolist()}) > 1  # independent samples, not copies


def test_list_prompts_and_one_prompt(llama, seed):
    prompts = [[3, 4, 5], [9]]
    kw = dict(temperature=0.8, seed=seed, pad_token_id=PAD)
    out = generate(llama, prompts, 6, num_return_sequences=3, **kw).sequences
    assert out.shape == (6, 3 + 6)
    one = generate(llama, [prompts[0]], 6, num_return_sequences=3, **kw).sequences
    assert torch.equal(one, generate(llama, [prompts[0]] * 3, 6, **kw).sequences)


@pytest.mark.parametrize("bad, match", [
    (dict(num_return_sequences=2), r"num_return_sequences=2 with greedy decoding would return one sequence 2 times"),
    (dict(num_return_sequences=2, temperature=None), r"with greedy decoding"),
    (dict(num_return_sequences=0, temperature=1.0), r"num_return_sequences=0 must be an integer >= 1"),
    (dict(num_return_sequences=2.0, temperature=1.0), r"num_return_sequences=2.0 must be an integer >= 1"),
    (dict(num_return_sequences=3, num_beams=2), r"num_return_sequences=3 must be between 1 and num_beams=2"),
])
def test_bad_counts_are_one_line_errors(llama, bad, match):
    with pytest.raises(ValueError, match=match) as e:
        generate(llama, [[1, 2, 3]], 4, **bad)
    assert len(str(e.value).splitlines()) == 1


def test_cli_prints_each_sample(tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.interop import from_hf

    from ..interop.test_generation_config import _cli_folder

    folder, tok = _cli_folder(tmp_path, {})
    capsys.readouterr()
    argv = ["generate", "--hf", str(folder), "--prompt", "the quick brown fox", "--device", "cpu", "--raw",
            "--temperature", "1.0", "--seed", "5", "--max-new-tokens", "6", "--num-return-sequences", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    ids = tok.encode("the quick brown fox")
    out = generate(from_hf(folder), [ids], 6, temperature=1.0, seed=5, num_return_sequences=3,
                   eos_token_id=tok.stop_ids or None).sequences
    want = ""
    for r, row in enumerate(out.tolist()):
        new = row[len(ids):]
        end = next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))
        want += f"--- {r + 1} of 3\n" + tok.decode(ids + new[:end]) + "\n"
    assert printed == want
