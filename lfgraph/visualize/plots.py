"""Pictures of an :class:`~lfgraph.passes.analysis.Analysis`: which blocks and layers are alike.

:func:`plot_analysis` draws the block distance matrix (blocks × blocks) and one small
heatmap per compatible group, each with its colour bar, into one image. ``lfgraph analyze
--plot FILE`` calls it.

Matplotlib is used through its object API (``Figure`` + the Agg canvas), never through
``pyplot``, so that calling it from a library, a notebook or a server neither opens a
window nor changes the caller's global backend.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LfgraphError
from ..fileio import atomic_path, png_metadata
from ..graph import LayerGraph
from ..passes.analysis import Analysis, GroupAnalysis

#: More groups than this are left out (the largest are kept) so the image stays readable.
MAX_GROUPS = 24
_CELL_W, _CELL_H = 3.7, 3.4  # inches per grid cell
_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def _matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LfgraphError("plots need matplotlib: pip install 'lfgraph[viz]'") from None
    return Figure, FigureCanvasAgg


def _layer_labels(g: GroupAnalysis, block_names: list[str], graph: LayerGraph | None) -> tuple[list[str], str]:
    """Tick labels for a group's members: their block index when every member sits in a
    block, else their position in the group (graph order)."""
    if graph is not None:
        block_of = {n.name: n.block for n in graph.nodes}
        blocks = [block_of.get(name) for name in g.names]
    else:
        # without the graph, a member belongs to the block whose name prefixes its own
        index = {b: i for i, b in enumerate(block_names)}
        blocks = [index[max(owners, key=len)] if (owners := [b for b in index if name.startswith(b + ".")]) else None
                  for name in g.names]
    if any(b is None for b in blocks):
        return [str(i) for i in range(len(g.names))], "layer # in group"
    return [str(b) for b in blocks], "block"


def _group_title(g: GroupAnalysis) -> str:
    op, _, rest = g.key.partition(":")
    role, _, rest = rest.partition(":")
    shape = rest.split(":")[0]
    role = role if len(role) <= 34 else "…" + role[-33:]
    return f"{role}\n{op} {shape}, {g.family}, {len(g.names)} layers"


def _ticks(ax: Any, labels: list[str], axis_label: str) -> None:
    n = len(labels)
    step = 1 if n <= 16 else math.ceil(n / 10)
    pos = list(range(0, n, step))
    fs = 7 if n > 8 else 8
    ax.set_xticks(pos, [labels[i] for i in pos], fontsize=fs)
    ax.set_yticks(pos, [labels[i] for i in pos], fontsize=fs)
    ax.set_xlabel(axis_label, fontsize=8)
    ax.set_ylabel(axis_label, fontsize=8)
    ax.tick_params(length=2, pad=1)


def _heatmap(fig: Any, ax: Any, d: np.ndarray, labels: list[str], axis_label: str, title: str, large: bool, annotate: bool) -> None:
    """One distance matrix; the colour range spans the off-diagonal values, so the zero
    diagonal does not use up the contrast (it is drawn white)."""
    import matplotlib

    d = np.asarray(d, dtype=float)
    n = d.shape[0]
    off = d[~np.eye(n, dtype=bool)] if n > 1 else np.array([])
    off = off[np.isfinite(off)]
    vmin, vmax = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    if vmax - vmin <= 1e-9 * max(abs(vmax), 1.0):
        # one distinct distance (e.g. a group of two): scale from zero, not over a
        # vanishing range that would only show rounding noise
        vmin, vmax = min(0.0, vmin), max(vmax, 1e-12)
        if vmax - vmin <= 1e-12:
            vmax = vmin + 1.0
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(under="white", bad="#d9d9d9")
    shown = d.copy()
    shown[np.eye(n, dtype=bool)] = vmin - 1.0  # below vmin: drawn in the "under" colour
    im = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    _ticks(ax, labels, axis_label)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, shrink=0.9)
    bar.ax.tick_params(labelsize=7)
    bar.ax.yaxis.get_major_formatter().set_useOffset(False)
    if large:
        bar.set_label("distance (lower = more alike)", fontsize=8)
    if annotate:
        mid = (vmin + vmax) / 2
        # enough decimals to tell the shown values apart (normalised scores crowd near 1)
        decimals = int(np.clip(math.ceil(-math.log10(vmax - vmin)) + 1, 2, 5))
        for i in range(n):
            for j in range(n):
                if i != j and np.isfinite(d[i, j]):
                    text = f"{d[i, j]:.{decimals}f}" if abs(d[i, j]) < 1e3 else f"{d[i, j]:.3g}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if d[i, j] > mid else "black")


def plot_analysis(analysis: Analysis, path: str | Path, graph: LayerGraph | None = None) -> None:
    """Write one image of ``analysis`` to ``path`` (PNG; ``.svg``/``.pdf`` by suffix).

    ``graph`` (the analysed LayerGraph, optional) lets the ticks name each layer's block
    even where layer names do not start with block names (ONNX graphs).

    The block distance matrix (when the model has blocks) is drawn large, with grey cells
    for block pairs of different structure; every compatible group gets a small heatmap
    titled with its role, op, weight shape and family, ticks naming the layers' block
    indices (or their order in the group for layers outside blocks). At most
    ``MAX_GROUPS`` groups are drawn, the largest first.

    The file is written atomically: on any failure no partial file or temporary file is
    left and an existing ``path`` is untouched. Raises ``LfgraphError`` when matplotlib is
    missing, the analysis is empty, or the file cannot be written.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    groups = sorted(analysis.groups.values(), key=lambda g: (-len(g.names), g.key))
    hidden = max(0, len(groups) - MAX_GROUPS)
    groups = sorted(groups[:MAX_GROUPS], key=lambda g: g.key)
    nb = len(analysis.block_names)
    has_blocks = nb >= 2 and analysis.block_distances.shape == (nb, nb)
    if not groups and not has_blocks:
        raise LfgraphError("the analysis has no compatible groups and no blocks: there is nothing to plot")

    # the block matrix takes a 2x2 area in the top-left corner; groups fill the other cells
    if has_blocks:
        ncols = 4 if len(groups) > 2 else 2 + len(groups)
        cells = [(r, c) for r in range(max(2, math.ceil((len(groups) + 4) / ncols))) for c in range(ncols) if not (r < 2 and c < 2)]
        nrows = max(2, (cells[len(groups) - 1][0] + 1) if groups else 2)
    else:
        ncols = min(4, len(groups))
        nrows = math.ceil(len(groups) / ncols)
        cells = [(r, c) for r in range(nrows) for c in range(ncols)]
    fig = Figure(figsize=(ncols * _CELL_W, nrows * _CELL_H + 0.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(h_pad=0.08, w_pad=0.08, hspace=0.04, wspace=0.04)
    grid = fig.add_gridspec(nrows, ncols)
    if has_blocks:
        ax = fig.add_subplot(grid[0:2, 0:2])
        labels = [str(i) for i in range(nb)]
        names = [re.sub(r"^.*?([^.]+\.\d+)$", r"\1", b) for b in analysis.block_names]
        title = f"blocks ({nb}): mean normalised distance over shared roles\n{names[0]} … {names[-1]}; grey = different structure"
        _heatmap(fig, ax, analysis.block_distances, labels, "block", title, large=True, annotate=nb <= 12)
    for g, (r, c) in zip(groups, cells):
        ax = fig.add_subplot(grid[r, c])
        labels, axis_label = _layer_labels(g, analysis.block_names, graph)
        _heatmap(fig, ax, g.distances, labels, axis_label, _group_title(g), large=False, annotate=False)
    heading = f"{analysis.metric} distances (lower = more alike): {len(analysis.groups)} compatible groups, {nb} blocks"
    if hidden:
        heading += f" ({hidden} smaller groups not shown)"
    fig.suptitle(heading, fontsize=12, fontweight="bold")
    fmt = _FORMATS.get(Path(path).suffix.lower(), "png")
    folder = Path(path).parent
    if not folder.exists():
        raise LfgraphError(f"cannot write the plot to {path}: folder {folder} does not exist")
    try:
        with atomic_path(path, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, facecolor="white", metadata=png_metadata() if fmt == "png" else None)
    except OSError as e:
        raise LfgraphError(f"cannot write the plot to {path}: {e.strerror or e}") from None
