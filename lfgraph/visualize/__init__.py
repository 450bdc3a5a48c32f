"""The visualizer: what a fusion plan did to a model, as one self-contained HTML page.

Modules: :mod:`.data` (what the page shows, as JSON-able data), :mod:`.page` (the HTML page
with its inline CSS/JS), :mod:`.overlays` (Model Explorer node-data overlays),
:mod:`.plots` (matplotlib pictures of an analysis), :mod:`.scores` (selection scores),
:mod:`.command` (``lfgraph visualize``).

From Python (what ``lfgraph compress --report`` calls)::

    from lfgraph.visualize import write_report
    write_report("report.html", graph, plan, log, analysis=analysis, scores=scores,
                 table=rows, loss_curve=curve)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import LfgraphError
from ..graph import LayerGraph
from ..passes.analysis import Analysis
from ..passes.base import RewriteLog
from ..plan import FusionPlan
from .data import SCHEMA, TableRow, report_data
from .page import read_page_data, render_html, write_html, write_json

#: What ``write_report`` writes: the page, its data, or Model Explorer node-data overlays.
FORMATS = ("html", "json", "model-explorer")

__all__ = ["FORMATS", "SCHEMA", "load_log", "read_page_data", "render_html", "render_rewrite",
           "report_data", "write_report"]


def write_report(
    path: str | Path,
    graph: LayerGraph,
    plan: FusionPlan,
    log: RewriteLog | None = None,
    analysis: Analysis | None = None,
    scores: Mapping[str, Mapping[str, float]] | None = None,
    table: Sequence[TableRow] | None = None,
    loss_curve: Sequence[tuple[int, float]] | None = None,
    title: str = "",
    format: str | None = None,
    original_onnx: str | Path | None = None,
    healed: Sequence[str] | None = None,
) -> list[Path]:
    """Write the rewrite report to ``path``; returns the files written.

    Args:
        path: output file (written atomically).
        graph: the LayerGraph of the original model (the plan was made for it).
        plan: the applied FusionPlan.
        log: the RewriteLog of the rewrite (``PassResult.log``); ``None`` shows the plan.
        analysis: the Analysis under the chosen metric (distance heatmaps), optional.
        scores: selection scores ``{criterion: {block name: score}}``, optional (criteria
            ``block_influence``, ``angular``, ``sleb`` are labelled; see
            :func:`lfgraph.visualize.scores.selection_scores`).
        table: before/after rows ``(quantity, before, after, ratio)`` as display strings;
            default: blocks and weighted-layer parameters from the graph.
        loss_curve: healing loss ``(step, loss)`` pairs, when healing ran.
        title: page heading.
        format: ``html`` (default; ``json`` when ``path`` ends in ``.json``), ``json`` (the
            page's data) or ``model-explorer`` (node-data overlays; needs ``original_onnx``;
            writes ``path`` (fate) and, with scores, ``<stem>.score.json``).
        original_onnx: the ONNX file of the original model (for ``model-explorer``).
        healed: blocks or layers that healing updated (marked like refitted ones).

    Raises ``LfgraphError`` on names the graph lacks, an unknown format or an unwritable
    path. Nothing passed in is modified.
    """
    fmt = format or ("json" if str(path).lower().endswith(".json") else "html")
    if fmt not in FORMATS:
        raise LfgraphError(f"unknown report format {fmt!r}: choose one of {', '.join(FORMATS)}")
    data = report_data(graph, plan, log, analysis=analysis, scores=scores, table=table, loss_curve=loss_curve, title=title, healed=healed)
    out = Path(path)
    if fmt == "html":
        write_html(data, out)
        return [out]
    if fmt == "json":
        write_json(data, out)
        return [out]
    if original_onnx is None:
        raise LfgraphError("Model Explorer overlays are keyed by the original ONNX graph's node names: give its ONNX file")
    from ..fileio import write_text_atomic
    from ..frontends.onnx_graph import load_onnx
    from .overlays import overlays

    layers = overlays(load_onnx(original_onnx), data)
    written = []
    for kind, target in (("fate", out), ("score", out.with_name(out.stem + ".score.json"))):
        if layers[kind] is not None:
            write_text_atomic(target, layers[kind].to_json_string(indent=1) + "\n")
            written.append(target)
    return written


def render_rewrite(graph: LayerGraph, plan: FusionPlan, log: RewriteLog | None, path: str | Path, title: str = "") -> None:
    """The page for ``plan`` (as recorded in ``log``) applied to ``graph`` (older name of
    :func:`write_report` without the optional sections)."""
    if str(path).lower().endswith(".png"):
        raise LfgraphError(f"{path}: the view is an HTML page now; write .html (tools/visualize_docs.py shows how to screenshot it)")
    write_report(path, graph, plan, log, title=title, format="html")


def load_log(path: str | Path) -> RewriteLog:
    """Read a rewrite log written by ``lfgraph compress --log`` (``LfgraphError`` if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise LfgraphError(f"rewrite log {p} does not exist: write one with `lfgraph compress MODEL --log {p} ...`")
    try:
        return RewriteLog.from_json(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise LfgraphError(f"{p} is not a rewrite log ({str(e).splitlines()[0][:200]}): "
                           "write one with `lfgraph compress MODEL --log FILE`") from None
