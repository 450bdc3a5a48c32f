"""k-means weight quantization (the paper's ``kmeans`` baseline).

Each layer's weights are replaced by the centroid of their cluster, with
``k = max(1, round((1 − fraction) × n))`` clusters for a layer of ``n`` weights: the paper
specifies the cluster count "as a percentage of the original size of that layer".

Why no sampling or cap on ``k``: in one dimension the k-means clusters are contiguous runs
of the sorted values, so after one ``O(n log n)`` sort each Lloyd iteration only moves
``k − 1`` boundaries (``searchsorted`` of the midpoints between neighbouring centroids) and
recomputes ``k`` means from a prefix sum: ``O(k log n)`` per iteration, fast even for
``k ≈ n ≈ 10⁶``. The only cap is the natural one: a layer with no more distinct values than
``k`` is left as it is. Initialisation is equal-count runs (quantiles); a boundary that
would empty a cluster is held one value away from its neighbour, so exactly ``k`` clusters
survive (and the layer has exactly ``k`` distinct values when its weights are distinct, up
to float32 rounding of centroids closer than its resolution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .layers import LayerRef


def _non_empty(bounds: torch.Tensor, n: int) -> torch.Tensor:
    """Make the boundaries ``0 = b_0 < b_1 < … < b_k = n`` strictly increasing."""
    k = bounds.numel() - 1
    j = torch.arange(k + 1, dtype=bounds.dtype)
    lifted = torch.cummax(bounds - j, 0).values + j  # b_j >= b_{j-1} + 1
    return torch.minimum(lifted, n - k + j)  # b_j <= n - (k - j)


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of ``values`` (any shape) with ``k`` clusters by sorted Lloyd iterations.

    Returns ``(quantized, centroids)``: ``quantized`` has the shape and dtype of ``values``,
    each entry replaced by its cluster's mean; ``centroids`` (float64, ascending, length
    ``min(k, n)``). Stops early when no boundary moves. ``values`` is not modified.
    """
    flat = values.detach().flatten().to(torch.float64)
    n = flat.numel()
    k = max(1, int(k))
    ordered, order = torch.sort(flat)
    new_value = torch.cat([torch.ones(1, dtype=torch.bool), ordered[1:] != ordered[:-1]])
    if k >= int(new_value.sum()):
        return values.detach().clone(), ordered[new_value]
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ordered, 0)])
    bounds = torch.round(torch.linspace(0, n, k + 1, dtype=torch.float64)).to(torch.long)
    bounds = _non_empty(bounds, n)

    def means(b: torch.Tensor) -> torch.Tensor:
        return (prefix[b[1:]] - prefix[b[:-1]]) / (b[1:] - b[:-1]).to(torch.float64)

    for _ in range(iters):
        centroids = means(bounds)
        mid = (centroids[:-1] + centroids[1:]) / 2
        inner = torch.searchsorted(ordered, mid)  # values below the midpoint go left
        new = _non_empty(torch.cat([bounds[:1], inner, bounds[-1:]]), n)
        if torch.equal(new, bounds):
            break
        bounds = new
    centroids = means(bounds)
    per_sorted = torch.repeat_interleave(centroids, bounds[1:] - bounds[:-1])
    quantized = torch.empty_like(flat)
    quantized[order] = per_sorted
    return quantized.view_as(values).to(values.dtype), centroids


@torch.no_grad()
def compress_kmeans(
    model: nn.Module, layers: list["LayerRef"], fraction: float, data: Any = None, progress: bool = False, iters: int = 20
) -> tuple[nn.Module, float]:
    """Quantize every layer's weights to ``round((1 − fraction) × n)`` values (in place).

    The achieved fraction is ``1 − Σ clusters / Σ weights`` over the layers.
    """
    it: Any = layers
    if progress:
        from tqdm import tqdm

        it = tqdm(layers, desc="kmeans", leave=False)
    clusters = total = 0
    for ref in it:
        w = ref.module.weight
        k = max(1, round((1.0 - fraction) * w.numel()))
        quantized, centroids = kmeans_1d(w, k, iters)
        w.copy_(quantized)
        clusters += centroids.numel()
        total += w.numel()
    return model, 1.0 - clusters / max(total, 1)
