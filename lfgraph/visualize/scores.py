"""Selection scores for the page, computed with :mod:`lfgraph.passes.selection` (no second implementation).

A plan records one score per fusion; the page shows the per-block scores that decided it.
:func:`selection_scores` computes them for a PyTorch model and its calibration data, keyed
by block name, ready for ``report_data(scores=...)``.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import LfgraphError
from ..graph import LayerGraph

#: Criteria computed here: each is cheap (one pass over the calibration data). SLEB's
#: greedy losses cost a pass per remaining block and step: pass them in from the planner.
CRITERIA = ("block_influence", "angular")


def selection_scores(module: Any, graph: LayerGraph, calibration: Any, criteria: Sequence[str] = CRITERIA,
                     batch_size: int = 4) -> dict[str, dict[str, float]]:
    """``{criterion: {block name: score}}`` for the removable blocks of ``graph``.

    ``block_influence`` is ShortGPT's ``1 - cos(input, output)``; ``angular`` is Gromov et
    al.'s ``arccos(cos(x_l, x_{l+1}))/pi`` for a run of one block. Both are averaged over
    every token of ``calibration``. The module is only run, not modified. Raises
    ``LfgraphError`` for an unknown criterion or a model without removable blocks.
    """
    from ..passes.block_stack import split_block_name
    from ..passes.selection import angular_distances, block_influence_scores

    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise LfgraphError(f"unknown selection score {unknown[0]!r}: choose from {', '.join(CRITERIA)}")
    blocks = [b.name for b in graph.removable_blocks()]
    if not blocks:
        raise LfgraphError(f"{graph.model_name or 'the model'} has no removable blocks: there are no selection scores")
    container = split_block_name(blocks[0])[0]
    name = lambda i: f"{container}.{i}"  # noqa: E731
    out: dict[str, dict[str, float]] = {}
    if "block_influence" in criteria:
        out["block_influence"] = {name(i): v for i, v in block_influence_scores(module, blocks, calibration, batch_size).items()}
    if "angular" in criteria:
        out["angular"] = {name(i): v for i, v in angular_distances(module, blocks, calibration, 1, batch_size).items()}
    return out
