"""Adversarial review of HF interop: memory while loading and saving, sharded checkpoints of odd
shapes, to_hf's shard boundaries, configs as they are found in the wild (keys missing, null,
old spellings) and `lmstack convert` on such folders. Each parity check is fp32 against
transformers' own model built from the same folder; a config transformers reads with its family's
defaults must give the same model here, or a one-line error naming the key.
(Cases tests/interop/test_hf.py, test_bad_input.py and test_real_configs.py already cover are not
repeated.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmstack  # noqa: E402
from lmstack.cli import main  # noqa: E402
from lmstack.interop import from_hf, to_hf  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ..hf_models import hf_is_5, load_hf  # noqa: E402

V = 128
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}
BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=128)


def _hf_folder(path: Path, family: str, *, edit=None, scale: float = 2.0, weight_seed: int = 0, save_kw=None,
               **fields) -> Path:
    """save_pretrained of a random tiny ``family`` model (2-D weights x ``scale``), then
    ``edit(config_dict)`` rewrites its config.json in place."""
    cfg_cls, model_cls = (getattr(transformers, c) for c in CLASSES[family])
    torch.manual_seed(weight_seed)
    hf = model_cls(cfg_cls(**{**BASE, **fields})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    hf.save_pretrained(path, **(save_kw or {}))
    if edit is not None:
        cfg = json.loads((path / "config.json").read_text())
        edit(cfg)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _pop(*keys):
    def edit(cfg):
        for k in keys:
            cfg.pop(k, None)
    return edit


def _set(**values):
    return lambda cfg: cfg.update(values)


def _as_4x(**rope):
    """The 4.x spelling: top-level rope_theta (+ rope_scaling), torch_dtype."""
    def edit(cfg):
        cfg.pop("rope_parameters", None)
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        cfg.update(rope)
    return edit


def _logits(model, x):
    out = model(x)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def _logit_diff(m, ref, T: int, batch: int = 2) -> float:
    """max |logits| difference of two models (lmstack or transformers) on random ids (batch, T)."""
    x = torch.randint(0, V, (batch, T))
    with torch.no_grad():
        return (_logits(m, x) - _logits(ref, x)).abs().max().item()


# -- memory: one copy of the weights, never two ---------------------------------------------------------
MEMORY_SCRIPT = r"""
import json, os, sys, threading, time
import torch
import lmstack
import shutil
from pathlib import Path
from lmstack.interop import from_hf, to_hf
from lmstack.io import save_safetensors
from lmstack.train.checkpoint import load_model, save_model_dir

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon"):
            out[k] = int(v.split()[0]) * 1024
    return out

def hwm_growth(fn):
    # peak resident set (VmHWM, reset first) above the resident set before fn
    open("/proc/self/clear_refs", "w").write("5")
    before = status()["VmRSS"]
    result = fn()
    return status()["VmHWM"] - before, result

def anon_growth(fn):
    # peak anonymous memory (file-backed pages of a mapped safetensors file left out), sampled
    base, peak, stop = status()["RssAnon"], [0], [False]
    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], status()["RssAnon"])
            time.sleep(0.0005)
    t = threading.Thread(target=sample)
    t.start()
    try:
        result = fn()
    finally:
        stop[0] = True
        t.join()
    peak[0] = max(peak[0], status()["RssAnon"])
    return peak[0] - base, result

root = sys.argv[1]
torch.manual_seed(0)
tiny = lmstack.Transformer(lmstack.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
for kw in ({}, {"max_shard_bytes": 3000}):  # warm up every code path (lazy imports, kernels)
    to_hf(tiny, f"{root}/warm", **kw)
    from_hf(f"{root}/warm"); from_hf(f"{root}/warm", dtype=torch.bfloat16)
save_model_dir(tiny, Path(root)); load_model(root)
del tiny

cfg = lmstack.ModelConfig(vocab_size=4000, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=256)
model = lmstack.Transformer(cfg)
size = sum(v.numel() * v.element_size() for v in model.stored_state_dict().values())
res = {"size": size, "largest": max(v.numel() * v.element_size() for v in model.stored_state_dict().values())}
res["to_hf"], _ = hwm_growth(lambda: to_hf(model, f"{root}/sharded", max_shard_bytes=8 * 2**20))
# the same weights as one HF file and as an lmstack folder, written without fsync (not measured)
single = Path(root) / "single"
single.mkdir()
shutil.copy(f"{root}/sharded/config.json", single)
save_safetensors({k if k == "lm_head.weight" else "model." + k: v for k, v in model.stored_state_dict().items()},
                 single / "model.safetensors", metadata={"format": "pt"})
(Path(root) / "ours").mkdir()
save_model_dir(model, Path(root) / "ours")
del model
res["from_hf_sharded"], m = hwm_growth(lambda: from_hf(f"{root}/sharded"))
del m
res["from_hf_sharded_bf16"], m = hwm_growth(lambda: from_hf(f"{root}/sharded", dtype="bfloat16"))
del m
res["from_hf_single_anon"], m = anon_growth(lambda: from_hf(single))
del m
res["load_model_anon"], m = anon_growth(lambda: load_model(f"{root}/ours"))  # what convert --to-hf loads with
del m
print("RESULT " + json.dumps(res))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc memory counters")
def test_load_save_and_convert_hold_one_copy_of_the_weights(tmp_path):
    """A ~66 MB fp32 model (hidden 512, 4 layers, vocab 4000): to_hf, from_hf (sharded and single
    file, fp32 and bf16) and load_model (what `convert --to-hf` loads with) never need more than the
    model plus a little, measured in a fresh process (malloc's mmap threshold pinned so freed tensors go
    back to the system and one measurement does not feed the next)."""
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(lmstack.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    size = res["size"]
    assert 50e6 < size < 100e6
    # writing streams the tensors out: no serialised copy of the model in memory
    assert res["to_hf"] < 0.3 * size, res
    # loading: the model, plus at most one shard mapped and one tensor read
    assert res["from_hf_sharded"] < 1.3 * size, res
    assert res["from_hf_sharded_bf16"] < 0.5 * size + 0.3 * size, res  # a bf16 model from fp32 files
    assert res["from_hf_single_anon"] < 1.3 * size, res
    assert res["load_model_anon"] < 1.3 * size, res


# -- sharded checkpoints of odd shapes --------------------------------------------------------------
def test_index_in_any_order_without_format_metadata_and_with_old_inv_freq(tmp_path, seed):
    """A weight_map in reverse order, shards re-saved without {"format": "pt"} metadata, and the
    rotary inv_freq buffers older transformers saved (ignored, as transformers ignores them)."""
    path = _hf_folder(tmp_path / "hf", "llama", save_kw={"max_shard_size": "40KB"})
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    for i, shard in enumerate(shards):
        sd = load_file(path / shard)
        if i == 1:
            for layer in range(2):
                name = f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"
                sd[name] = torch.arange(8, dtype=torch.float32)
                index["weight_map"][name] = shard
        save_file(sd, path / shard)  # no metadata at all
    index["weight_map"] = dict(reversed(list(index["weight_map"].items())))
    index_file.write_text(json.dumps(index))
    ref = load_hf(path)
    assert _logit_diff(from_hf(path), ref, 17) < 1e-4


def test_shards_in_different_dtypes_load_in_the_asked_dtype(tmp_path, seed):
    """Every other shard in bfloat16: dtype=float32 reads each as stored and matches transformers
    (which upcasts the same files); "auto" gives one dtype throughout (config.json's)."""
    path = _hf_folder(tmp_path / "hf", "qwen2", tie_word_embeddings=False, save_kw={"max_shard_size": "40KB"})
    shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    for shard in shards[1::2]:
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(path / shard).items()}, path / shard,
                  metadata={"format": "pt"})
    m = from_hf(path, dtype=torch.float32)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert _logit_diff(m, load_hf(path), 19) < 1e-4
    assert {p.dtype for p in from_hf(path).parameters()} == {torch.float32}  # config.json says float32


# -- to_hf: shard boundaries, tied embeddings -----------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_to_hf_shard_boundaries_and_tied_head_written_once(tmp_path, seed, tied):
    torch.manual_seed(seed)
    cfg = lmstack.ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                              max_seq_len=128, tie_embeddings=tied, qkv_bias=True)
    m = lmstack.Transformer(cfg).eval()
    sd = m.stored_state_dict()
    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    total, largest = sum(sizes.values()), max(sizes.values())
    for limit, n_files in [(total, 1), (total - 1, 2), (largest, None), (largest - 1, None), (1, len(sd))]:
        out = to_hf(m, tmp_path / f"out{limit}", max_shard_bytes=limit)
        files = sorted(out.glob("*.safetensors"))
        assert n_files is None or len(files) == n_files, (limit, [f.name for f in files])
        seen = []
        for f in files:
            with safe_open(f, "pt") as h:
                names = list(h.keys())
            seen += names
            shard_bytes = sum(sizes[k.removeprefix("model.")] for k in names)
            assert len(names) == 1 or shard_bytes <= limit, (limit, f.name, shard_bytes)
        assert sorted(seen) == sorted(set(seen)) and len(seen) == len(sd)  # each tensor once
        assert ("lm_head.weight" in seen) == (not tied)  # a tied head is not written twice
        if len(files) > 1:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert index["metadata"]["total_size"] == total and sorted(index["weight_map"]) == sorted(seen)
            assert all(index["weight_map"][k] == f.name for f in files for k in safe_open(f, "pt").keys())
    ref = load_hf(tmp_path / f"out{largest}")
    assert ref.config.tie_word_embeddings == tied
    assert _logit_diff(m, ref, 13) < 1e-4


# -- configs seen in the wild: parity with transformers ---------------------------------------------------
PARITY_CASES = {
    # Llama with head_dim != hidden_size / heads (64 / 4 = 16)
    "llama-head_dim-32": ("llama", dict(head_dim=32), None, 21),
    # rope_theta written as an int, 4.x spelling, rope_scaling null
    "llama-rope_theta-int": ("llama", {}, _as_4x(rope_theta=500000, rope_scaling=None), 21),
    # transformers 5 spelling with an int theta
    "llama-rope_parameters-int": ("llama", {}, _set(rope_parameters={"rope_type": "default", "rope_theta": 50000}), 21),
    # the old "type" key of rope_scaling (not "rope_type"), an int factor
    "llama-rope_scaling-type-key": ("llama", {}, _as_4x(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2}),
                                    100),
    # missing optional keys: transformers' defaults (rms_norm_eps 1e-6, untied, MHA)
    "llama-minimal": ("llama", dict(rms_norm_eps=1e-6, num_key_value_heads=4),
                      _pop("rms_norm_eps", "tie_word_embeddings", "num_key_value_heads", "head_dim", "dtype"), 21),
    "llama-pretraining_tp-2": ("llama", {}, _set(pretraining_tp=2), 21),
    "qwen2-no-tie-key": ("qwen2", dict(tie_word_embeddings=False), _pop("tie_word_embeddings"), 21),
}


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_configs_in_the_wild_match_transformers(tmp_path, seed, name):
    if "rope_parameters" in name and not hf_is_5():
        pytest.skip("transformers 4.x does not read the rope_parameters spelling (5.x's): no reference")
    family, fields, edit, T = PARITY_CASES[name]
    path = _hf_folder(tmp_path / "hf", family, edit=edit, **fields)
    ref = load_hf(path)
    m = from_hf(path)
    assert m.config.head_dim == (getattr(ref.config, "head_dim", None) or 64 // 4)
    assert m.config.n_kv_heads == ref.config.num_key_value_heads
    assert m.config.norm_eps == ref.config.rms_norm_eps
    assert _logit_diff(m, ref, T) < 1e-4


def test_mistral_without_sliding_window_key_uses_transformers_default_window(tmp_path, seed):
    """A Mistral config.json with no "sliding_window" key: MistralConfig's default is 4096, so
    transformers attends over the last 4096 tokens; lmstack read the absence as 'no window' and
    attended over everything (logits differ from token 4096 on)."""
    path = _hf_folder(tmp_path / "hf", "mistral", edit=_pop("sliding_window"), scale=4.0, hidden_size=16,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, intermediate_size=32,
                      max_position_embeddings=8192)
    ref = load_hf(path)
    assert ref.config.sliding_window == 4096
    m = from_hf(path)
    assert m.config.sliding_window == ref.config.sliding_window
    assert _logit_diff(m, ref, 4096 + 48, batch=1) < 1e-4


@pytest.mark.parametrize("family,heads,kv", [("mistral", 16, 8), ("qwen2", 64, 32)])
def test_absent_num_key_value_heads_follows_the_family_default(tmp_path, seed, family, heads, kv):
    """num_key_value_heads absent means MHA for Llama, but MistralConfig defaults it to 8 and
    Qwen2Config to 32: transformers loads these checkpoints, lmstack refused them with a k_proj
    shape error (it assumed MHA)."""
    path = _hf_folder(tmp_path / "hf", family, edit=_pop("num_key_value_heads"), hidden_size=128,
                      num_attention_heads=heads, num_key_value_heads=kv)
    ref = load_hf(path)
    assert ref.config.num_key_value_heads == kv
    m = from_hf(path)
    assert m.config.n_kv_heads == kv
    assert _logit_diff(m, ref, 11) < 1e-4


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_absent_max_position_embeddings_follows_the_family_default(tmp_path, seed, family):
    """max_position_embeddings absent: Qwen2Config says 32768, MistralConfig 131072 (LlamaConfig
    2048); lmstack took 2048 for every family and refused a 2100-token input transformers runs."""
    fields = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=32)
    if family == "mistral":
        fields["sliding_window"] = None
    path = _hf_folder(tmp_path / "hf", family, edit=_pop("max_position_embeddings"), **fields)
    ref = load_hf(path)
    m = from_hf(path)
    assert m.config.max_seq_len == ref.config.max_position_embeddings
    assert _logit_diff(m, ref, 2100, batch=1) < 1e-4


# -- configs lmstack cannot run: one line naming the key ---------------------------------------------------
@pytest.mark.parametrize("family,fields,key", [
    ("llama", dict(attention_bias=True), "attention_bias"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "use_sliding_window"),
])
def test_unsupported_options_are_named(tmp_path, family, fields, key):
    path = _hf_folder(tmp_path / "hf", family, **fields)
    with pytest.raises(ValueError, match=key):
        from_hf(path)


@pytest.mark.parametrize("fields,window", [
    (dict(use_sliding_window=True, sliding_window=5, max_window_layers=0), 5),  # every layer windowed
    (dict(use_sliding_window=True, sliding_window=5, max_window_layers=2), None),  # no layer is
    (dict(use_sliding_window=True, sliding_window=5), None),  # max_window_layers absent: 28 (of 2 layers)
    (dict(hidden_act="swish"), None),  # transformers' other name for silu
])
def test_qwen2_windows_and_swish_follow_transformers(tmp_path, seed, fields, window):
    """Qwen2 gives the window to the layers from max_window_layers on: all of them is Mistral's
    uniform window, none of them plain attention; lmstack refused both."""
    path = _hf_folder(tmp_path / "hf", "qwen2", weight_seed=seed, **fields)
    ref = load_hf(path)
    m = from_hf(path)
    assert m.config.sliding_window == window
    assert _logit_diff(m, ref, 19) < 1e-4


@pytest.mark.parametrize("key,edit", [
    ("rms_norm_eps", _set(rms_norm_eps=None)),
    ("initializer_range", _set(initializer_range=None)),
    ("rope_theta", _as_4x(rope_theta=None, rope_scaling=None)),
    ("rope_theta", _set(rope_parameters={"rope_type": "default", "rope_theta": None})),
], ids=["rms_norm_eps", "initializer_range", "rope_theta-4.x", "rope_theta-5.x"])
def test_null_numbers_in_config_are_one_line_errors(tmp_path, capsys, key, edit):
    """A null where config.json needs a number (transformers refuses these too): lmstack raised a
    bare TypeError ('<' not supported between 'int' and 'NoneType', float() argument must be ...),
    which `lmstack convert` let escape as a traceback."""
    path = _hf_folder(tmp_path / "hf", "llama", edit=edit)
    with pytest.raises(ValueError, match=key):
        from_hf(path)
    capsys.readouterr()  # (transformers' progress bars from writing the folder)
    assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err
    assert not (tmp_path / "out").exists()


# -- `lmstack convert` both ways on odd folders ---------------------------------------------------------
@pytest.mark.parametrize("family,fields,edit", [
    ("llama", dict(head_dim=32, tie_word_embeddings=True),
     _as_4x(rope_theta=20000, rope_scaling={"type": "linear", "factor": 2.0})),
    ("mistral", dict(head_dim=32, sliding_window=6), _pop("rms_norm_eps")),
])
def test_cli_convert_round_trip_of_odd_folders(tmp_path, seed, family, fields, edit):
    src = _hf_folder(tmp_path / "hf", family, edit=edit, **fields)
    ref = load_hf(src)
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = load_hf(tmp_path / "back")
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # noqa: E731
    assert head_dim(back.config) == head_dim(ref.config)
    for key in ("num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "sliding_window"):
        assert getattr(back.config, key, None) == getattr(ref.config, key, None), key
    files = [f for f in (tmp_path / "back").glob("*.safetensors")]
    names = [k for f in files for k in safe_open(f, "pt").keys()]
    assert ("lm_head.weight" in names) == (not ref.config.tie_word_embeddings)
    assert _logit_diff(back, ref, 40) < 1e-4
    assert _logit_diff(lmstack.train.load_model(tmp_path / "ours"), ref, 40) < 1e-4
