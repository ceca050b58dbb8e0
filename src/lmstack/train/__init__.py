"""Training: the loop, objectives and checkpoints."""

from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .objectives import causal_lm_loss
from .trainer import Trainer, TrainConfig, TrainingDiverged, lr_at

__all__ = ["Trainer", "TrainConfig", "TrainingDiverged", "causal_lm_loss", "load_checkpoint", "load_model",
           "save_checkpoint", "lr_at"]
