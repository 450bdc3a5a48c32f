"""Retraining of fused models: fusion modes, compression schedules, objectives, loops."""

from .fusion_modes import FUSION_MODES, FusionHandle, install_fusion, js_gamma
from .loop import CompressionRecord, iterative_compress, retrain
from .objectives import OBJECTIVES, Objective, distillation_loss, make_objective, task_loss
from .schedule import SCHEDULE_KINDS, compression_schedule, retraining_steps

__all__ = [
    "FUSION_MODES",
    "OBJECTIVES",
    "SCHEDULE_KINDS",
    "CompressionRecord",
    "FusionHandle",
    "Objective",
    "compression_schedule",
    "distillation_loss",
    "install_fusion",
    "iterative_compress",
    "js_gamma",
    "make_objective",
    "retrain",
    "retraining_steps",
    "task_loss",
]
