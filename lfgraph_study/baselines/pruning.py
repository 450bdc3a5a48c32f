"""Magnitude pruning, per layer (``prune-layer``) or across the network (``prune-global``).

The pruned weights are set to 0 in place; the layers stay dense tensors (the paper's
point is that such zeros only pay off with sparse kernels). The count is exact:
``round(fraction × n)`` weights are zeroed, ties at the threshold broken by position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .layers import LayerRef


def lowest_magnitude_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``values``) with exactly ``k`` True entries: the lowest |v|.

    Uses ``kthvalue`` (no full sort, so it fits 100M-weight models); entries equal to the
    threshold are taken in flat-index order until ``k`` are chosen.
    """
    flat = values.detach().abs().flatten()
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = flat.float().kthvalue(k).values.to(flat.dtype)
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:
        ties = torch.nonzero(flat == threshold).flatten()[:missing]
        mask[ties] = True
    return mask.view_as(values)


def progress_over(items: list, progress: bool, desc: str) -> Any:
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


@torch.no_grad()
def prune_layer(model: nn.Module, layers: list["LayerRef"], fraction: float, data: Any = None, progress: bool = False) -> tuple[nn.Module, float]:
    """Zero ``round(fraction × n_l)`` lowest-|w| weights in every layer ``l`` (in place)."""
    pruned = total = 0
    for ref in progress_over(layers, progress, "prune-layer"):
        w = ref.module.weight
        k = round(fraction * w.numel())
        w.masked_fill_(lowest_magnitude_mask(w, k), 0.0)
        pruned += k
        total += w.numel()
    return model, pruned / max(total, 1)


@torch.no_grad()
def prune_global(model: nn.Module, layers: list["LayerRef"], fraction: float, data: Any = None, progress: bool = False) -> tuple[nn.Module, float]:
    """Zero the ``round(fraction × N)`` lowest-|w| weights of all layers together (in place).

    Layers with small weights lose more than the fraction, others less (the paper finds
    this beats per-layer pruning, as some layers matter more than others).
    """
    weights = [ref.module.weight for ref in layers]
    flat = torch.cat([w.detach().flatten().float() for w in weights])
    k = round(fraction * flat.numel())
    mask = lowest_magnitude_mask(flat, k)
    start = 0
    for w in progress_over(weights, progress, "prune-global"):
        n = w.numel()
        w.masked_fill_(mask[start : start + n].view_as(w), 0.0)
        start += n
    return model, k / max(flat.numel(), 1)
