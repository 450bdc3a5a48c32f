"""Retraining of fused models: retraining modes, compression schedules, objectives, loops."""

from .modes import RETRAIN_MODES, RetrainHandle, install_retrain_mode, js_gamma
from .heal import DEFAULT_LORA_LR, DEFAULT_LR, HEAL_OBJECTIVES, HealConfig, HealResult, heal
from .iterative import HealStep, iterative_heal
from .loop import CompressionRecord, iterative_compress, retrain
from .objectives import OBJECTIVES, Objective, distillation_loss, make_objective, task_loss
from .schedule import SCHEDULE_KINDS, compression_schedule, retraining_steps
from .trainable import TRAINABLE_SETS, neighbor_blocks

__all__ = [
    "DEFAULT_LORA_LR",
    "DEFAULT_LR",
    "HEAL_OBJECTIVES",
    "HealConfig",
    "HealResult",
    "HealStep",
    "iterative_heal",
    "TRAINABLE_SETS",
    "heal",
    "neighbor_blocks",
    "RETRAIN_MODES",
    "OBJECTIVES",
    "SCHEDULE_KINDS",
    "CompressionRecord",
    "RetrainHandle",
    "Objective",
    "compression_schedule",
    "distillation_loss",
    "install_retrain_mode",
    "iterative_compress",
    "js_gamma",
    "make_objective",
    "retrain",
    "retraining_steps",
    "task_loss",
]
