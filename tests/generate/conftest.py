import pytest

from ..hf_models import no_special_tokens, ragged_batch, sharp_llama, tiny_hf


@pytest.fixture(scope="session")
def sharp():
    """``sharp_llama()``'s (HF, lmstack) pair, built once for the tests that only read it."""
    return sharp_llama()


@pytest.fixture(scope="session")
def unsharp():
    """A (HF, lmstack) llama pair at weight scale 1, so sampled text depends on the draws; HF's
    special-token ids unset (no EOS or padding of its own). Built once, for tests that only read it."""
    h, m = tiny_hf("llama", seed=0)
    return no_special_tokens(h), m


@pytest.fixture(scope="module")
def batch():
    """Three ragged prompts (5, 9 and 3 tokens), left-padded with 127: ids (3, 9), mask (3, 9)."""
    return ragged_batch([5, 9, 3], seed=4)
