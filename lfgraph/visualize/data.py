"""What the report shows, as plain JSON-able data: built once, drawn by the page, written by ``--format json``.

:func:`report_data` reads what a rewrite did from its :class:`RewriteLog` (the plan adds
the scores, the fuse rule and the provenance), checks every name against the graph, and
returns one dict (schema ``lfgraph.visualize/1``). Without a log (a plan on its own) it
shows what the plan asks for, and says so (``from_log``).

Keys: ``schema``, ``lfgraph_version``, ``title``, ``model``, ``source``, ``mode``, ``fuse``,
``from_log``, ``provenance`` (the plan's); ``counts`` (``blocks_before``, ``blocks_after``,
``removed``, ``merged``, ``tied``, ``tie_sets``, ``refitted``, ``healed``, ``permuted``,
``layers``); ``rows`` (graph order: ``kind`` ``block`` with ``name``, ``index``, ``fate``
(``kept``/``keeper``/``removed``), ``absorbed_by``, ``absorbs``, ``fused``, ``permuted``,
``refit``, ``healed``, ``plan_score``, ``params``; or ``kind`` ``layers`` for a run of
layers outside blocks; each with ``layers``: ``name``, ``role``, ``op``, ``shape``,
``params``, ``tie`` (tie set index or null), ``tie_keep``, ``refit``, ``healed``);
``tie_sets`` (``id``, ``keep``, ``members``, ``color``, ``score``); ``fusions`` (the
plan's); ``heatmaps`` (null, or ``metric``, ``groups`` [``key``, ``role``, ``op``, ``shape``,
``family``, ``names``, ``labels``, ``axis``, ``values`` (matrix, null = not computed),
``chosen`` (fused cells i < j)], ``hidden``, ``blocks`` (the block matrix)); ``scores``
(``{criterion: {block: score}}``), ``score_labels``; ``table`` (``[quantity, before,
after, ratio]`` strings); ``loss_curve`` (``[step, loss]``); ``log`` (records: ``pass``,
``action``, ``target``, ``sources``, ``detail``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .. import __version__
from ..errors import LfgraphError
from ..graph import LayerGraph
from ..passes.analysis import Analysis
from ..passes.base import RewriteLog
from ..plan import Fusion, FusionPlan

SCHEMA = "lfgraph.visualize/1"
#: At most this many compatible groups get a heatmap (the largest first): ResNet-50 and
#: DenseNet-121 have dozens of groups of two, which say little and slow the page.
MAX_HEATMAPS = 24
#: Colours of tie sets (grey is left out: grey means "removed").
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#393b79", "#637939", "#7b4173", "#ad494a", "#8c6d31", "#3182bd", "#31a354", "#756bb1", "#e6550d",
)
#: Names of the selection criteria the page knows how to label (others are shown by key).
SCORE_LABELS = {
    "block_influence": "Block Influence (1 − cos(in, out); low = removable)",
    "angular": "angular distance arccos(cos(in, out))/π (low = removable)",
    "sleb": "calibration loss without the block (SLEB; low = removable)",
    "fusion": "plan score of the fusion (lower = more alike)",
}

#: One row of the before/after table: (quantity, before, after, ratio) as display strings.
TableRow = tuple[str, str, str, str]


@dataclass
class Changes:
    """What happened to each block and layer, read from the log (or the plan)."""

    absorbed_by: dict[str, str] = field(default_factory=dict)  # removed block -> surviving keeper
    fusion_of: dict[str, Fusion] = field(default_factory=dict)  # block or layer -> its plan fusion
    fused: dict[str, dict[str, Any]] = field(default_factory=dict)  # keeper block -> fuse record detail
    permuted: dict[str, list[int]] = field(default_factory=dict)  # block -> [moved, units]
    refit_layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> refit detail
    refit_blocks: dict[str, int] = field(default_factory=dict)  # block -> refitted layers
    tie_sets: list[list[str]] = field(default_factory=list)  # each: members, keep first
    from_log: bool = True


def _namer(graph: LayerGraph) -> tuple[Any, Any]:
    blocks = {b.name for b in graph.blocks}
    layers = {n.name for n in graph.nodes}
    model = graph.model_name or "this model"

    def block_of(name: str, what: str) -> str:
        """The block ``name`` is, or the block that contains it."""
        if name in blocks:
            return name
        if name in layers and graph.node(name).block is not None:
            return graph.blocks[graph.node(name).block].name  # type: ignore[index]
        inside = [b for b in blocks if name.startswith(b + ".")]
        if not inside:
            raise LfgraphError(f"{what} names {name!r}, which is no block of {model}: the plan or log was made for another model")
        return max(inside, key=len)

    def layer(name: str, what: str) -> str:
        if name not in layers:
            raise LfgraphError(f"{what} names layer {name!r}, which {model} does not have: the plan or log was made for another model")
        return name

    return block_of, layer


def read_changes(graph: LayerGraph, plan: FusionPlan, log: RewriteLog | None) -> Changes:
    """Who absorbed whom, which layers share a weight, what was permuted or refitted.

    Raises ``LfgraphError`` when the plan or log names a block or layer ``graph`` lacks,
    or the log is inconsistent (a removal without a keeper, a cycle of removals).
    """
    block_of, layer = _namer(graph)
    ch = Changes()
    for f in plan.fusions:
        for name in [f.keep, *f.absorb]:
            ch.fusion_of[block_of(name, "the plan") if f.unit == "block" else layer(name, "the plan")] = f
    records = list(log.records) if log is not None else []
    ch.from_log = bool(records)
    ties: list[tuple[str, str]] = []
    for r in records:
        if r.action == "remove":
            target = block_of(r.target, "the rewrite log")
            keeper = r.sources[0] if r.sources else (ch.fusion_of[target].keep if target in ch.fusion_of else None)
            if keeper is None:
                raise LfgraphError(f"the rewrite log removes {r.target} without naming the block that absorbed it: the log is corrupt")
            ch.absorbed_by[target] = block_of(keeper, "the rewrite log")
        elif r.action == "fuse":
            ch.fused[block_of(r.target, "the rewrite log")] = dict(r.detail)
        elif r.action == "permute":
            b = block_of(r.target, "the rewrite log")
            moved, units = ch.permuted.get(b, [0, 0])
            ch.permuted[b] = [moved + int(r.detail.get("moved", 0)), units + int(r.detail.get("units", 0))]
        elif r.action == "refit":
            b = block_of(r.target, "the rewrite log")
            ch.refit_blocks[b] = ch.refit_blocks.get(b, 0) + 1
            if r.target in {n.name for n in graph.nodes}:
                ch.refit_layers[r.target] = dict(r.detail)
        elif r.action == "tie":
            if not r.sources:
                raise LfgraphError(f"the rewrite log ties {r.target} without naming the layer it shares with: the log is corrupt")
            ties.append((layer(r.target, "the rewrite log"), layer(r.sources[0], "the rewrite log")))
    if not records:
        for f in plan.fusions:
            if f.unit == "block" and plan.mode == "merge":
                for a in f.absorb:
                    ch.absorbed_by[block_of(a, "the plan")] = block_of(f.keep, "the plan")
            elif f.unit == "layer":
                ties.extend((a, f.keep) for a in f.absorb)
    for absorbed in list(ch.absorbed_by):
        # a keeper absorbed later on: follow the chain to the block that survives
        keeper, seen = ch.absorbed_by[absorbed], {absorbed}
        while keeper in ch.absorbed_by:
            if keeper in seen:
                raise LfgraphError(f"the rewrite log removes {absorbed} into a cycle of removed blocks: the log is corrupt")
            seen.add(keeper)
            keeper = ch.absorbed_by[keeper]
        ch.absorbed_by[absorbed] = keeper
    ch.tie_sets = _tie_sets(ties, {n.name: n.order for n in graph.nodes})
    return ch


def _tie_sets(ties: Sequence[tuple[str, str]], order: Mapping[str, int]) -> list[list[str]]:
    """(layer, shares-with) pairs joined into sets (networkx connected components), each in graph order."""
    import networkx as nx

    g = nx.Graph()
    g.add_edges_from(ties)
    sets = [sorted(c, key=order.__getitem__) for c in nx.connected_components(g)]
    return sorted(sets, key=lambda s: order[s[0]])


def _finite(x: float) -> float | None:
    return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None


def _rows(graph: LayerGraph, ch: Changes, tie_of: Mapping[str, int], healed: set[str]) -> list[dict[str, Any]]:
    """Blocks, and runs of layers outside blocks, in graph order; each with its layers."""

    def layer(n: Any) -> dict[str, Any]:
        t = tie_of.get(n.name)
        return {
            "name": n.name, "role": n.role, "op": n.op, "shape": list(n.shape), "params": n.num_params,
            "tie": t, "tie_keep": t is not None and ch.tie_sets[t][0] == n.name,
            "refit": n.name in ch.refit_layers,
            "healed": n.name in healed or (n.block is not None and graph.blocks[n.block].name in healed),
        }

    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for n in sorted(graph.nodes, key=lambda n: n.order):
        if n.block is None:
            if rows and rows[-1]["kind"] == "layers":
                rows[-1]["layers"].append(layer(n))
            else:
                rows.append({"kind": "layers", "layers": [layer(n)]})
            continue
        if n.block in seen:
            continue
        seen.add(n.block)
        b = graph.blocks[n.block]
        members = sorted((graph.node(m) for m in b.members), key=lambda m: m.order)
        absorbs = sorted((a for a, k in ch.absorbed_by.items() if k == b.name), key=lambda a: [x.name for x in graph.blocks].index(a))
        f = ch.fusion_of.get(b.name)
        rows.append({
            "kind": "block", "name": b.name, "index": b.index, "skip": b.skip,
            "fate": "removed" if b.name in ch.absorbed_by else ("keeper" if absorbs else "kept"),
            "absorbed_by": ch.absorbed_by.get(b.name), "absorbs": absorbs,
            "fused": ch.fused.get(b.name), "permuted": ch.permuted.get(b.name),
            "refit": ch.refit_blocks.get(b.name, 0), "healed": b.name in healed, "plan_score": _finite(f.score) if f is not None else None,
            "params": sum(m.num_params for m in members), "layers": [layer(m) for m in members],
        })
    for r in rows:
        if r["kind"] == "layers":
            names = [x["name"] for x in r["layers"]]
            r["name"] = names[0] if len(names) == 1 else f"{len(names)} layers outside blocks"
            r["fate"] = "kept"
            r["healed"] = any(x["healed"] for x in r["layers"])
            r["refit"] = sum(1 for x in r["layers"] if x["refit"])
            r["params"] = sum(x["params"] for x in r["layers"])
    return rows


def _chosen_pairs(graph: LayerGraph, plan: FusionPlan, names: Sequence[str]) -> list[list[int]]:
    """Cells (i, j), i < j, of a group's matrix that the plan fused: layers of the kept and an
    absorbed block (merge) or the kept and an absorbed layer (tie)."""
    index = {n: i for i, n in enumerate(names)}
    block_of = {n.name: graph.blocks[n.block].name if n.block is not None else None for n in graph.nodes}
    cells: set[tuple[int, int]] = set()
    for f in plan.fusions:
        if f.unit == "block":
            keep = [i for n, i in index.items() if block_of[n] == f.keep]
            for a in f.absorb:
                cells.update((min(k, j), max(k, j)) for k in keep for j in (i for n, i in index.items() if block_of[n] == a))
        elif f.keep in index:
            cells.update((min(index[f.keep], index[a]), max(index[f.keep], index[a])) for a in f.absorb if a in index)
    return [list(c) for c in sorted(cells)]


def _matrix(d: np.ndarray) -> list[list[float | None]]:
    return [[_finite(float(v)) for v in row] for row in np.asarray(d, dtype=float)]


def _heatmaps(graph: LayerGraph, plan: FusionPlan, analysis: Analysis | None) -> dict[str, Any] | None:
    if analysis is None:
        return None
    block_index = {n.name: n.block for n in graph.nodes}
    groups = sorted(analysis.groups.values(), key=lambda g: (-len(g.names), g.key))
    shown = sorted(groups[:MAX_HEATMAPS], key=lambda g: min(graph.node(n).order for n in g.names) if g.names else 0)
    maps = []
    for g in shown:
        op, _, rest = g.key.partition(":")
        role, _, shape = rest.partition(":")
        blocks = [block_index.get(n) for n in g.names]
        maps.append({
            "key": g.key, "role": role or op, "op": op, "shape": shape.split(":")[0], "family": g.family,
            "names": list(g.names),
            "labels": [str(b) for b in blocks] if all(b is not None for b in blocks) else [str(i) for i in range(len(g.names))],
            "axis": "block" if all(b is not None for b in blocks) else "layer # in group",
            "values": _matrix(g.distances), "chosen": _chosen_pairs(graph, plan, g.names),
        })
    out: dict[str, Any] = {"metric": analysis.metric, "groups": maps, "hidden": max(0, len(groups) - MAX_HEATMAPS)}
    nb = len(analysis.block_names)
    if nb >= 2 and analysis.block_distances.shape == (nb, nb):
        idx = {b: i for i, b in enumerate(analysis.block_names)}
        chosen = sorted({(min(idx[f.keep], idx[a]), max(idx[f.keep], idx[a]))
                         for f in plan.fusions if f.unit == "block" and f.keep in idx for a in f.absorb if a in idx})
        out["blocks"] = {"names": list(analysis.block_names), "labels": [str(i) for i in range(nb)], "axis": "block",
                         "values": _matrix(analysis.block_distances), "chosen": [list(c) for c in chosen],
                         "role": "blocks: mean normalised distance over shared roles"}
    return out


def _scores(graph: LayerGraph, plan: FusionPlan, scores: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, float | None]]:
    """Selection scores per criterion and block; the plan's own fusion scores are added under
    ``fusion`` (per kept and absorbed block) so the page always says why a block was picked."""
    blocks = {b.name for b in graph.blocks}
    out: dict[str, dict[str, float | None]] = {}
    for crit, per in (scores or {}).items():
        unknown = [k for k in per if k not in blocks]
        if unknown:
            raise LfgraphError(f"selection scores ({crit}) name {unknown[:3]}, which are no blocks of "
                               f"{graph.model_name or 'this model'}: give scores keyed by block name")
        out[str(crit)] = {k: _finite(float(v)) for k, v in per.items()}
    fusion = {a: _finite(f.score) for f in plan.fusions if f.unit == "block" for a in f.absorb if a in blocks}
    if fusion and "fusion" not in out:
        out["fusion"] = fusion
    return out


def size_rows(graph: LayerGraph, plan: FusionPlan, ch: Changes) -> list[TableRow]:
    """Blocks and weighted-layer parameters before and after, from the graph and what changed
    (for a page made without compress's measured table)."""
    removed = {b for b in ch.absorbed_by}
    gone = sum(graph.node(m).num_params for b in graph.blocks if b.name in removed for m in b.members)
    shared = sum(graph.node(m).num_params for s in ch.tie_sets for m in s[1:])
    nb = len(graph.blocks)
    before = sum(n.num_params for n in graph.nodes)
    after = before - gone - shared

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.3f}×" if a else ""

    return [("blocks", str(nb), str(nb - len(removed)), ratio(nb, nb - len(removed))),
            ("weighted-layer parameters", f"{before:,}", f"{after:,}", ratio(before, after))]


def report_data(
    graph: LayerGraph,
    plan: FusionPlan,
    log: RewriteLog | None = None,
    analysis: Analysis | None = None,
    scores: Mapping[str, Mapping[str, float]] | None = None,
    table: Sequence[TableRow] | None = None,
    loss_curve: Sequence[tuple[int, float]] | None = None,
    title: str = "",
    healed: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Everything the report page shows, as JSON-able data (schema :data:`SCHEMA`).

    Args:
        graph: the LayerGraph of the model before the rewrite (the one the plan was made for).
        plan: the applied plan (fuse rule, scores, provenance).
        log: the rewrite log; ``None`` or empty shows what the plan asks for (``from_log`` false).
        analysis: the analysis under the chosen metric, for the distance heatmaps (optional).
        scores: selection scores, ``{criterion: {block name: score}}`` (criteria
            ``block_influence``, ``angular``, ``sleb`` are labelled; others shown by key).
        table: before/after rows ``(quantity, before, after, ratio)``; default: blocks and
            parameters computed from the graph and the changes.
        loss_curve: healing loss as ``(step, loss)`` pairs, when healing ran.
        title: the page heading (default: model, mode, fuse rule).
        healed: names of the blocks or layers that healing (retraining after the rewrite)
            updated; they are marked like refitted ones.

    Guarantees: the counts (``removed``, ``merged``, ``tied``, ``refitted``) are those of
    the log (or the plan without one); every name is checked against ``graph``. Raises
    ``LfgraphError`` on names the graph lacks. Nothing passed in is modified.
    """
    ch = read_changes(graph, plan, log)
    known = {b.name for b in graph.blocks} | {n.name for n in graph.nodes}
    for name in healed or []:
        if name not in known:
            raise LfgraphError(f"healed names {name!r}, which is no block or layer of {graph.model_name or 'this model'}")
    tie_of = {m: i for i, s in enumerate(ch.tie_sets) for m in s}
    rows = _rows(graph, ch, tie_of, set(healed or []))
    fusion_of = ch.fusion_of
    counts = {
        "blocks_before": len(graph.blocks),
        "blocks_after": len(graph.blocks) - len(ch.absorbed_by),
        "removed": len(ch.absorbed_by),
        "merged": sum(1 for r in rows if r.get("fate") == "keeper"),
        "tied": sum(len(s) - 1 for s in ch.tie_sets),
        "tie_sets": len(ch.tie_sets),
        "refitted": len(ch.refit_layers),
        "healed": sum(1 for r in rows for x in r["layers"] if x["healed"] and r["fate"] != "removed"),
        "permuted": len(ch.permuted),
        "layers": len(graph.nodes),
    }
    curve = [[int(s), _finite(float(v))] for s, v in (loss_curve or [])]
    return {
        "schema": SCHEMA,
        "lfgraph_version": __version__,
        "title": title or f"{graph.model_name or 'model'}: {plan.mode}, fuse {plan.fuse}",
        "model": graph.model_name, "source": graph.source,
        "mode": plan.mode, "fuse": plan.fuse, "from_log": ch.from_log,
        "provenance": {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in plan.provenance.items()},
        "counts": counts,
        "rows": rows,
        "tie_sets": [{"id": i, "keep": s[0], "members": s, "color": PALETTE[i % len(PALETTE)],
                      "score": _finite(fusion_of[s[0]].score) if s[0] in fusion_of else None} for i, s in enumerate(ch.tie_sets)],
        "fusions": [{"unit": f.unit, "keep": f.keep, "absorb": list(f.absorb), "score": _finite(f.score), "align": f.align}
                    for f in plan.fusions],
        "heatmaps": _heatmaps(graph, plan, analysis),
        "scores": _scores(graph, plan, scores),
        "score_labels": SCORE_LABELS,
        "table": [list(map(str, r)) for r in (table if table is not None else size_rows(graph, plan, ch))],
        "loss_curve": curve,
        "log": [{"pass": r.pass_name, "action": r.action, "target": r.target, "sources": list(r.sources), "detail": r.detail}
                for r in (log.records if log is not None else [])],
    }
