import pytest

from ..hf_models import ragged_batch, sharp_llama


@pytest.fixture(scope="session")
def sharp():
    """``sharp_llama()``'s (HF, lmstack) pair, built once for the tests that only read it."""
    return sharp_llama()


@pytest.fixture(scope="module")
def batch():
    """Three ragged prompts (5, 9 and 3 tokens), left-padded with 127: ids (3, 9), mask (3, 9)."""
    return ragged_batch([5, 9, 3], seed=4)
