"""ShortGPT (Men et al. 2024): delete the blocks of lowest Block Influence.

Block Influence of a block is ``1 - cos(input, output)`` averaged over every calibration
token (:func:`lfgraph.passes.selection.block_influence_scores`); the ``n`` blocks with the
lowest BI are deleted outright (no weight is changed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lfgraph.passes.block_stack import remove_blocks
from lfgraph.passes.selection import block_influence_scores
from .interface import Method, find_block_stack, n_blocks_for, register, removable_blocks


def lowest_influence(model: nn.Module, calibration: torch.Tensor, n: int, batch_size: int = 4) -> tuple[list[int], dict[int, float]]:
    """Indices of the ``n`` removable blocks of lowest BI (ties: lower index), and all scores."""
    names = removable_blocks(model)
    scores = block_influence_scores(model, names, calibration, batch_size)
    return sorted(sorted(scores, key=lambda i: (scores[i], i))[:n]), scores


def shortgpt(model: nn.Module, target: float, calibration: torch.Tensor, *, batch_size: int = 4) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Delete the ``round(target x blocks)`` blocks of lowest Block Influence."""
    cpath = find_block_stack(model)
    drop, scores = lowest_influence(model, calibration, n_blocks_for(model, target, cpath), batch_size)
    names = [f"{cpath}.{i}" for i in drop]
    remove_blocks(model, names)
    return model, names, {"block_influence": {str(i): round(s, 6) for i, s in scores.items()}}


register(Method("shortgpt", "depth", "ShortGPT: delete the blocks of lowest Block Influence (1 - cos(in, out))", shortgpt))
