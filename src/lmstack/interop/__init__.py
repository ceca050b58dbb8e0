"""Interop with other formats: Hugging Face checkpoints in and out, HF peft adapters."""

from .hf import config_from_hf, config_to_hf, from_hf, generation_settings, to_hf, unsupported_generation_settings
from .peft_format import from_peft, to_peft

__all__ = ["from_hf", "to_hf", "config_from_hf", "config_to_hf", "generation_settings", "unsupported_generation_settings", "to_peft", "from_peft"]
