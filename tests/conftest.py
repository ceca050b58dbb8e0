import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through its interpreter; triton reads this when it decorates a
    # kernel, so it must be set before anything imports lmstack.kernels.flash_attention.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own LMSTACK_HOME: no test reads or writes the user's cache."""
    monkeypatch.setenv("LMSTACK_HOME", str(tmp_path_factory.mktemp("lmstack_home")))


@pytest.fixture
def seed():
    """Fresh random inputs each run, printed on failure so it can be replayed: LMSTACK_TEST_SEED=<seed>
    runs the tests with that seed."""
    s = int(os.environ.get("LMSTACK_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(s)
    print(f"torch seed {s} (LMSTACK_TEST_SEED={s} replays it)")
    return s


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest, steady on a busy machine, and as exact. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
