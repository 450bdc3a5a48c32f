"""Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): delete the
contiguous run of ``n`` blocks whose input and output are closest in angular distance
``arccos(cos(x_l, x_{l+n})) / pi`` (averaged over tokens), without healing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.passes.block_stack import remove_blocks
from lfgraph.passes.selection import angular_distances
from .interface import Method, find_block_stack, n_blocks_for, register, removable_blocks


def angular_block(model: nn.Module, calibration: torch.Tensor, n: int, batch_size: int = 4, min_start: int = 0) -> tuple[int, dict[int, float]]:
    """Start of the contiguous run of ``n`` removable blocks (starting at ``min_start`` or
    later) of smallest angular distance, and the distance of every start."""
    dist = angular_distances(model, removable_blocks(model), calibration, n, batch_size)
    usable = {l: d for l, d in dist.items() if l >= min_start}
    if not usable:
        raise LfgraphError(f"no run of {n} consecutive removable blocks starts at block {min_start} or later: lower the target")
    return min(usable, key=lambda l: (usable[l], l)), dist


def gromov(model: nn.Module, target: float, calibration: torch.Tensor, *, batch_size: int = 4) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Delete the angular-closest contiguous block of ``round(target x blocks)`` blocks."""
    cpath = find_block_stack(model)
    n = n_blocks_for(model, target, cpath)
    start, dist = angular_block(model, calibration, n, batch_size)
    names = [f"{cpath}.{i}" for i in range(start, start + n)]
    remove_blocks(model, names)
    return model, names, {"start": start, "angular_distance": round(dist[start], 6)}


register(Method("gromov", "depth", "Gromov et al.: delete the contiguous block of smallest angular distance", gromov))
