"""The paper's width methods through the common interface: magnitude pruning per layer and
global, k-means quantisation, randomized truncated SVD, DAE student rollout.

Each wraps :func:`lfgraph_study.baselines.compress_baseline` (the implementations live in
``pruning.py``, ``quantization.py``, ``svd.py``, ``dae.py``); ``target`` is the fraction of
layer weights removed or made redundant, and ``details["achieved"]`` the fraction reached.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lfgraph.calibration import batches
from .interface import Method, register


def _width(name: str):
    def compress(model: nn.Module, target: float, calibration: Any, *, batch_size: int = 16, **options: Any) -> tuple[nn.Module, list[str], dict[str, Any]]:
        from .paper import BASELINES, compress_baseline, compression_stats

        data = list(batches(calibration, batch_size)) if BASELINES[name].needs_data else None
        out = compress_baseline(model, name, target, data, **options)
        stats = compression_stats(out)
        return out, [f"{stats['layers']} layers ({name})"], {"achieved": stats["achieved"]}

    compress.__name__ = name.replace("-", "_")
    compress.__doc__ = f"The paper's ``{name}`` at ``target`` (see :mod:`lfgraph_study.baselines`)."
    return compress


for _name, _desc, _data in (
    ("prune-layer", "magnitude pruning, the fraction in every layer", False),
    ("prune-global", "magnitude pruning, the fraction across all layers", False),
    ("kmeans", "1-D k-means quantisation, (1 - fraction) x weights clusters per layer", False),
    ("svd", "randomized truncated SVD, two low-rank layers per layer", False),
    ("dae", "denoising-autoencoder student rollout, bottom-up", True),
):
    register(Method(_name, "width", _desc, _width(_name), needs_data=_data))
