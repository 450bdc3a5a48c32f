"""SLEB (Song et al. 2024): greedily delete the block whose removal raises the calibration
loss least, re-scoring on the model as pruned so far (:func:`lfgraph.passes.selection.sleb_order`).

Every step scores every remaining block (``blocks^2 / 2`` block evaluations plus a head per
candidate), so on CPU it is given a reduced budget: ``max_windows`` x ``max_tokens`` of the
calibration windows (default 4 x 128 tokens; the study states the budget it used).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lfgraph.passes.block_stack import remove_blocks
from lfgraph.passes.selection import sleb_order
from .interface import Method, find_block_stack, n_blocks_for, register, removable_blocks

#: SLEB's default reduced calibration budget (windows, tokens per window).
SLEB_BUDGET = (4, 128)


def sleb(
    model: nn.Module, target: float, calibration: torch.Tensor, *, max_windows: int = SLEB_BUDGET[0], max_tokens: int = SLEB_BUDGET[1],
    batch_size: int = 4, progress: bool = False,
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Delete ``round(target x blocks)`` blocks chosen by SLEB's greedy loop."""
    cpath = find_block_stack(model)
    n = n_blocks_for(model, target, cpath)
    data = calibration[:max_windows, :max_tokens] if calibration.dim() == 2 and not calibration.is_floating_point() else calibration[:max_windows]
    order = sleb_order(model, removable_blocks(model, cpath), data, n, batch_size=batch_size, progress=progress)
    names = [f"{cpath}.{i}" for i, _ in order]
    remove_blocks(model, names)
    return model, names, {"order": [i for i, _ in order], "losses": [round(l, 4) for _, l in order], "budget": list(data.shape)}


register(Method("sleb", "depth", "SLEB: greedy deletion of the block whose removal costs least on calibration data", sleb))
