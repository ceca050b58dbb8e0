"""Interop with other formats: Hugging Face checkpoints in and out."""

from .hf import config_from_hf, config_to_hf, from_hf, to_hf

__all__ = ["from_hf", "to_hf", "config_from_hf", "config_to_hf"]
