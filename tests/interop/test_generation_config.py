"""A model folder's generation_config.json, read as transformers' generate() reads it.

`lmstack.interop.generation_settings` turns the file into lmstack.generate's keywords, and
`lmstack generate` uses them unless told otherwise. Checked against transformers itself: HF
`generate` (which reads the file) returns its raw and its processed scores at each step, and
lmstack's processors given our settings must turn the first into the second.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.generate.sampling import process_logits
from lmstack.interop import generation_settings

from ..hf_models import load_hf, tiny_hf

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "greedy": {},
    "greedy-penalty": {"repetition_penalty": 1.3},
    "sample-defaults": {"do_sample": True},  # transformers: temperature 1, top_k 50
    "llama2": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    "qwen2.5": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "min-p-no-top-k": {"do_sample": True, "top_k": 0, "min_p": 0.05, "temperature": 1.5},
    "typical": {"do_sample": True, "typical_p": 0.9, "top_k": 100},
}


def _folder(tmp_path, gen: dict, vocab: int = 96):
    hf, _ = tiny_hf("llama", vocab=vocab, dim=32, layers=1, heads=2, kv_heads=1, ffn=64)
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "transformers_version": "4.45.0"}))
    return tmp_path


@pytest.mark.parametrize("name", CONFIGS)
def test_settings_process_logits_as_hf_generate_does(tmp_path, seed, name):
    folder = _folder(tmp_path, CONFIGS[name])
    settings = generation_settings(folder)
    assert settings["temperature"] == (0.0 if not CONFIGS[name].get("do_sample") else CONFIGS[name].get("temperature", 1.0))
    hf = load_hf(folder)
    prompt = torch.randint(0, 96, (2, 7))
    prompt[:, 3:] = prompt[:, :4]  # repeated ids: the repetition penalty has work
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=4, output_scores=True, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)
    for step, (raw, processed) in enumerate(zip(out.logits, out.scores)):
        ids = out.sequences[:, : prompt.shape[1] + step]
        ours = process_logits(raw, ids, **settings)
        assert torch.equal(torch.isinf(ours), torch.isinf(processed)), f"step {step}: other tokens filtered"
        finite = torch.isfinite(processed)
        torch.testing.assert_close(ours[finite], processed[finite], rtol=1e-5, atol=1e-5)


def test_settings_without_a_file_and_bad_values(tmp_path):
    assert generation_settings(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": "0.9"}))
    with pytest.raises(ValueError, match=r"top_p in .*generation_config.json must be a number, got '0.9'"):
        generation_settings(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        generation_settings(tmp_path)


def _cli_folder(tmp_path, gen: dict):
    from lmstack import Tokenizer

    folder = _folder(tmp_path, gen, vocab=288)
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 30], vocab_size=288)
    tok.save(folder)
    return folder, tok


def _hf_continuation(folder, ids, **kw):
    hf = load_hf(folder)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("flags", [[], ["--temperature", "0"]])
def test_cli_generate_follows_the_folders_generation_config(tmp_path, capsys, flags):
    """No sampling flags: greedy with the file's repetition penalty, as HF generate does with the same
    file. `--temperature 0` over a file that samples: greedy, as HF with do_sample=False."""
    from lmstack.cli import main

    gen = {"repetition_penalty": 1.4} if not flags else {"do_sample": True, "temperature": 0.7, "top_k": 5}
    folder, tok = _cli_folder(tmp_path, gen)
    prompt = "the quick brown fox"
    ids = tok.encode(prompt)
    new = _hf_continuation(folder, ids, **({"do_sample": False} if flags else {}))
    new = new[: new.index(tok.eos_id) if tok.eos_id in new else len(new)]
    assert main(["generate", "--hf", str(folder), "--prompt", prompt, "--max-new-tokens", "12", "--device", "cpu",
                 "--no-stream", *flags]) == 0
    assert capsys.readouterr().out == tok.decode(ids + new) + "\n"


def test_cli_flags_win_over_the_file(tmp_path, monkeypatch):
    """Each flag given overrides the file's value; the others keep it."""
    import sys

    from lmstack.cli import main

    gen_mod = sys.modules["lmstack.generate"]  # the package (its `generate` attribute is the function)

    folder, _ = _cli_folder(tmp_path, CONFIGS["qwen2.5"])
    seen = {}

    def fake_generate(model, ids, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    with pytest.raises(SystemExit):
        main(["generate", "--hf", str(folder), "--prompt", "the", "--no-stream", "--device", "cpu", "--top-k", "3"])
    assert {k: seen[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")} == \
        {"temperature": 0.7, "top_k": 3, "top_p": 0.8, "repetition_penalty": 1.05}
