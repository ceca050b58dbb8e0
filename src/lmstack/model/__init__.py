"""The model: Transformer and its parts. Imports only lmstack.kernels and lmstack.config."""

from .attention import Attention, AttnContext
from .cache import KVCache
from .transformer import Block, Transformer, eval_mode

__all__ = ["Attention", "AttnContext", "Block", "KVCache", "Transformer", "eval_mode"]
