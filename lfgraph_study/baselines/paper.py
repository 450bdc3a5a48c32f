"""The paper's comparison methods ("Compression Without Retraining"), at a given fraction.

So that layer fusion can be put beside them at equal compression, every method compresses
a *fraction* of the weights of the model's fully-connected and convolution layers
(``nn.Linear``, ``nn.Conv1d/2d/3d``, GPT-2 ``Conv1D``; biases, norms and embeddings are
left alone):

=================  ==========================================================================
``prune-layer``    magnitude pruning: the ``fraction`` lowest-|w| weights of each layer are 0
``prune-global``   magnitude pruning: the ``fraction`` lowest-|w| weights of all layers together
``kmeans``         k-means quantization: each layer keeps ``(1 − fraction) × its weight count``
                   distinct values (the paper's cluster count)
``svd``            randomized truncated SVD: each layer becomes two dense low-rank layers with
                   ``(1 − fraction)`` of its weight count
``dae``            denoising-autoencoder student rollout, bottom-up: each layer's input is
                   encoded to a bottleneck sized like ``svd``'s rank (needs ``data``)
=================  ==========================================================================

A layer whose weight is shared with an ``nn.Embedding`` (a tied language-model head) is
not compressed, since that would change the embedding too. ``svd`` and ``dae`` also skip
layers that share a weight with another layer (replacing one user would untie it).

:func:`compress_baseline` returns a compressed copy; the input model is never modified.
:func:`compression_stats` reports the fraction actually achieved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

from lfgraph.errors import LfgraphError

from .layers import compressible_layers


@dataclass(frozen=True)
class Baseline:
    """A registered comparison method.

    ``compress(model, layers, fraction, data, progress, **options)`` modifies ``model`` (a
    copy made by :func:`compress_baseline`) in place and returns the compressed model and
    the achieved fraction.
    """

    name: str
    description: str
    compress: Callable[..., tuple[nn.Module, float]]
    needs_data: bool = False


def _registry() -> dict[str, Baseline]:
    from .dae import compress_dae
    from .pruning import prune_global, prune_layer
    from .quantization import compress_kmeans
    from .svd import compress_svd

    return {
        "prune-layer": Baseline("prune-layer", "magnitude pruning, the fraction in every layer", prune_layer),
        "prune-global": Baseline("prune-global", "magnitude pruning, the fraction across all layers", prune_global),
        "kmeans": Baseline("kmeans", "1-D k-means quantization, (1 - fraction) x weights clusters per layer", compress_kmeans),
        "svd": Baseline("svd", "randomized truncated SVD, two dense low-rank layers per layer", compress_svd),
        "dae": Baseline("dae", "denoising-autoencoder student rollout, bottom-up", compress_dae, needs_data=True),
    }


#: Comparison methods by name; the CLI's and the comparison script's choices come from here.
BASELINES: dict[str, Baseline] = _registry()


def compress_baseline(
    model: nn.Module,
    method: str,
    fraction: float,
    data: Iterable[Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """A copy of ``model`` compressed by ``method`` at ``fraction`` (see the module docstring).

    Expects ``fraction`` in ``[0, 1)``; ``data`` (batches: input tensors or ``(inputs,
    targets)`` pairs) for methods that need it (``dae``). ``options`` go to the method
    (e.g. ``iters`` for ``kmeans``, ``seed`` for ``svd``, ``steps``/``noise``/``activation``
    for ``dae``). Guarantees: ``model`` is not modified; the copy is in eval mode and
    carries ``lfgraph_compression`` (a dict: method, fraction, achieved, layers).
    Raises ``LfgraphError`` for an unknown method, a fraction out of range or missing data.
    """
    if method not in BASELINES:
        raise LfgraphError(f"unknown comparison method {method!r}: choose one of {sorted(BASELINES)}")
    if not 0.0 <= fraction < 1.0:
        raise LfgraphError(f"fraction must be in [0, 1) (the share of layer weights removed), got {fraction}")
    baseline = BASELINES[method]
    if baseline.needs_data and data is None:
        raise LfgraphError(f"method {method!r} fits on the network's activations: pass data=<a list of input batches>")
    work = copy.deepcopy(model).eval()
    layers = compressible_layers(work)
    if not layers:
        raise LfgraphError(f"{type(model).__name__} has no fully-connected or convolution layer to compress")
    try:
        out, achieved = baseline.compress(work, layers, fraction, data, progress, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise LfgraphError(f"method {method!r} does not take {sorted(options)}: {e}") from None
        raise
    out.lfgraph_compression = {"method": method, "fraction": fraction, "achieved": achieved, "layers": len(layers)}
    return out.eval()


def compression_stats(model: nn.Module) -> dict[str, Any]:
    """What :func:`compress_baseline` recorded on a compressed model (empty dict if none)."""
    return dict(getattr(model, "lfgraph_compression", {}))


__all__ = ["BASELINES", "Baseline", "compress_baseline", "compression_stats"]
