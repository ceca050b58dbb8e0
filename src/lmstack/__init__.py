"""lmstack: the modern large-language-model stack, end to end, in one package."""

from .config import PRESETS, ModelConfig
from .data import Tokenizer
from .generate import GenerateOutput, generate, generate_stream
from .interop import from_hf, to_hf
from .kernels import Seqs
from .model import KVCache, Transformer
from .train import Trainer, TrainConfig, load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "PRESETS", "Transformer", "KVCache", "Seqs", "Tokenizer",
    "generate", "generate_stream", "GenerateOutput", "Trainer", "TrainConfig", "load_checkpoint",
    "from_hf", "to_hf",
    "__version__",
]
