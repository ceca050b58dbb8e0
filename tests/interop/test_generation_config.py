"""A model folder's generation_config.json, read as transformers' generate() reads it.

`lmstack.interop.generation_settings` turns the file into lmstack.generate's keywords, and
`lmstack generate` uses them unless told otherwise. Checked against transformers itself: HF
`generate` (which reads the file) returns its raw and its processed scores at each step, and
lmstack's processors given our settings must turn the first into the second.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmstack.generate.sampling import process_logits
from lmstack.interop import generation_settings

from ..hf_models import hf_has_top_h, load_hf, needs_hf_sorting_beam_samples, tiny_hf, well_drawn_seeds

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "greedy": {},
    "greedy-penalty": {"repetition_penalty": 1.3},
    "sample-defaults": {"do_sample": True},  # transformers: temperature 1, top_k 50
    "llama2": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    "qwen2.5": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "min-p-no-top-k": {"do_sample": True, "top_k": 0, "min_p": 0.05, "temperature": 1.5},
    "typical": {"do_sample": True, "typical_p": 0.9, "top_k": 100},
    "epsilon": {"do_sample": True, "epsilon_cutoff": 0.02, "top_k": 0},
    "eta": {"do_sample": True, "eta_cutoff": 0.005, "temperature": 0.8, "top_p": 0.95},
    "top-h": {"do_sample": True, "top_h": 0.4, "top_k": 0, "temperature": 1.2},
}


def _folder(tmp_path, gen: dict, vocab: int = 96, scale: float = 1.0):
    hf, _ = tiny_hf("llama", vocab=vocab, dim=32, layers=1, heads=2, kv_heads=1, ffn=64, scale=scale)
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "transformers_version": "4.45.0"}))
    return tmp_path


@pytest.mark.parametrize("name", CONFIGS)
def test_settings_process_logits_as_hf_generate_does(tmp_path, seed, name):
    if "top_h" in CONFIGS[name] and not hf_has_top_h():
        pytest.skip("this transformers has no top_h: no reference")
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


def _cli_folder(tmp_path, gen: dict, scale: float = 1.0):
    from lmstack import Tokenizer

    folder = _folder(tmp_path, gen, vocab=288, scale=scale)
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


def test_max_length_from_the_file(tmp_path, capsys):
    """A file's max_length (prompt + new tokens) bounds `lmstack generate` as it bounds HF generate(),
    which reads the same file; the file's max_new_tokens, or --max-new-tokens, wins over it."""
    from lmstack.cli import main

    folder, tok = _cli_folder(tmp_path, {"max_length": 11})
    assert generation_settings(folder) == {"temperature": 0.0, "max_length": 11}
    ids = tok.encode("the quick brown fox")
    assert len(ids) < 11
    with torch.no_grad():
        ref = load_hf(folder).generate(torch.tensor([ids]), pad_token_id=0)[0, len(ids):].tolist()
    assert len(ref) == 11 - len(ids)
    ref = ref[: ref.index(tok.eos_id) if tok.eos_id in ref else len(ref)]
    assert main(["generate", "--hf", str(folder), "--prompt", "the quick brown fox", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == tok.decode(ids + ref) + "\n"
    assert main(["generate", "--hf", str(folder), "--prompt", "the quick brown fox", "--device", "cpu",
                 "--max-new-tokens", "12", "--no-stream"]) == 0
    new = _hf_continuation(folder, ids)  # max_new_tokens=12 over the file's max_length, in HF too
    assert len(new) > 11 - len(ids)
    new = new[: new.index(tok.eos_id) if tok.eos_id in new else len(new)]
    assert capsys.readouterr().out == tok.decode(ids + new) + "\n"
    (folder / "generation_config.json").write_text(json.dumps({"max_length": 11, "max_new_tokens": 3}))
    assert generation_settings(folder) == {"temperature": 0.0, "max_new_tokens": 3}


@pytest.mark.parametrize("gen", [{"no_repeat_ngram_size": 1, "min_new_tokens": 6},
                                 {"do_sample": False, "no_repeat_ngram_size": 1, "min_length": 12}])
def test_ngram_ban_and_minimum_length_from_the_file(tmp_path, capsys, gen):
    """The file's no_repeat_ngram_size, min_new_tokens and min_length: `lmstack generate` prints what
    HF generate() gives on the same folder, and that differs from decoding without them (the ban
    bites; the EOS hold is checked against HF in tests/generate/test_ngram_min_length.py)."""
    from lmstack.cli import main

    folder, tok = _cli_folder(tmp_path, gen, scale=3.0)  # peaked: greedy decoding repeats itself
    assert generation_settings(folder) == {"temperature": 0.0, **{k: v for k, v in gen.items() if k != "do_sample"}}
    ids = tok.encode("the quick brown fox")

    def printed(*flags):
        assert main(["generate", "--hf", str(folder), "--prompt", "the quick brown fox", "--device", "cpu",
                     "--max-new-tokens", "12", *flags]) == 0
        return capsys.readouterr().out

    new = _hf_continuation(folder, ids, eos_token_id=tok.stop_ids)
    new = new[: new.index(tok.eos_id) if tok.eos_id in new else len(new)]
    assert printed() == tok.decode(ids + new) + "\n"
    without = printed("--no-repeat-ngram-size", "0", "--min-new-tokens", "0")
    assert without != tok.decode(ids + new) + "\n"


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


BEAM_FILE = {"num_beams": 3, "length_penalty": 0.6, "early_stopping": "never", "num_return_sequences": 2,
             "max_new_tokens": 9}


def _run_cli(capsys, folder, *flags):
    from lmstack.cli import main

    capsys.readouterr()  # what came before (transformers' progress bars)
    rc = main(["generate", "--hf", str(folder), "--prompt", "the quick brown fox", "--device", "cpu", *flags])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_cli_prints_hf_beams(capsys, folder, tok, *flags, seed=None):
    """`lmstack generate` on ``folder`` prints HF generate()'s hypotheses (which it reads from the
    folder's generation_config.json), best first, with the same scores; ``seed`` seeds both."""
    ids = tok.encode("the quick brown fox")
    if seed is not None:
        torch.manual_seed(seed)  # HF draws from the global generator; --seed seeds lmstack's with the same number
    with torch.no_grad():
        out = load_hf(folder).generate(torch.tensor([ids]), pad_token_id=0, eos_token_id=tok.stop_ids,
                                       output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 2 and out.sequences.shape[1] <= len(ids) + 9
    rc, printed, err = _run_cli(capsys, folder, *flags, *([] if seed is None else ["--seed", str(seed)]))
    assert rc == 0 and err == ""
    parts = re.split(r"--- (\d) of 2 \(score (-?[\d.]+)\)\n", printed)  # the texts may hold newlines
    assert parts[0] == "" and parts[1::3] == ["1", "2"], printed
    for r in range(2):
        score, text = parts[3 * r + 2], parts[3 * r + 3].removesuffix("\n")
        assert float(score) == pytest.approx(out.sequences_scores[r].item(), abs=2e-4)
        new = out.sequences[r, len(ids):].tolist()
        end = next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))
        assert text == tok.decode(ids + new[:end])
    return printed


def test_beam_search_from_the_file(tmp_path, capsys):
    """A file with num_beams > 1: transformers' generate() runs beam search with the file's
    length_penalty, early_stopping, num_return_sequences and max_new_tokens; `lmstack generate`
    prints the same hypotheses, best first, with the same scores."""
    folder, tok = _cli_folder(tmp_path, BEAM_FILE, scale=3.0)  # peaked: no near-ties between beams
    settings = generation_settings(folder)
    assert settings == {"temperature": 0.0, **BEAM_FILE}
    _assert_cli_prints_hf_beams(capsys, folder, tok)


@needs_hf_sorting_beam_samples()
def test_beam_sampling_from_the_file(tmp_path, capsys, seed):
    """do_sample with num_beams: transformers samples the beams (with its default top_k 50 here);
    so does `lmstack generate`, and with the same seed it prints the same hypotheses and scores."""
    beam_sample = {**BEAM_FILE, "do_sample": True, "temperature": 1.3, "top_p": 0.95}
    from lmstack.generate import generate
    from lmstack.interop import from_hf

    folder, tok = _cli_folder(tmp_path, beam_sample)
    settings = generation_settings(folder)
    assert settings == {**BEAM_FILE, "temperature": 1.3, "top_k": 50, "top_p": 0.95}
    m, ids = from_hf(folder), tok.encode("the quick brown fox")
    seeds = well_drawn_seeds(seed % 10_000, 3, m, lambda s: generate(m, [ids], eos_token_id=tok.stop_ids, seed=s,
                                                                      **settings))
    printed = {_assert_cli_prints_hf_beams(capsys, folder, tok, seed=s) for s in seeds}
    assert len(printed) > 1  # the seed matters: beams are drawn, not searched


def test_beam_flags_win_over_the_file(tmp_path, monkeypatch, capsys):
    """--num-beams and the beam flags override the file; --temperature > 0 over a file's beam search
    samples its beams (as HF generate(do_sample=True) on that folder); --num-beams 1 samples one."""
    import sys

    gen_mod = sys.modules["lmstack.generate"]
    folder, _ = _cli_folder(tmp_path, BEAM_FILE)
    seen = []

    def fake_generate(model, ids, **kw):
        seen.append(dict(kw, dtype=next(model.parameters()).dtype))
        raise SystemExit(0)

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    monkeypatch.setattr(gen_mod, "generate_stream", fake_generate)
    for flags in (["--num-beams", "4", "--length-penalty", "-1", "--early-stopping", "TRUE", "--max-new-tokens", "5"],
                  ["--temperature", "0.9", "--no-stream", "--dtype", "bfloat16", "--top-h", "0.7",
                   "--epsilon-cutoff", "0.001", "--eta-cutoff", "0.002"],
                  ["--num-beams", "1", "--num-return-sequences", "1", "--no-stream", "--compile"],
                  ["--num-beams", "1", "--compile"]):
        with pytest.raises(SystemExit):
            _run_cli(capsys, folder, *flags)
    beam, sample, greedy, stream = seen
    assert stream["compile"] and stream["temperature"] == 0.0 and "num_beams" not in stream
    assert {k: beam[k] for k in (*BEAM_FILE, "temperature")} == {
        "num_beams": 4, "length_penalty": -1.0, "early_stopping": True, "num_return_sequences": 2,
        "max_new_tokens": 5, "temperature": 0.0}
    assert beam["dtype"] == torch.float32 and not beam["compile"]
    assert sample["temperature"] == 0.9 and sample["max_new_tokens"] == 9 and sample["dtype"] == torch.bfloat16
    assert (sample["top_h"], sample["epsilon_cutoff"], sample["eta_cutoff"]) == (0.7, 0.001, 0.002)
    assert all(k not in beam for k in ("top_h", "epsilon_cutoff", "eta_cutoff"))  # not given: not passed
    assert {k: sample[k] for k in BEAM_FILE} == BEAM_FILE  # beam sampling with the file's beams
    assert greedy["num_beams"] == 1 and greedy["temperature"] == 0.0 and greedy["compile"]


def test_num_beams_flag_without_a_file_is_beam_search(tmp_path, monkeypatch, capsys):
    """No generation_config.json: --num-beams alone is HF's deterministic beam search (temperature 0,
    not the CLI's sampling default), and with --temperature it samples the beams."""
    import sys

    gen_mod = sys.modules["lmstack.generate"]
    folder, _ = _cli_folder(tmp_path, {})
    (folder / "generation_config.json").unlink()
    seen = []

    def fake_generate(model, ids, **kw):
        seen.append(kw)
        raise SystemExit(0)

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    monkeypatch.setattr(gen_mod, "generate_stream", fake_generate)
    for flags in (["--num-beams", "3"], ["--num-beams", "3", "--temperature", "0.5"], []):
        with pytest.raises(SystemExit):
            _run_cli(capsys, folder, *flags)
    assert [(kw.get("num_beams"), kw["temperature"]) for kw in seen] == [(3, 0.0), (3, 0.5), (None, 0.8)]


def test_bad_beam_settings_are_one_line_errors(tmp_path, capsys):
    folder, _ = _cli_folder(tmp_path, {"do_sample": True, "temperature": 0.7, "num_beams": 4})
    rc, _, err = _run_cli(capsys, folder, "--num-beams", "4", "--top-k", "1", "--num-return-sequences", "4",
                          "--max-new-tokens", "1")
    assert rc == 2 and len(err.splitlines()) == 1 and "fewer than num_return_sequences=4" in err, err
    with pytest.raises(SystemExit):  # argparse: exit 2 with the usage
        _run_cli(capsys, folder, "--early-stopping", "sometimes")
    assert "pass true, false or never" in capsys.readouterr().err
    rc, _, err = _run_cli(capsys, folder, "--dtype", "int8")
    assert rc == 2 and "dtype='int8'" in err and len(err.splitlines()) == 1
    for bad, match in (({"num_beams": 2, "early_stopping": "soon"}, "early_stopping in .* must be true, false or"),
                       ({"num_beams": 2.5}, "num_beams in .* must be an integer, got 2.5"),
                       ({"max_new_tokens": "9"}, "max_new_tokens in .* must be an integer")):
        (folder / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            generation_settings(folder)


def test_fields_lmstack_does_not_implement_are_named(tmp_path, capsys):
    """transformers would apply them; lmstack says on stderr that it decodes without them."""
    from lmstack.interop import unsupported_generation_settings

    gen = {"penalty_alpha": 0.6, "diversity_penalty": 0.5, "num_beam_groups": 1, "force_words_ids": None,
           "renormalize_logits": False, "encoder_repetition_penalty": 1.0, "stop_strings": ["END"],
           "guidance_scale": 1.5, "top_h": 0.5}
    folder, _ = _cli_folder(tmp_path, gen)
    assert unsupported_generation_settings(folder) == {"diversity_penalty": 0.5, "penalty_alpha": 0.6}
    rc, out, err = _run_cli(capsys, folder, "--max-new-tokens", "3", "--no-stream")
    assert rc == 0 and out.startswith("the quick brown fox")
    assert len(err.splitlines()) == 1
    assert "sets diversity_penalty=0.5, penalty_alpha=0.6, which lmstack does not implement" in err
    (folder / "generation_config.json").unlink()
    assert unsupported_generation_settings(folder) == {}


def test_guidance_from_the_file_the_flags_and_a_negative_prompt(tmp_path, capsys):
    """A file's guidance_scale guides `lmstack generate` as it guides HF generate() (which reads the
    same file); --guidance-scale overrides it, 1 turns it off, and --negative-prompt is encoded as
    the prompt is and becomes the unconditional context (HF's negative_prompt_ids)."""
    folder, tok = _cli_folder(tmp_path, {"guidance_scale": 3.0}, scale=3.0)
    assert generation_settings(folder) == {"temperature": 0.0, "guidance_scale": 3.0}
    ids = tok.encode("the quick brown fox")
    negative = tok.encode("lazy dog")

    def hf_text(**kw):
        new = _hf_continuation(folder, ids, eos_token_id=tok.stop_ids, **kw)
        return tok.decode(ids + new[: new.index(tok.eos_id) if tok.eos_id in new else len(new)]) + "\n"

    texts = {}
    for flags, kw in (((), {}), (("--guidance-scale", "1"), {"guidance_scale": 1.0}),
                      (("--negative-prompt", "lazy dog"), {"negative_prompt_ids": torch.tensor([negative])}),
                      (("--guidance-scale", "0.3", "--negative-prompt", "lazy dog", "--no-stream"),
                       {"guidance_scale": 0.3, "negative_prompt_ids": torch.tensor([negative])})):
        rc, out, _ = _run_cli(capsys, folder, "--max-new-tokens", "12", *flags)
        assert rc == 0 and out == hf_text(**kw), flags
        texts[flags] = out
    assert len(set(texts.values())) == 4  # each changed the text
    (folder / "generation_config.json").write_text(json.dumps({"guidance_scale": 1}))
    assert generation_settings(folder) == {"temperature": 0.0}
    rc, _, err = _run_cli(capsys, folder, "--negative-prompt", "lazy dog")
    assert rc == 2 and "--negative-prompt is the unconditional context of guidance: pass --guidance-scale" in err


def test_max_time_from_the_file_and_the_flag(tmp_path, capsys):
    """A file's max_time bounds `lmstack generate` as HF generate()'s MaxTimeCriteria does: with 0
    seconds every step overruns, so one new token, as HF gives; --max-time overrides it."""
    folder, tok = _cli_folder(tmp_path, {"max_time": 0})
    assert generation_settings(folder) == {"temperature": 0.0, "max_time": 0}
    ids = tok.encode("the quick brown fox")
    with torch.no_grad():
        ref = load_hf(folder).generate(torch.tensor([ids]), pad_token_id=0, max_new_tokens=12)[0, len(ids):].tolist()
    assert len(ref) == 1
    for flags in ([], ["--no-stream"]):
        rc, out, _ = _run_cli(capsys, folder, "--max-new-tokens", "12", *flags)
        assert rc == 0 and out == tok.decode(ids + ref) + "\n"
    rc, out, _ = _run_cli(capsys, folder, "--max-new-tokens", "12", "--max-time", "3600", "--no-stream")
    new = _hf_continuation(folder, ids, do_sample=False, max_time=3600.0)
    new = new[: new.index(tok.eos_id) if tok.eos_id in new else len(new)]
    assert rc == 0 and out == tok.decode(ids + new) + "\n" and len(new) > 1
    (folder / "generation_config.json").write_text(json.dumps({"max_time": "1s"}))
    with pytest.raises(ValueError, match="max_time in .* must be a number"):
        generation_settings(folder)


def test_stop_strings_are_read(tmp_path):
    """transformers takes one string or a list; anything else is a one-line error naming the file."""
    for value, want in (("END", ["END"]), (["a", "\nUser:"], ["a", "\nUser:"]), ([], None)):
        (tmp_path / "generation_config.json").write_text(json.dumps({"stop_strings": value}))
        assert generation_settings(tmp_path).get("stop_strings") == want
    for bad in (["a", ""], [1], {"a": 1}, 3):
        (tmp_path / "generation_config.json").write_text(json.dumps({"stop_strings": bad}))
        with pytest.raises(ValueError, match="stop_strings in .* must be a string or a list of non-empty strings"):
            generation_settings(tmp_path)


def test_cli_samples_with_the_files_top_h_or_the_flags(tmp_path, capsys, seed):
    """A file's top_h (sampling) is applied as HF generate() applies it, and --top-h overrides it:
    with --seed s the printed text is what HF samples from that folder after manual_seed(s)."""
    if not hf_has_top_h():
        pytest.skip("this transformers has no top_h: no reference")
    from lmstack import from_hf
    from lmstack.generate import generate

    folder, tok = _cli_folder(tmp_path, {"do_sample": True, "top_h": 0.4, "top_k": 0, "max_new_tokens": 12})
    settings = generation_settings(folder)
    assert settings["top_h"] == 0.4 and settings["temperature"] == 1.0
    m, ids = from_hf(folder), tok.encode("the quick brown fox")
    for flags, kw in (((), {}), (("--top-h", "0.95"), {"top_h": 0.95})):
        s, = well_drawn_seeds(seed % 10_000, 1, m, lambda s: generate(m, [ids], eos_token_id=tok.stop_ids, seed=s,
                                                                       **{**settings, **kw}))
        torch.manual_seed(s)
        with torch.no_grad():
            new = load_hf(folder).generate(torch.tensor([ids]), pad_token_id=0, eos_token_id=tok.stop_ids,
                                           **kw)[0, len(ids):].tolist()
        new = new[: min((new.index(e) for e in tok.stop_ids if e in new), default=len(new))]
        rc, out, err = _run_cli(capsys, folder, "--seed", str(s), "--no-stream", *flags)
        assert rc == 0 and out == tok.decode(ids + new) + "\n", (flags, s)
