"""lmstack.generate: decoding with a preallocated KV cache, and the logits processors it samples with."""

from .decode import GenerateOutput, decode_step, generate, generate_stream, prefill, transition_scores
from .sampling import (
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    sample,
    top_h_filter,
    top_k_filter,
    top_p_filter,
    typical_filter,
)
from .stops import StopStrings

__all__ = [
    "GenerateOutput",
    "generate",
    "generate_stream",
    "transition_scores",
    "prefill",
    "decode_step",
    "apply_repetition_penalty",
    "apply_temperature",
    "top_h_filter",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "typical_filter",
    "process_logits",
    "sample",
    "StopStrings",
]
