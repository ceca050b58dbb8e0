"""Adversarial tests of the benchmark scripts' methodology (bench/*.py, bench/gpu_session.sh), on tiny
shapes on the CPU. A published ratio is only honest if both sides do the same work, the bench checks
that both produced the same output, and the tables in the docs are the JSON's. The timing itself is
never asserted on: clocks are stubbed where a figure's arithmetic is checked.

Nothing here writes to the checkout's bench/results or docs: every script's ROOT points at a
temporary directory."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import lmstack

from .hf_models import hf_sorts_beam_samples

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
VENV_BIN = Path(sys.executable).parent


def load_bench(name: str):
    """bench/<name>.py as a fresh module (its ``from common import ...`` finds bench/common.py)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fake repository root for publish/update_docs: bench/results and docs/benchmarks.md there."""
    if str(BENCH) not in sys.path:
        monkeypatch.syspath_prepend(str(BENCH))  # `common` as the scripts import it
    import common

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", tmp_path / "docs" / "benchmarks.md")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    return tmp_path


def tiny_cfg(preset="tiny", **kw):
    base = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=256)
    base.update(kw)
    return lmstack.ModelConfig.from_preset(preset, **base)


# -- the HF twin: the model HF is timed on must be the one a user loads ----------------------------


@pytest.mark.parametrize("preset", ["tiny", "llama-1.1b"])
def test_hf_twin_fp32_logits_equal_lmstack(seed, preset):
    common = load_bench("common")
    m = lmstack.Transformer(tiny_cfg(preset)).double().eval()
    with torch.no_grad():  # weights away from the init scale, as decode_vs_hf scales them
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.mul_(3.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    hf = common.hf_twin(m).eval()
    ids = torch.randint(0, 256, (2, 96))
    with torch.no_grad():
        # both take RoPE from fp32 tables (lmstack's cos/sin, HF's inv_freq): ~1e-7, not 1e-15
        torch.testing.assert_close(hf(ids).logits, m(ids), rtol=1e-5, atol=1e-5)


def test_hf_twin_bf16_is_the_model_hf_loads(seed, tmp_path):
    """decode_vs_hf --dtype bf16 (and the GPU run, bf16) times HF on ``hf_twin``: it must compute what
    transformers computes when a user loads the same weights in bf16 (from_pretrained(dtype=bf16)),
    or the bench's "same tokens" column measures the twin, not the libraries."""
    from transformers import LlamaForCausalLM

    common = load_bench("common")
    m = lmstack.Transformer(tiny_cfg()).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.mul_(3.0)
    m = m.to(torch.bfloat16)
    twin = common.hf_twin(m).eval()
    twin.save_pretrained(tmp_path)
    user = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 200))
    with torch.no_grad():
        ref = user(ids).logits
        assert torch.equal(twin(ids).logits, ref), (
            f"hf_twin's RoPE inv_freq is {twin.model.rotary_emb.inv_freq.dtype}, the loaded model's "
            f"{user.model.rotary_emb.inv_freq.dtype}: the twin is not the model HF users run")


def test_hf_twin_keeps_every_weight_or_refuses(seed):
    """decode_vs_hf --model takes any preset; qwen2-0.5b has q/k/v biases. hf_twin loads with
    strict=False into a LlamaConfig without attention_bias: the biases must not be dropped silently."""
    common = load_bench("common")
    m = lmstack.Transformer(tiny_cfg("qwen2-0.5b", max_seq_len=128)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    try:
        hf = common.hf_twin(m).eval()
    except (ValueError, NotImplementedError):
        return  # a clear refusal is fine
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m(ids), rtol=1e-4, atol=1e-4)


# -- cpu_vs_hf: same prediction problems, same metric ------------------------------------------------


def test_cpu_vs_hf_losses_are_the_same_problem(seed):
    """hf_loss (labels=ids, HF shifts) and lm_loss (shifted targets) on sample_batch's windows."""
    from lmstack.data.packing import sample_batch

    mod = load_bench("cpu_vs_hf")
    m = lmstack.Transformer(tiny_cfg()).double()
    hf = mod.hf_twin(m)
    tokens = np.random.default_rng(seed).integers(0, 256, 5000).astype(np.int64)
    x, y = sample_batch(tokens, 4, 64, torch.Generator().manual_seed(seed))
    ours, theirs = mod.lm_loss(m, x, y), mod.hf_loss(hf, x, y)
    # float64 reference from the documented rule: mean next-token NLL over the windows
    logp = torch.log_softmax(m(x).double(), -1)
    ref = -logp.gather(-1, y[..., None]).mean()
    # lm_loss upcasts the logits with .float(): fp32 from there
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs.double(), ref, rtol=1e-6, atol=1e-6)


def test_cpu_vs_hf_val_bpb_float64(seed):
    mod = load_bench("cpu_vs_hf")
    m = lmstack.Transformer(tiny_cfg()).double().eval()
    rng = np.random.default_rng(seed)
    T = 16
    val = rng.integers(0, 256, int(rng.integers(5 * T + 1, 9 * T))).astype(np.int64)
    token_bytes = torch.from_numpy(rng.integers(0, 4, 256).astype(np.int64))  # some specials: 0 bytes
    data = types.SimpleNamespace(val=val)
    got = mod.val_bpb(m, data, T, token_bytes, batch=3)
    # every full window of T + 1 tokens, back to back; nats of byte-carrying targets / ln 2 / bytes
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val) - T, T):
            x = torch.from_numpy(val[s : s + T])[None]
            y = torch.from_numpy(val[s + 1 : s + T + 1])
            nll = -torch.log_softmax(m(x)[0].double(), -1).gather(-1, y[:, None])[:, 0]
            b = token_bytes[y]
            nats += float((nll * (b > 0)).sum())
            nbytes += int(b.sum())
    assert got == pytest.approx(nats / math.log(2) / nbytes, rel=1e-6)  # val_bpb's cross-entropy is fp32


class _FakeTok:
    def token_bytes(self):
        return np.ones(4096, dtype=np.int32)


def _cpu_vs_hf_main(mod, monkeypatch, argv, race_calls):
    fake_data = types.SimpleNamespace(vocab_size=4096, tokenizer=lambda: _FakeTok())
    monkeypatch.setattr(mod, "load_dataset", lambda name: fake_data)
    monkeypatch.setattr(mod, "measure_speed", lambda cfg, data, B, T, args: {
        "train_tok_s": {"lmstack": 2.0, "hf": 1.0, "lmstack+compile": 3.0, "hf+compile": 1.5},
        "decode_tok_s": {"lmstack": 20.0, "lmstack+compile": 30.0, "hf": 10.0}, "decode_same_tokens": True})

    def race(cfg, data, B, T, token_bytes, budget):
        race_calls.append(budget)
        return {"budget_s": budget, "hf": {"steps": 3, "val_bpb": 3.0}, "lmstack+compile": {"steps": 4, "val_bpb": 2.9}}

    monkeypatch.setattr(mod, "race", race)
    monkeypatch.setattr(sys, "argv", ["cpu_vs_hf.py", "--threads", "1", *argv])
    return mod.main()


def test_cpu_vs_hf_race_only_without_earlier_results_fails_first(sandbox, monkeypatch):
    """--race-only keeps the speed rows of an earlier JSON; with none, it must stop with a message
    before spending the race's budget, not run the race and die on a KeyError in render."""
    mod = load_bench("cpu_vs_hf")
    monkeypatch.setattr(mod, "ROOT", sandbox)
    calls = []
    with pytest.raises(SystemExit) as e:
        _cpu_vs_hf_main(mod, monkeypatch, ["--race-only"], calls)
    assert e.value.code not in (0, None) and calls == []


@pytest.mark.parametrize("flag", ["--race-only", "--skip-race"])
def test_cpu_vs_hf_kept_rows_keep_their_commit(sandbox, monkeypatch, flag):
    """--race-only keeps the earlier speed rows, --skip-race the earlier race; either way the JSON is
    stamped with this run's meta (commit, date, device): what was measured at the old commit must
    still say so, or the docs table credits old figures to the new commit."""
    mod = load_bench("cpu_vs_hf")
    monkeypatch.setattr(mod, "ROOT", sandbox)
    old = json.loads((ROOT / "bench" / "results" / "cpu_vs_hf.json").read_text())
    old["meta"]["commit"] = "0ld0ld0"
    (sandbox / "bench" / "results" / "cpu_vs_hf.json").write_text(json.dumps(old))
    monkeypatch.setenv("LMSTACK_COMMIT", "n3wn3w0")
    _cpu_vs_hf_main(mod, monkeypatch, [flag], [])
    written = (sandbox / "bench" / "results" / "cpu_vs_hf.json").read_text()
    assert "n3wn3w0" in written
    assert "0ld0ld0" in written, f"{flag}: rows measured at 0ld0ld0 are now recorded as measured at n3wn3w0"


# -- decode_vs_hf: same work, turns, warm-up, token counts -------------------------------------------


def test_decode_timed_excludes_warmup_and_takes_turns(monkeypatch):
    mod = load_bench("decode_vs_hf")
    clock = [0.0]
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock[0])
    order = []

    def contender(name, first, later):
        calls = [0]

        def fn():
            clock[0] += first if calls[0] == 0 else later + calls[0]  # slower each call: best = first timed
            calls[0] += 1
            order.append(name)
            return torch.tensor([calls[0]])
        return fn

    def broken():
        raise RuntimeError("optional mode not supported\nmore")

    fns = {"a": contender("a", 100.0, 1.0), "b": contender("b", 50.0, 2.0), "opt": broken}
    best, outs = mod.timed(fns, 3, torch.device("cpu"), optional=("opt",))
    assert best == {"a": 2.0, "b": 3.0}  # warm-up (100, 50) left out; the best timed call
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-ups, then turns within each round
    assert torch.equal(outs["a"], torch.tensor([4])) and "opt" not in outs
    assert set(fns) == {"a", "b", "opt"}  # the caller's dict is left alone
    with pytest.raises(RuntimeError):
        mod.timed({"x": broken}, 1, torch.device("cpu"))  # ours is never optional


def _decode_main(mod, sandbox, monkeypatch, short_by=0, extra=(), name="decode_vs_hf"):
    real = mod.generate

    def gen(model, ids, n, **kw):  # no compile here (a minute on the CPU): the eager path stands in
        kw.pop("compile", None)
        return real(model, ids, n - short_by, **kw)

    monkeypatch.setattr(mod, "generate", gen)
    monkeypatch.setattr(sys, "argv", ["decode_vs_hf.py", "--threads", "1", "--prompt-len", "6", "--new-tokens", "5",
                                      "--repeats", "1", "--no-docs", *extra])
    rc = mod.main()
    return rc, json.loads((sandbox / "bench" / "results" / f"{name}.json").read_text())


def test_decode_vs_hf_plumbing_same_tokens(sandbox, monkeypatch):
    mod = load_bench("decode_vs_hf")
    rc, r = _decode_main(mod, sandbox, monkeypatch)
    assert rc == 0 and set(r["workloads"]) == set(mod.WORKLOADS) | set(mod.CPU_WORKLOADS)
    for wl, row in r["workloads"].items():
        if wl not in mod.CPU_WORKLOADS or hf_sorts_beam_samples():  # (older transformers sample beams otherwise)
            assert row["same_tokens"] is True, wl  # fp32: greedy, beam search, seeded beam sampling agree with HF
        assert all(row[k] > 0 for k in ("lmstack", "lmstack+compile", "hf"))
    assert r["meta"]["commit"] and r["new_tokens"] == 5 and r["prompt_len"] == 6


def test_decode_vs_hf_guidance_times_both_libraries_guided_and_not(sandbox, monkeypatch):
    """--guidance: greedy batch 1 and 8 with and without guidance, both libraries given the same
    negative prompts (the guided tokens agree with HF's, and differ from the unguided ones)."""
    mod = load_bench("decode_vs_hf")
    seen = []
    real = mod.generate
    monkeypatch.setattr(mod, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    rc, r = _decode_main(mod, sandbox, monkeypatch, extra=("--guidance", "1.5"), name="decode_vs_hf_guidance")
    assert rc == 0 and r["guidance_scale"] == 1.5 and r["negative_prompt_len"] == 3
    assert list(r["workloads"]) == ["greedy batch 1", "greedy batch 1, guidance 1.5", "greedy batch 8",
                                    "greedy batch 8, guidance 1.5"]
    assert all(row["same_tokens"] is True for row in r["workloads"].values())
    guided = [kw for kw in seen if "guidance_scale" in kw]
    assert guided and all(kw["guidance_scale"] == 1.5 and kw["negative_prompt_ids"].shape[1] == 3 for kw in guided)
    assert '"guidance" rows: guidance_scale 1.5, a 3-token negative prompt per row' in mod.render(r)


def test_decode_vs_hf_return_sequences_counts_every_sample(sandbox, monkeypatch):
    """--return-sequences K: sampling 1 and K samples of one prompt in both libraries; every
    sample's tokens are credited, and both must have made all of them."""
    mod = load_bench("decode_vs_hf")
    seen = []
    real = mod.generate
    monkeypatch.setattr(mod, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    rc, r = _decode_main(mod, sandbox, monkeypatch, extra=("--return-sequences", "3"), name="decode_vs_hf_samples")
    assert rc == 0 and r["return_sequences"] == 3
    assert list(r["workloads"]) == ["sampling, 1 sample", "sampling, 3 samples"]
    assert {kw.get("num_return_sequences", 1) for kw in seen} == {1, 3}
    assert all(kw["temperature"] == 1.0 and kw["top_k"] == 50 for kw in seen)
    assert "every sample's tokens counted" in mod.render(r)
    for bad in (("--return-sequences", "1"), ("--return-sequences", "2", "--guidance", "1.5")):
        monkeypatch.setattr(sys, "argv", ["decode_vs_hf.py", *bad])
        with pytest.raises(SystemExit, match="--return-sequences"):
            mod.main()


def test_decode_vs_hf_counts_only_tokens_generated(sandbox, monkeypatch):
    """tokens/s is B x --new-tokens / time for every contender. A side that stops early (an EOS, a
    length rule) must not be credited with tokens it did not generate: the bench must check each
    output's length (same_tokens=False alone is what bf16 rounding shows too)."""
    mod = load_bench("decode_vs_hf")
    try:
        rc, r = _decode_main(mod, sandbox, monkeypatch, short_by=2)
    except (SystemExit, AssertionError, ValueError, RuntimeError):
        return  # refused: fine
    credited = {wl: row["lmstack"] for wl, row in r["workloads"].items() if row["lmstack"] is not None}
    assert not credited, f"rates recorded for outputs 2 tokens short of --new-tokens: {credited}"


def test_decode_vs_hf_without_cuda_writes_nothing(sandbox, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    mod = load_bench("decode_vs_hf")
    monkeypatch.setattr(sys, "argv", ["decode_vs_hf.py", "--device", "cuda"])
    before = (sandbox / "docs" / "benchmarks.md").read_text()
    assert mod.main() == 0
    assert list((sandbox / "bench" / "results").iterdir()) == []
    assert (sandbox / "docs" / "benchmarks.md").read_text() == before


def test_decode_rate_three_significant_digits(seed):
    """rate()'s documented rule: whole numbers from 100 up, three significant digits below."""
    mod = load_bench("decode_vs_hf")
    rng = random.Random(seed)
    values = [2.2, 0.5, 10.0] + [round(rng.uniform(1, 99), 1) for _ in range(20)]
    for v in values:
        s = mod.rate(v)
        digits = s.replace(".", "").lstrip("0")
        assert len(digits) == 3, f"rate({v}) = {s!r}: not three significant digits"
        assert float(s) == pytest.approx(v, rel=5e-3)
    for v in (100.4, 1587.2, 12345.6):
        assert mod.rate(v) == f"{round(v):,}"


# -- attention.py: FLOPs, correctness check, no GPU ---------------------------------------------------


@pytest.fixture
def attn(monkeypatch):
    mod = load_bench("attention")
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "DTYPE", torch.float32)
    return mod


def _sdpa_only(mod, monkeypatch, ours=None):
    """attention_fns with lmstack-triton replaced (no interpreter): SDPA flash itself, or ``ours``."""
    real = mod.attention_fns

    def fns():
        d = real()
        d["lmstack-triton"] = ours or d["sdpa-flash"]
        return d

    monkeypatch.setattr(mod, "attention_fns", fns)


def test_attention_flops_formula(attn, monkeypatch):
    """The issue's counting: forward 4*B*H*S*S*D (halved when causal), forward+backward 3.5x forward;
    TFLOP/s = FLOPs / seconds / 1e12. Timings stubbed: 2 ms forward, 7 ms forward+backward."""
    grid = [(1, 2, 24, 8, True), (2, 1, 16, 4, False)]
    monkeypatch.setattr(attn, "GRID", grid)
    _sdpa_only(attn, monkeypatch)

    def fake_ms(fn, **kw):
        fn()
        return 7.0 if "grad_to_none" in kw else 2.0

    monkeypatch.setattr(attn, "median_ms", fake_ms)
    rows = attn.kernel_bench()
    for (B, H, S, D, causal), row in zip(grid, rows, strict=True):
        fwd = 4.0 * B * H * S * S * D / (2.0 if causal else 1.0)
        for impl in ("lmstack-triton", "sdpa-flash"):
            assert row["fwd_tflops"][impl] == pytest.approx(fwd / 2e-3 / 1e12, rel=1e-12)
            assert row["fwd_bwd_tflops"][impl] == pytest.approx(3.5 * fwd / 7e-3 / 1e12, rel=1e-12)
        assert row["fwd_tflops"]["sdpa-cudnn"] is None and row["max_abs_diff_vs_sdpa_flash"] == 0


class _Scale(torch.autograd.Function):
    """Identity forward with the gradient doubled: a fast-but-wrong backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.mark.parametrize("wrong", ["forward", "backward"])
def test_attention_bench_notices_a_wrong_kernel(attn, monkeypatch, seed, wrong):
    """The bench's sanity check must tell a wrong kernel from a right one with the same speed: the
    forward+backward TFLOP/s are published, so a backward that is fast but wrong must show too."""
    monkeypatch.setattr(attn, "GRID", [(1, 2, 24, 8, True)])
    monkeypatch.setattr(attn, "median_ms", lambda fn, **kw: (fn(), 3.0)[1])
    _sdpa_only(attn, monkeypatch)
    right = attn.kernel_bench()
    sdpa = attn.attention_fns()["sdpa-flash"]
    if wrong == "forward":
        bad = lambda q, k, v, causal: sdpa(q, k, v, causal) * 1.01  # noqa: E731
    else:
        bad = lambda q, k, v, causal: _Scale.apply(sdpa(q, k, v, causal))  # noqa: E731
    _sdpa_only(attn, monkeypatch, bad)
    rows = attn.kernel_bench()
    assert rows != right, f"a kernel with a wrong {wrong} pass gives the same published row: {rows}"


def test_attention_main_without_cuda_writes_nothing(attn, sandbox, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    monkeypatch.setattr(sys, "argv", ["attention.py"])
    before = (sandbox / "docs" / "benchmarks.md").read_text()
    assert attn.main() == 0
    assert list((sandbox / "bench" / "results").iterdir()) == []
    assert (sandbox / "docs" / "benchmarks.md").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_session_without_gpu_returns_no_stale_results(tmp_path):
    """gpu_session.sh packs bench/results/attention.json and decode_vs_hf_cuda.json into $OUT
    whatever the steps did. With no GPU nothing is measured: files that were already in the tree
    must not come back as this session's results."""
    tree = tmp_path / "tree"
    shutil.copytree(BENCH, tree / "bench", ignore=shutil.ignore_patterns("results", "__pycache__"))
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", tree / "docs")
    results = tree / "bench" / "results"
    results.mkdir()
    stale = {"meta": {"commit": "5ta1e00", "device": "NVIDIA H100", "date": "2020-01-01"}, "kernels": [], "training": None}
    (results / "attention.json").write_text(json.dumps(stale))
    (results / "decode_vs_hf_cuda.json").write_text(json.dumps(stale))
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
           "LMSTACK_COMMIT": "n3wn3w0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(tree / "bench" / "gpu_session.sh"), "120", "kernels decode"],
                          capture_output=True, text=True, env=env, timeout=300)
    summary = (out / "summary.txt").read_text()
    assert "kernels:" in summary and "decode:" in summary, proc.stdout + proc.stderr
    assert "nothing" in proc.stdout  # the scripts say they measured nothing
    returned = sorted(p.name for p in out.iterdir() if p.suffix == ".json")
    assert returned == [], f"no GPU, nothing measured, yet $OUT holds {returned} (the tree's old files)"


# -- the JSON and the docs ----------------------------------------------------------------------------


def _docs_section(text: str, name: str) -> str | None:
    start, end = f"<!-- {name} -->\n", f"\n<!-- /{name} -->"
    if start not in text:
        return None
    return text[text.index(start) + len(start): text.index(end)]


RENDERED = sorted(p.stem for p in (BENCH / "results").glob("*.json")
                  if p.stem.startswith(("decode_vs_hf", "cpu_vs_hf", "peft_methods", "load_vs_hf")))


@pytest.mark.parametrize("name", RENDERED)
def test_docs_table_is_the_json_rendered(name):
    """Every table in docs/benchmarks.md is what the script's render() makes of the JSON beside it
    (not edited by hand, not left from an older render rule)."""
    mod = load_bench("decode_vs_hf" if name.startswith("decode") else name)
    section = _docs_section((ROOT / "docs" / "benchmarks.md").read_text(), name)
    assert section is not None, f"bench/results/{name}.json has no section in docs/benchmarks.md"
    assert mod.render(json.loads((BENCH / "results" / f"{name}.json").read_text())) == section


def test_readme_figures_are_the_json():
    """README.md's hand-written figures: its cpu_vs_hf table and the compiled/HF decode ratios."""
    readme = (ROOT / "README.md").read_text()
    r = json.loads((BENCH / "results" / "cpu_vs_hf.json").read_text())
    tr, de, race = r["train_tok_s"], r["decode_tok_s"], r["race"]
    block = _docs_section(readme, "measured")
    assert block is not None
    expected = [
        f"| {tr['hf']:,.0f} ({tr['hf+compile']:,.0f} compiled) | {tr['lmstack']:,.0f} ({tr['lmstack'] / tr['hf']:.2f}x) "
        f"| {tr['lmstack+compile']:,.0f} (**{tr['lmstack+compile'] / tr['hf']:.2f}x**) |",
        f"| {de['hf']:,.0f} | {de['lmstack']:,.0f} ({de['lmstack'] / de['hf']:.2f}x) "
        f"| {de['lmstack+compile']:,.0f} (**{de['lmstack+compile'] / de['hf']:.2f}x**) |",
        f"| {race['hf']['val_bpb']:.3f} ({race['hf']['steps']} steps) | — | "
        f"{race['lmstack+compile']['val_bpb']:.3f} ({race['lmstack+compile']['steps']} steps) |",
        f"one run at {r['meta']['commit']}",
    ]
    for s in expected:
        assert s in block, s
    for p in sorted((BENCH / "results").glob("decode_vs_hf*.json")):
        for wl, row in json.loads(p.read_text())["workloads"].items():
            ratio = f"{row['lmstack+compile'] / row['hf']:.2f}x"
            assert ratio in readme, f"{p.name} {wl}: compiled/HF {ratio} is not in README.md"


def test_update_docs_replaces_only_its_section(sandbox, seed):
    import common

    path = sandbox / "docs" / "benchmarks.md"
    original = path.read_text()
    body = f"new table {seed}\n| a | b |"
    common.update_docs("decode_vs_hf_bf16", body)
    text = path.read_text()
    assert _docs_section(text, "decode_vs_hf_bf16") == body
    for other in ("decode_vs_hf", "cpu_vs_hf", "peft_methods", "decode_vs_hf_bf16_avx512"):
        assert _docs_section(text, other) == _docs_section(original, other)
    common.update_docs("decode_vs_hf_bf16", _docs_section(original, "decode_vs_hf_bf16"))
    assert path.read_text() == original  # a round trip is byte-identical
    common.update_docs("brand_new", "x")
    assert path.read_text().startswith(original.rstrip()) and _docs_section(path.read_text(), "brand_new") == "x"


def test_update_docs_refuses_a_section_without_its_end_marker(sandbox):
    import common

    path = sandbox / "docs" / "benchmarks.md"
    path.write_text("# Benchmarks\n\n<!-- a -->\nold\n\n<!-- /b -->\nkept\n")
    before = path.read_text()
    with pytest.raises(ValueError, match="<!-- a --> has no <!-- /a --> after it"):
        common.update_docs("a", "new")
    assert path.read_text() == before  # nothing lost


# -- peft_methods: what the JSON says about the run ---------------------------------------------------


def _peft_row(name):
    return {"method": name, "lr": 0.01, "options": {}, "init_from_text": False, "commit": "c0ffee0", "packed": True,
            "steps": 10, "train_s": 5.0, "trainable_params": 1000, "total_params": 10000, "peak_mem_mb": 50.0,
            "step_ms": 100.0, "final_loss": 1.0, "accuracy": 0.25, "by_kind": {"play": 0.3, "speaker": 0.2},
            "answer_loss": {"first": 1.0, "rest": 0.5, "end": 0.1}, "distinct_answers": 3, "top_answer": "X",
            "top_answer_count": 2}


def test_peft_methods_meta_records_the_measured_threads(sandbox, monkeypatch):
    """The methods run in child processes with --threads N; the JSON's device must say N threads,
    not the parent's torch default (meta() reads torch.get_num_threads() where it is called)."""
    if torch.cuda.is_available():
        pytest.skip("device is the GPU's name there")
    mod = load_bench("peft_methods")
    base = {"accuracy": 0.0, "by_kind": {"play": 0.0, "speaker": 0.0}, "answer_loss": {"first": 9, "rest": 5, "end": 9},
            "distinct_answers": 1, "top_answer": "X", "top_answer_count": 4, "total_params": 10000, "n_train": 40,
            "pretrain_steps": None, "pretrain_tokens": None}

    real_run = subprocess.run

    def run(cmd, **kw):
        if cmd[0] != sys.executable:
            return real_run(cmd, **kw)  # git rev-parse for the commit
        out = base if "--base-only" in cmd else _peft_row(cmd[cmd.index("--one") + 1])
        return subprocess.CompletedProcess(cmd, 0, stdout="log\nRESULT " + json.dumps(out) + "\n", stderr="")

    monkeypatch.setattr(mod.subprocess, "run", run)
    monkeypatch.setattr(mod, "plot", lambda r, path: path)
    threads = torch.get_num_threads() + 2
    monkeypatch.setattr(sys, "argv", ["peft_methods.py", "--methods", "lora", "--threads", str(threads)])
    assert mod.main() == 0
    r = json.loads((sandbox / "bench" / "results" / "peft_methods.json").read_text())
    assert r["methods"]["lora"]["accuracy"] == 0.25
    assert r["meta"]["device"].endswith(f"({threads} threads)"), r["meta"]["device"]


def test_decode_same_tokens_cell_says_where_rows_part():
    """first_differences: the 1-based new token where each row first differs from HF's (None: never);
    the table's cell counts the rows that part and where, over both lmstack variants."""
    mod = load_bench("decode_vs_hf")
    hf = torch.tensor([[9, 9, 1, 2, 3], [9, 9, 1, 2, 3], [9, 9, 4, 5, 6]])
    eager = torch.tensor([[9, 9, 1, 2, 3], [9, 9, 1, 7, 3], [9, 9, 4, 5, 6]])
    compiled = torch.tensor([[9, 9, 1, 2, 3], [9, 9, 1, 2, 3], [9, 9, 4, 5, 0]])
    firsts = {"lmstack": mod.first_differences(eager, hf, 2), "lmstack+compile": mod.first_differences(compiled, hf, 2)}
    assert firsts == {"lmstack": [None, 2, None], "lmstack+compile": [None, None, 3]}
    assert mod.same_cell({"same_tokens": False, "first_difference": firsts}) == "False (2/3 rows part at new tokens 2-3)"
    assert mod.same_cell({"same_tokens": True, "first_difference": firsts}) == "True"
    assert mod.same_cell({"same_tokens": False}) == "False"  # results written before the field existed


def test_load_bench_decodes_the_same_weights_both_ways(tmp_path, seed):
    """load_vs_hf's copied-vs-mapped decode comparison times the same model: every mapped view
    equals the loaded weight of that name, and both layouts decode the same tokens."""
    mod = load_bench("load_vs_hf")
    folder = tmp_path / "model"
    mod.write_checkpoint("tiny", torch.float32, folder)
    layouts = mod.weight_layouts(lmstack.from_hf(folder), folder)
    assert layouts["copied"].keys() == layouts["mapped"].keys()
    for n, t in layouts["copied"].items():
        assert torch.equal(layouts["mapped"][n], t), n
    r = mod.decode_rates(folder, tokens=4, repeats=1)
    assert r["same_tokens"] and r["copied"] > 0 and r["mapped"] > 0


def test_readme_load_figures_are_the_json():
    r = json.loads((BENCH / "results" / "load_vs_hf.json").read_text())
    readme = (ROOT / "README.md").read_text().replace("\n  ", " ")
    d = r["decode_tok_s"]
    for s in (f"checkpoint in {r['load']['lmstack']['load_s']:.2f} s", f"takes {r['load']['hf']['load_s']:.2f} s",
              f"decodes {1 - d['mapped'] / d['copied']:.0%} slower"):
        assert s in readme, s
