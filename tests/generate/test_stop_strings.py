"""Stop strings against HF ``generate(stop_strings=..., tokenizer=...)`` and a plain text search.

Each stop string is cut from what the model says without it (at a random offset, so it usually
begins inside a token and spans several), so it must shorten the output: checked, then the
sequences (and beam scores) must equal transformers' on the same weights and tokenizer, for a
byte-level BPE (GPT-2 / Llama 3 / Qwen2 style) and a SentencePiece BPE with byte fallback (Llama 2
/ Mistral style). The automaton itself is checked against a brute-force search of the text.

The batched comparisons set an EOS id and a nonzero pad id, as every real checkpoint does: without
an EOS id transformers does not pad a row that a stop string ended (it goes on generating it until
every row has stopped; lmstack pads it), and its beam search fills with -1, or with the first EOS id
when ``pad_token_id`` is 0.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmstack.data.tokenizer import Tokenizer
from lmstack.generate import generate, generate_stream
from lmstack.generate.stops import StopStrings, match_automaton

from ..hf_models import no_special_tokens, tiny_hf
from ..hf_tokenizers import byte_level_bpe, sentencepiece_bpe

transformers = pytest.importorskip("transformers")

CORPUS = ["You are a helpful assistant. What is the weather in Paris today? It is sunny, 22 degrees.\n" * 10,
          "Hello world, hello there! The quick brown fox jumps over the lazy dog. naïve café 東京 😀\n" * 10]
PROMPTS = ["What is the weather", "Hello there! The quick brown", "sunny"]
KINDS = ("byte-level", "sentencepiece")


@pytest.fixture(scope="module", params=KINDS)
def setup(request, tmp_path_factory):
    """(kind, folder, lmstack Tokenizer, transformers tokenizer, HF model, lmstack model, ids kw):
    ids kw = the EOS id (the tokenizer's end-of-text token) and a pad id."""
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    if kind == "byte-level":
        tok = byte_level_bpe(CORPUS, 400, ["<|endoftext|>"])
    else:
        tok = sentencepiece_bpe(CORPUS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    ours = Tokenizer.from_file(folder)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    h, m = tiny_hf("llama", vocab=tok.get_vocab_size(), scale=3.0)
    eos = tok.token_to_id("<|endoftext|>" if kind == "byte-level" else "</s>")
    return kind, folder, ours, theirs, no_special_tokens(h), m, dict(eos_token_id=eos, pad_token_id=eos + 1)


def left_padded(tok: Tokenizer, texts: list[str], pad: int):
    rows = [tok.encode(t) for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def hf_out(h, ids, mask, n, theirs, **kw):
    with torch.no_grad():
        out = h.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, tokenizer=theirs, **kw)
    return out.sequences, getattr(out, "sequences_scores", None)


def stop_text_from(ours: Tokenizer, new_ids: list[int], rng: random.Random, length: int = 3) -> str:
    """A piece of the text new_ids stand for, from its middle (no partial UTF-8 character)."""
    text = b"".join(ours.token_texts()[i] for i in new_ids).decode("utf-8", errors="replace")
    starts = [i for i in range(1, len(text) - length) if "\ufffd" not in text[i : i + length]]
    assert starts, f"the model said too little to cut a stop string from: {text!r}"
    i = rng.choice(starts[: max(1, len(starts) // 2)])  # from the first half: it ends the output early
    return text[i : i + length]


def text_stops(texts: list[bytes], seq: list[int], prompt_len: int, stops: list[str]) -> int | None:
    """Brute force: the first new position whose token completes a stop string (the string ends
    inside that token), or None."""
    for t in range(prompt_len, len(seq)):
        text = b"".join(texts[i] for i in seq[: t + 1])
        last = len(texts[seq[t]])
        for s in (s.encode() for s in stops):
            if any(text[k : k + len(s)] == s and k + len(s) > len(text) - last for k in range(len(text))):
                return t
    return None


# -- the automaton -------------------------------------------------------------------------------
def test_automaton_states_are_longest_prefix_suffixes(seed):
    rng = random.Random(seed)
    for _ in range(50):
        pattern = bytes(rng.choice(b"ab\xc3") for _ in range(rng.randint(1, 6)))
        delta = match_automaton(pattern)
        text, state = b"", 0
        for _ in range(30):
            c = rng.choice(b"ab\xc3x")
            text += bytes([c])
            state = int(delta[state, c])
            want = max(k for k in range(len(pattern) + 1) if text.endswith(pattern[:k]))
            assert state == want, (pattern, text)


def test_stop_strings_match_a_text_search(seed):
    """Random vocabularies (multi-byte characters, tokens of 0..5 bytes) and stop strings that
    overlap themselves ("aa", "abab"): a hit exactly where a stop string ends inside the last
    token, the prompt included, never before the first new token."""
    rng = random.Random(seed)
    pieces = ["a", "b", "é", "東", " "]
    for trial in range(300):
        V = rng.randint(1, 40)
        texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 3))).encode() for _ in range(V)]
        texts = [t[: rng.randint(0, len(t))] if rng.random() < 0.2 else t for t in texts]  # broken UTF-8 too
        stops = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        ss = StopStrings(stops, token_texts=texts)
        nonempty = [i for i in range(V) if texts[i]] or [0]
        seq = [rng.choice(nonempty) for _ in range(rng.randint(1, 6))]  # prompt tokens stand for text
        P = len(seq)
        states = ss.start(torch.tensor([seq]), None)
        for _ in range(10):
            t = rng.randrange(V)
            seq.append(t)
            states, hit = ss.step(states, torch.tensor([t]))
            assert bool(hit) == (text_stops(texts, seq, len(seq) - 1, stops) is not None), (texts, stops, seq, P)
            if hit:
                break


def test_start_skips_padding():
    texts = [b"x", b"st", b"op", b"p"]
    ss = StopStrings(["stop"], token_texts=texts)
    ids = torch.tensor([[1, 3, 1], [0, 3, 1]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])  # row 0: only "st"; row 1: "x p st"
    states = ss.start(ids, mask)
    assert states.tolist() == [[2], [2]]
    _, hit = ss.step(states, torch.tensor([2, 2]))
    assert hit.tolist() == [True, True]
    with_padding = ss.start(torch.tensor([[1, 2, 1]]), torch.tensor([[1, 0, 1]]))  # "st" (op skipped) "st"
    assert with_padding.tolist() == [[2]]


# -- against transformers --------------------------------------------------------------------------
def test_token_texts_spell_the_decoded_text(setup, seed):
    """Token texts joined = transformers' decode of the ids (SentencePiece: less the one leading
    space its decoder strips; a byte-fallback piece stands for its byte, checked apart, as HF's
    decoder turns every piece of a run with a broken character into U+FFFD)."""
    kind, _, ours, theirs, *_ = setup
    rng = random.Random(seed)
    texts = ours.token_texts()
    special = set(ours.hf.get_added_tokens_decoder())
    pieces = {i: ours.id_to_token(i) for i in range(len(texts))}
    byte_pieces = {i for i, p in pieces.items() if p is not None and len(p) == 6 and p.startswith("<0x")}
    if kind == "sentencepiece":
        assert len(byte_pieces) == 256 and all(texts[i] == bytes([int(pieces[i][3:5], 16)]) for i in byte_pieces)
    plain = [i for i in range(len(texts)) if i not in special and i not in byte_pieces and texts[i]]
    for i in special:
        assert texts[i] == pieces[i].encode()
    for _ in range(50):
        ids = [rng.choice(plain) for _ in range(rng.randint(1, 12))]
        joined = b"".join(texts[i] for i in ids).decode("utf-8", errors="replace")
        if kind == "sentencepiece":
            joined = joined.removeprefix(" ")  # the decoder strips one leading space
        assert theirs.decode(ids) == joined, ids


def test_token_texts_are_what_hf_stop_strings_read(setup):
    """transformers' own per-token text for stop strings (5.x, matching on bytes), id by id."""
    from transformers.generation.stopping_criteria import StopStringCriteria as SSC

    if not hasattr(SSC, "_get_stop_string_matching_mode"):
        pytest.skip("this transformers matches stop strings on decoded strings, not bytes")
    kind, _, ours, theirs, *_ = setup
    mode = SSC._get_stop_string_matching_mode(theirs)
    assert mode == ("byte_level" if kind == "byte-level" else "byte_fallback")
    texts, ids = SSC.clean_tokenizer_vocab(theirs, stop_string_matching_mode=mode)
    ours_texts = ours.token_texts()
    assert len(ids) == len(ours_texts)
    for text, i in zip(texts, ids):
        assert ours_texts[i] == text, (i, ours.id_to_token(i))


def test_greedy_batch_matches_hf(setup, seed):
    kind, _, ours, theirs, h, m, special = setup
    rng = random.Random(seed)
    pad = special["pad_token_id"]
    ids, mask = left_padded(ours, PROMPTS, pad)
    free, _ = hf_out(h, ids, mask, 16, theirs, **special)
    T = ids.shape[1]
    stops = [stop_text_from(ours, free[0, T:].tolist(), rng), stop_text_from(ours, free[2, T:].tolist(), rng)]
    ref, _ = hf_out(h, ids, mask, 16, theirs, stop_strings=stops, **special)
    out = generate(m, ids, 16, attention_mask=mask, stop_strings=stops, tokenizer=ours, **special)
    assert torch.equal(out.sequences, ref), (stops, out.sequences[:, T:], ref[:, T:])
    texts = ours.token_texts()
    for row, full in zip(out.sequences.tolist(), free.tolist()):  # the rows end where the text search says
        end = text_stops(texts, full, T, stops)
        if special["eos_token_id"] in full[T:]:
            end = min(full.index(special["eos_token_id"], T), len(full) if end is None else end)
        if end is not None:
            assert row[: end + 1] == full[: end + 1] and set(row[end + 1 :]) <= {pad}
        else:
            assert row == full[: len(row)]
    assert out.sequences.shape[1] < free.shape[1] or (out.sequences != free).any(), "the stop strings changed nothing"


def test_beam_search_matches_hf(setup, seed):
    kind, _, ours, theirs, h, m, special = setup
    rng = random.Random(seed)
    ids, mask = left_padded(ours, PROMPTS[:2], special["pad_token_id"])
    kw = dict(num_beams=3, num_return_sequences=2, length_penalty=0.5, **special)
    free, free_scores = hf_out(h, ids, mask, 14, theirs, **kw)
    T = ids.shape[1]
    stops = [stop_text_from(ours, free[0, T:].tolist(), rng)]
    ref, ref_scores = hf_out(h, ids, mask, 14, theirs, stop_strings=stops, **kw)
    assert not torch.equal(ref_scores, free_scores), "the stop string changed no hypothesis"
    out = generate(m, ids, 14, attention_mask=mask, stop_strings=stops, tokenizer=ours, **kw)
    assert torch.equal(out.sequences, ref), (stops, out.sequences[:, T:], ref[:, T:])
    torch.testing.assert_close(out.scores, ref_scores, atol=1e-4, rtol=1e-5)


def test_stop_string_begun_in_the_prompt(setup):
    """A stop string wholly inside the prompt stops nothing; one that begins in the prompt and ends
    in the first new token stops there (HF's criterion reads the whole sequence)."""
    kind, _, ours, theirs, h, m, _ = setup
    texts = ours.token_texts()
    for prompt in PROMPTS:  # one whose first new token begins with a whole (ASCII) character
        ids = torch.tensor([ours.encode(prompt)])
        first = texts[int(generate(m, ids, 1).sequences[0, -1])]
        if first[:1].isascii() and first[:1]:
            break
    else:
        pytest.fail("every prompt's first new token begins inside a character")
    for stops in ([prompt[1:5]], [prompt[-2:] + first[:1].decode()]):
        ref, _ = hf_out(h, ids, None, 10, theirs, stop_strings=stops)
        out = generate(m, ids, 10, stop_strings=stops, tokenizer=ours)
        assert torch.equal(out.sequences, ref), stops
    assert out.sequences.shape[1] == ids.shape[1] + 1  # the second stopped at once


def test_sampling_stops_where_the_text_search_says(setup, seed):
    """Sampling with a seed draws the same tokens with or without stop strings until a row stops."""
    kind, _, ours, theirs, h, m, special = setup
    rng = random.Random(seed)
    pad = special["pad_token_id"]
    ids, mask = left_padded(ours, PROMPTS, pad)
    kw = dict(attention_mask=mask, pad_token_id=pad, temperature=1.0, top_k=20, seed=seed)
    free = generate(m, ids, 16, **kw).sequences
    T = ids.shape[1]
    stops = [stop_text_from(ours, free[1, T:].tolist(), rng, 2)]
    out = generate(m, ids, 16, stop_strings=stops, tokenizer=ours, **kw).sequences
    texts = ours.token_texts()
    ends = [text_stops(texts, full, T, stops) for full in free.tolist()]
    assert ends[1] is not None
    for row, full, end in zip(out.tolist(), free.tolist(), ends):
        n = len(row) if end is None else end + 1
        assert row[:n] == full[:n] and set(row[n:]) <= {pad}
    assert out.shape[1] == (max(ends) + 1 if None not in ends else free.shape[1])


def test_stream_yields_the_stop_token_and_ends(setup, seed):
    kind, _, ours, theirs, h, m, special = setup
    rng = random.Random(seed)
    ids = ours.encode(PROMPTS[1])
    free = generate(m, [ids], 16).sequences[0, len(ids) :].tolist()
    stops = [stop_text_from(ours, free, rng)]
    want = generate(m, [ids], 16, stop_strings=stops, tokenizer=ours).sequences[0, len(ids) :].tolist()
    assert len(want) < len(free)
    assert list(generate_stream(m, ids, 16, stop_strings=stops, tokenizer=ours)) == want
    built = StopStrings(stops, ours, vocab_size=m.config.vocab_size)  # built once, passed without the tokenizer
    assert list(generate_stream(m, ids, 16, stop_strings=built)) == want


# -- bad input --------------------------------------------------------------------------------------
def test_bad_stop_strings_are_one_line_errors(setup):
    kind, _, ours, theirs, h, m, special = setup
    ids = [ours.encode("Hello")]
    with pytest.raises(ValueError, match="needs the tokenizer that the ids come from") as e:
        generate(m, ids, 4, stop_strings=["x"])
    assert len(str(e.value).splitlines()) == 1
    for bad in ("", [], ["ok", ""], [3], {"x": 1}):
        with pytest.raises(ValueError, match="must be a non-empty string or a list of them"):
            generate(m, ids, 4, stop_strings=bad, tokenizer=ours)
    small = StopStrings(["x"], token_texts=[b"x"] * 10)
    with pytest.raises(ValueError, match=f"built for 10 token ids, but the model has {m.config.vocab_size}"):
        generate(m, ids, 4, stop_strings=small)


def test_tokenizers_without_text_per_token_are_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"],
                                                              show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="needs a byte-level BPE or SentencePiece tokenizer"):
        StopStrings(["x"], Tokenizer.from_file(tmp_path / "tokenizer.json"))


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_stop_and_generation_config_match_hf(setup, capsys, seed, tmp_path):
    """`lmstack generate --raw --stop TEXT` and a generation_config.json with stop_strings print
    what transformers' generate decodes (the stop text included)."""
    from lmstack.cli import main

    capsys.readouterr()
    kind, folder, ours, theirs, h, m, _ = setup
    rng = random.Random(seed)
    model_dir = tmp_path / "model"
    h.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((folder / name).read_bytes())
    prompt = PROMPTS[0]
    ids = torch.tensor([ours.encode(prompt)])
    free = generate(m, ids, 12).sequences[0, ids.shape[1] :].tolist()
    stop = stop_text_from(ours, free, rng)
    ref, _ = hf_out(h, ids, None, 12, theirs, stop_strings=[stop])
    reply = theirs.decode(ref[0].tolist(), skip_special_tokens=True)
    assert len(ref[0]) < ids.shape[1] + 12, "the stop string changed nothing"
    argv = ["generate", "--hf", str(model_dir), "--raw", "--prompt", prompt, "--temperature", "0",
            "--max-new-tokens", "12", "--device", "cpu"]
    for extra in (["--stop", stop.replace("\n", "\\n")], ["--stop", stop, "--no-stream"]):
        assert main([*argv, *extra]) == 0
        assert capsys.readouterr().out == reply + "\n", extra
    (model_dir / "generation_config.json").write_text(json.dumps({"stop_strings": stop}))
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == reply + "\n" and "stop_strings" not in captured.err
    assert main([*argv, "--stop", "\ufffe never said"]) == 0  # the flag replaces the file's
    assert capsys.readouterr().out == theirs.decode(generate(m, ids, 12).sequences[0].tolist(),
                                                    skip_special_tokens=True) + "\n"
