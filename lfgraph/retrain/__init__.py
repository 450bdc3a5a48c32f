"""Retraining of fused models: healing, retraining modes, objectives, trainable sets.

(The research loops, iterative compress-and-retrain and compress-and-heal, are in
:mod:`lfgraph_study.loops`.)"""

from .modes import RETRAIN_MODES, RetrainHandle, install_retrain_mode, js_gamma
from .heal import DEFAULT_LORA_LR, DEFAULT_LR, HEAL_OBJECTIVES, HealConfig, HealResult, heal
from .objectives import OBJECTIVES, Objective, distillation_loss, make_objective, task_loss
from .trainable import TRAINABLE_SETS, neighbor_blocks

__all__ = [
    "DEFAULT_LORA_LR",
    "DEFAULT_LR",
    "HEAL_OBJECTIVES",
    "HealConfig",
    "HealResult",
    "TRAINABLE_SETS",
    "heal",
    "neighbor_blocks",
    "RETRAIN_MODES",
    "OBJECTIVES",
    "RetrainHandle",
    "Objective",
    "distillation_loss",
    "install_retrain_mode",
    "js_gamma",
    "make_objective",
    "task_loss",
]
