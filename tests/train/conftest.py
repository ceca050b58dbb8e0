import random

import pytest

from lmstack.data import prepare_text
from lmstack.train import TrainConfig


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small prepared dataset: three synthetic 'plays' (two train, one val), vocab 300."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["thou", "art", "the", "king", "of", "my", "heart", "and", "I", "shall", "not", "die", "lord", "night"]
    paths = []
    for name in ("alpha", "beta", "gamma"):
        lines = []
        for _ in range(600):
            speaker = rng.choice(["HAM.", "OPH.", "KING."])
            lines.append(speaker + "\n" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".\n")
        p = root / f"{name}.txt"
        p.write_text("\n".join(lines))
        paths.append(p)
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
