import random

import pytest

from lmstack.data import prepare_text
from lmstack.train import TrainConfig


def synthetic_plays(root, counts: dict[str, int], speakers=("HAM.", "OPH.", "KING.")) -> list:
    """Text files of random speeches (a speaker line, then 3-9 words), ``counts[name]`` per file."""
    rng = random.Random(0)
    words = ["thou", "art", "the", "king", "of", "my", "heart", "and", "I", "shall", "not", "die", "lord", "night"]
    paths = []
    for name, n in counts.items():
        lines = [rng.choice(speakers) + "\n" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".\n"
                 for _ in range(n)]
        p = root / f"{name}.txt"
        p.write_text("\n".join(lines))
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small prepared dataset: three synthetic 'plays' (two train, one val), vocab 300."""
    root = tmp_path_factory.mktemp("corpus")
    paths = synthetic_plays(root, {"alpha": 600, "beta": 600, "gamma": 600})
    return prepare_text(paths, name="tiny", home=root / "home", vocab_size=300, val_files=["gamma"], log=lambda s: None)


@pytest.fixture
def train_cfg(tiny_dataset, tmp_path):
    def make(**kw):
        base = dict(
            model="tiny", model_overrides=dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64),
            data=str(tiny_dataset), out_dir=str(tmp_path / "run"), seq_len=32, batch_size=4, max_steps=20,
            lr=3e-3, warmup_steps=3, eval_every=5, eval_tokens=256, save_every=5, log_every=1,
        )
        base.update(kw)
        return TrainConfig(**base)

    return make


@pytest.fixture(scope="session")
def base_ckpt(tiny_dataset, tmp_path_factory):
    """A tiny random base model saved as an lmstack checkpoint with the tiny dataset's tokenizer."""
    import torch

    from lmstack import ModelConfig, Transformer
    from lmstack.train import save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    run = tmp_path_factory.mktemp("base")
    save_checkpoint(run, Transformer(cfg), step=0, tokenizer_file=tiny_dataset / "tokenizer.json")
    return run / "checkpoint"


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """A small instruction task: name the speaker of a line; the first word decides the speaker."""
    import json

    root = tmp_path_factory.mktemp("task")
    rng = random.Random(1)
    speakers = {"thou": "HAM", "lord": "KING", "my": "OPH"}
    words = ["art", "the", "king", "of", "heart", "and", "I", "shall", "not", "die", "night"]

    def record(i):
        first = rng.choice(sorted(speakers))
        line = " ".join([first] + [rng.choice(words) for _ in range(rng.randint(2, 6))])
        return {"instruction": "Who speaks?", "input": line, "output": speakers[first], "kind": f"k{i % 2}"}

    for split, n in (("train", 48), ("test", 12)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(n)))
    return root


@pytest.fixture
def ft_cfg(base_ckpt, task_dir, tmp_path):
    from lmstack.train import FinetuneConfig

    def make(**kw):
        base = dict(base=str(base_ckpt), data=str(task_dir), out_dir=str(tmp_path / "ft"), method="full",
                    seq_len=48, batch_size=4, max_steps=12, lr=3e-3, warmup_steps=2, eval_every=4,
                    eval_tokens=0, save_every=4, log_every=1, template="plain")
        base.update(kw)
        return FinetuneConfig(**base)

    return make
