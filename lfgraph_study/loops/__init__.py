"""The research loops: compress-and-retrain (:mod:`.loop`, the paper's scheme) and
compress-and-heal on a curriculum (:mod:`.iterative`), with their curricula (:mod:`.schedule`)."""

from .iterative import HealStep, inflection, iterative_heal
from .loop import CompressionRecord, iterative_compress, retrain
from .schedule import SCHEDULE_KINDS, compression_schedule, retraining_steps

__all__ = ["SCHEDULE_KINDS", "CompressionRecord", "HealStep", "compression_schedule", "inflection", "iterative_compress",
           "iterative_heal", "retrain", "retraining_steps"]
