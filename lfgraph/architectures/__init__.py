"""Architecture configs: what each model family is, one class per family in one registry.

Everything lfgraph needs to know about a family lives in its class
(:mod:`lfgraph.architectures.families`): how it is detected (``config.model_type``), where
its block stack is, how its config is sliced when blocks go, which projection the
calibrated refit folds into, what kind of residual block it has, its onnxruntime-genai
type and its default fusion rule. Code elsewhere asks :func:`of_model` / :func:`for_config`
and never compares family names.
"""

from __future__ import annotations

from .base import BLOCK_KINDS, Architecture
from .registry import ARCHITECTURES, WHERE_TO_ADD, block_stack, for_config, hf_config, lookup, of_model, register
from . import families  # noqa: E402,F401  (registers every family)

__all__ = ["ARCHITECTURES", "Architecture", "BLOCK_KINDS", "WHERE_TO_ADD", "block_stack", "for_config", "hf_config", "lookup",
           "of_model", "register"]
