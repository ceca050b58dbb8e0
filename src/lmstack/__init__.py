"""lmstack: the modern large-language-model stack, end to end, in one package."""

from .config import PRESETS, ModelConfig
from .model import KVCache, Transformer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "Transformer", "KVCache", "__version__"]
