import pytest


def require_kernels(tools: bool = False) -> None:
    """Skip the calling test module unless lmstack's Triton kernels import: triton installed and
    recent enough (``lmstack.kernels.flash_attention.MIN_TRITON``). ``tools``: also the compile-ahead
    tools of bench/ (kernel_resources.py, triton_cache.py), which need a newer one. The skip reason
    says what is missing."""
    try:
        from lmstack.kernels import flash_attention as fa

        if tools:
            fa.check_compile_ahead()
    except ImportError as e:
        pytest.skip(str(e), allow_module_level=True)
