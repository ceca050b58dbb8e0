"""Bad input to HF interop and decoding: a clear one-line error naming what is wrong, and nothing
written or lost on failure. (The cases test_hf.py, test_cli.py and tests/generate already cover are
not repeated here.)"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmstack
import lmstack.interop.hf as hfmod
from lmstack.cli import main
from lmstack.generate import generate, generate_stream
from lmstack.interop import from_hf, to_hf

from ..hf_models import edit_json

CFG = lmstack.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lmstack.Transformer(CFG).eval()


@pytest.fixture(scope="module")
def dirs(model, tmp_path_factory):
    """An HF checkpoint folder (one file) and a sharded one, written once; tests copy them."""
    root = tmp_path_factory.mktemp("hf")
    return {"single": to_hf(model, root / "single"), "sharded": to_hf(model, root / "sharded", max_shard_bytes=10_000)}


def _copy(dirs, tmp_path, kind="single"):
    return shutil.copytree(dirs[kind], tmp_path / "hf")


def _edit_config(path, **changes):
    return edit_json(path / "config.json", **changes)


def _listing(path):
    return sorted(p.name for p in path.iterdir())


# -- config.json --------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                 "intermediate_size"])
def test_missing_config_key_names_the_key_and_file(dirs, tmp_path, key):
    """Was: a bare KeyError('hidden_size') from config_from_hf."""
    path = _edit_config(_copy(dirs, tmp_path), **{key: KeyError})
    with pytest.raises(ValueError, match=rf"config\.json.*{key}"):
        from_hf(path)


@pytest.mark.parametrize("key, value", [
    ("rms_norm_eps", "1e-5"),  # was TypeError: '<' not supported between 'int' and 'str'
    ("rope_scaling", "linear"),  # was AttributeError: 'str' object has no attribute 'get'
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 10000.0}),  # was KeyError: 'factor'
    ("hidden_size", "32"),  # was "dim='32' must be a positive integer": names neither the key nor the file
])
def test_wrongly_typed_config_value_names_the_key(dirs, tmp_path, key, value):
    path = _edit_config(_copy(dirs, tmp_path), **{key: value})
    with pytest.raises(ValueError, match=rf"config\.json.*{key}|{key}.*config\.json"):
        from_hf(path)


def test_config_that_is_not_an_object(dirs, tmp_path):
    """Was: AttributeError: 'list' object has no attribute 'get'."""
    path = _copy(dirs, tmp_path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json"):
        from_hf(path)


def test_cli_bad_config_is_one_line_and_writes_nothing(dirs, tmp_path, capsys):
    """Was: the KeyError escaped main() as a traceback."""
    path = _edit_config(_copy(dirs, tmp_path), hidden_size=KeyError)
    assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "hidden_size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_config_with_fewer_layers_than_the_checkpoint_is_an_error(dirs, tmp_path):
    """Was: loads silently, dropping model.layers.1.* (a wrong model, no warning)."""
    path = _edit_config(_copy(dirs, tmp_path), num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"model\.layers\.1\."):
        from_hf(path)


# -- safetensors files and the shard index --------------------------------------------------------
@pytest.mark.parametrize("index", ["[]", '{"weight_map": []}', '{"weight_map": {"lm_head.weight": 5}}'])
def test_malformed_index_names_the_index(dirs, tmp_path, index):
    """Was: TypeError / AttributeError from _weight_files."""
    path = _copy(dirs, tmp_path, "sharded")
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        from_hf(path)


def test_tensor_the_index_names_missing_from_its_shard(dirs, tmp_path):
    """Was: "'lm_head.weight' could not be read (truncated or corrupt file: ...)": the file is
    fine, the index and the shard disagree."""
    path = _copy(dirs, tmp_path, "sharded")
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    sd = load_file(path / shard)
    del sd["lm_head.weight"]
    save_file(sd, path / shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lm_head\.weight") as e:
        from_hf(path)
    assert shard in str(e.value) and "index" in str(e.value) and "truncated" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_non_float_tensor_is_an_error(dirs, tmp_path, dtype):
    """Was: loads silently, the integer tensor cast into the float weight."""
    path = _copy(dirs, tmp_path)
    sd = load_file(path / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(CFG.dim, dtype=dtype)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*(int32|bool)"):
        from_hf(path)


# pinned (already right, not covered elsewhere)
def test_zero_byte_and_mid_tensor_truncated_shards(dirs, tmp_path):
    path = _copy(dirs, tmp_path, "sharded")
    shards = sorted(path.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) - 100])  # header intact, data short
    with pytest.raises(ValueError, match=rf"{shards[1].name} is not a readable safetensors file"):
        from_hf(path)
    shards[1].write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{shards[1].name} is not a readable safetensors file"):
        from_hf(path)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shards[1].name} not found"):
        from_hf(path)


# -- to_hf: what is already there is never lost ------------------------------------------------------
def test_to_hf_refuses_a_folder_that_is_not_a_checkpoint(model, tmp_path):
    """Was: the folder and everything in it replaced without a word."""
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises((ValueError, FileExistsError), match="mine"):
        to_hf(model, out)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub").is_dir()


def test_to_hf_refuses_a_path_that_is_a_file(model, tmp_path):
    """Was: the file replaced by a directory, and a '.afile.old-PID' left beside it."""
    f = tmp_path / "afile"
    f.write_text("data")
    with pytest.raises((ValueError, FileExistsError, NotADirectoryError), match="afile"):
        to_hf(model, f)
    assert f.read_text() == "data" and _listing(tmp_path) == ["afile"]


def test_to_hf_missing_tokenizer_dir_is_an_error(model, tmp_path):
    """Was: a checkpoint without tokenizer and with null special-token ids, silently."""
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        to_hf(model, tmp_path / "out", tokenizer_dir=tmp_path / "nope")
    assert not (tmp_path / "out").exists()


def test_to_hf_failure_creates_no_parent_folders(model, tmp_path, monkeypatch):
    """Was: the missing parents made before writing, and left behind on failure."""
    def full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hfmod, "save_safetensors", full)
    with pytest.raises(OSError, match="disk full"):
        to_hf(model, tmp_path / "new" / "out")
    assert _listing(tmp_path) == []


# pinned: Ctrl-C part-way through replacing a checkpoint keeps the old one and leaves no temp dir
def test_to_hf_interrupted_after_first_shard_keeps_the_old_checkpoint(model, dirs, tmp_path, monkeypatch):
    out = _copy(dirs, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = hfmod.save_safetensors, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hfmod, "save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        to_hf(model, out, max_shard_bytes=10_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _listing(tmp_path) == ["hf"]


@pytest.mark.parametrize("where", ["same", "parent"])
def test_cli_convert_never_replaces_its_own_source(dirs, tmp_path, capsys, where):
    """Was: rc 0, and the HF folder (or the folder holding it) replaced by the lmstack copy."""
    src = shutil.copytree(dirs["single"], tmp_path / "parent" / "hf")
    out = src if where == "same" else src.parent
    assert main(["convert", "--from-hf", str(src), "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert _listing(src) == _listing(dirs["single"])


def test_cli_generate_unknown_device_is_one_line(dirs, capsys):
    """Was: torch's RuntimeError escaped main() as a traceback."""
    assert main(["generate", "--hf", str(dirs["single"]), "--prompt", "x", "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tpu" in err and len(err.splitlines()) == 1


# pinned
def test_cli_generate_hf_without_tokenizer(dirs, capsys):
    assert main(["generate", "--hf", str(dirs["single"]), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no tokenizer.json" in err and len(err.splitlines()) == 1


# -- generate argument checking --------------------------------------------------------------------
@pytest.mark.parametrize("name, kw", [
    ("max_new_tokens", dict(max_new_tokens=2.5)),  # was TypeError from torch.zeros in the cache
    ("max_new_tokens", dict(max_new_tokens="2")),
    ("max_length", dict(max_new_tokens=None, max_length=2.5)),
    ("max_length=3 counts the prompt's 3 tokens", dict(max_new_tokens=None, max_length=3)),
    ("temperature", dict(temperature="1")),  # was TypeError from the comparison
    ("top_p", dict(temperature=1.0, top_p="0.9")),  # was TypeError from the comparison
    ("top_k", dict(temperature=1.0, top_k=True)),  # was TypeError from torch.topk
    ("eos_token_id", dict(eos_token_id="x")),  # was "invalid literal for int() with base 10: 'x'"
    ("seed", dict(temperature=1.0, seed="x")),  # was RuntimeError from manual_seed
    ("attention_mask", dict(attention_mask=[[1, 1, 1]])),  # was AttributeError: 'list' has no 'dim'
])
def test_wrongly_typed_generate_argument_is_named(model, name, kw):
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=name):
        generate(model, torch.tensor([[1, 2, 3]]), **kw)


def test_text_prompt_says_to_encode_it(model):
    """Was: ValueError "too many dimensions 'str'"."""
    with pytest.raises(ValueError, match="token"):
        generate(model, "hello", 2)
    with pytest.raises(ValueError, match="token"):
        generate_stream(model, "hello", 2)


@pytest.mark.parametrize("case", ["pad_token_id", "masked_ids"])
def test_padding_ids_outside_the_vocabulary(model, case):
    """Was: IndexError from the embedding. Padding is masked, so it may either work or be refused
    with a ValueError naming the pad id; never an IndexError from deep inside."""
    try:
        if case == "pad_token_id":
            generate(model, [[1, 2], [3]], 2, pad_token_id=CFG.vocab_size + 5)
        else:  # -100 (a label-ignore id) at positions the mask says are padding
            generate(model, torch.tensor([[-100, 5, 6], [4, 5, 6]]), 2,
                     attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    except ValueError as e:
        assert "pad" in str(e)


@pytest.mark.parametrize("prompt", [[[1.0, 2.7]], [1, 2.5], torch.tensor([[True, False]]), [[1, True]]])
def test_non_integer_prompt_ids_are_refused(model, prompt):
    """Was: float lists truncated to ints (2.7 -> 2) and bool tensors read as ids 1 and 0, silently."""
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, prompt, 2)


def test_numpy_integer_lists_are_prompts(model):
    """A list of numpy integers (ids taken out of an array one by one) is a prompt like ints are."""
    import numpy as np

    ids = [1, 2, 3]
    assert torch.equal(generate(model, [np.int64(i) for i in ids], 3).sequences, generate(model, ids, 3).sequences)


@pytest.mark.parametrize("kw", [dict(max_shard_bytes="1GB"), dict(max_shard_bytes=0)])
def test_to_hf_bad_arguments(model, tmp_path, kw):
    """Was: TypeError for "1GB"; 0 silently wrote one shard per tensor."""
    with pytest.raises(ValueError, match="max_shard_bytes"):
        to_hf(model, tmp_path / "out", **kw)
    with pytest.raises(ValueError, match="lmstack Transformer"):
        to_hf(torch.nn.Linear(2, 2), tmp_path / "out")
    assert _listing(tmp_path) == []


def test_stream_refuses_non_integer_ids_like_generate(model):
    """generate_stream goes through the same prompt checks: float ids were truncated there (1.9 -> 1),
    bool ones read as 0/1; an empty prompt is still called empty."""
    for prompt in ([1, 1.9], torch.tensor([True, False]), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="integer token ids"):
            generate_stream(model, prompt, 2)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_stream(model, [], 2)
