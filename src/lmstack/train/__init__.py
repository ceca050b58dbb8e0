"""Training: the loop, objectives and checkpoints; instruction fine-tuning and task evaluation."""

from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .finetune import FinetuneConfig, Finetuner
from .objectives import causal_lm_loss
from .task_eval import answer_loss, evaluate_task, normalize_answer
from .trainer import Trainer, TrainConfig, TrainingDiverged, lr_at

__all__ = ["FinetuneConfig", "Finetuner", "Trainer", "TrainConfig", "TrainingDiverged", "causal_lm_loss",
           "answer_loss", "evaluate_task", "load_checkpoint", "load_model", "normalize_answer", "save_checkpoint", "lr_at"]
