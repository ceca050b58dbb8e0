import pytest

from ..hf_models import sharp_llama


@pytest.fixture(scope="session")
def sharp():
    """``sharp_llama()``'s (HF, lmstack) pair, built once for the tests that only read it."""
    return sharp_llama()
