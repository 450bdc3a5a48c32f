"""The rewrite viewer: what a fusion plan did to a model's stack of blocks, before → after.

:func:`render_rewrite` draws two columns: the model's blocks (and the weighted layers outside
blocks) before the rewrite, and what is left after it. Absorbed blocks are greyed and struck
through, with an arrow into the block that absorbed them; tied layers are coloured by tie
set and joined by a lane on the right; blocks whose hidden units were permuted or whose
projections were refitted carry a badge. Everything comes from the ``RewriteLog`` the
rewrite pass wrote (the plan adds the scores and the fuse rule), so the picture shows what
was done, not a second opinion about it.

The drawing is built once as a small scene of shapes and written either as a
self-contained HTML page (inline SVG with hover text, no external assets) or, for a path
ending in ``.png``, as a PNG through matplotlib.

Command line (``tools/visualize.py`` is a thin wrapper)::

    python tools/visualize.py MODEL --plan plan.json --log rewrite.json -o view.html
    python tools/visualize.py --demo -o demo.html           # tiny Llama, no input files
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from .errors import LfgraphError
from .fileio import atomic_path, write_text_atomic
from .graph import Block, LayerGraph, LayerNode
from .passes.base import RewriteLog, RewriteRecord
from .plan import Fusion, FusionPlan

#: Strong colours for fusion sets and tie sets; grey is left out because grey means "removed".
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#393b79", "#637939", "#7b4173", "#ad494a", "#8c6d31", "#3182bd", "#31a354", "#756bb1", "#e6550d",
)
REMOVED_FILL = "#eeeeee"
REMOVED_INK = "#9a9a9a"
BLOCK_FILL = "#f4f6f9"
BLOCK_STROKE = "#a9b3bf"
CHIP_FILL = "#dfe4ea"
REFIT_INK = "#e6550d"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
SANS = "DejaVu Sans, Helvetica, Arial, sans-serif"

# Geometry in pixels. Character widths are DejaVu Sans Mono's advance (0.602 em), so label
# widths can be computed without measuring text.
MARGIN = 18
ROW_H = 20
PITCH = 25
LABEL_FONT = 11
CHIP_FONT = 9
MONO_EM = 0.602
COLUMN_GAP = 150
LANE_W = 13
CHIP_GAP = 3

# Short chip labels for the words that make up layer roles.
_ABBREVIATIONS = {
    "query": "q", "key": "k", "value": "v", "attention": "attn", "self_attn": "attn", "output": "out",
    "intermediate": "inter", "downsample": "ds", "shortcut": "sc", "dense": "",
}


# ----------------------------------------------------------------------------------------
# What changed: read from the log (and the plan for scores), checked against the graph


@dataclass
class _TieSet:
    keep: str
    members: list[str]
    fusion: Fusion | None
    color: str = ""
    lane: int = 0


@dataclass
class _Changes:
    absorbed_by: dict[str, str] = field(default_factory=dict)  # absorbed block -> keeper block
    fusion_of: dict[str, Fusion] = field(default_factory=dict)  # block or layer name -> plan fusion
    fuse_detail: dict[str, dict[str, Any]] = field(default_factory=dict)  # keeper -> fuse record detail
    permuted: dict[str, tuple[int, int]] = field(default_factory=dict)  # block -> (moved, units)
    refits: dict[str, list[RewriteRecord]] = field(default_factory=dict)  # block -> refit records
    refit_layers: dict[str, RewriteRecord] = field(default_factory=dict)  # layer -> refit record
    tie_sets: list[_TieSet] = field(default_factory=list)
    from_log: bool = True
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def kept_into(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for absorbed, keeper in self.absorbed_by.items():
            out.setdefault(keeper, []).append(absorbed)
        return out


def _changes(graph: LayerGraph, plan: FusionPlan, log: RewriteLog | None) -> _Changes:
    blocks = {b.name: b for b in graph.blocks}
    layers = {n.name for n in graph.nodes}
    order = {n.name: n.order for n in graph.nodes}

    def block_name(name: str, what: str) -> str:
        """The block ``name`` is, or the block that contains it."""
        if name in blocks:
            return name
        if name in layers and graph.node(name).block is not None:
            return graph.blocks[graph.node(name).block].name  # type: ignore[index]
        inside = [b for b in blocks if name.startswith(b + ".")]
        if not inside:
            raise LfgraphError(f"{what} names {name!r}, which is no block of {graph.model_name or 'this model'}: "
                               "the plan or log was made for another model")
        return max(inside, key=len)

    def layer_name(name: str, what: str) -> str:
        if name not in layers:
            raise LfgraphError(f"{what} names layer {name!r}, which {graph.model_name or 'this model'} does not have: "
                               "the plan or log was made for another model")
        return name

    ch = _Changes()
    for f in plan.fusions:
        for name in [f.keep, *f.absorb]:
            key = block_name(name, "the plan") if f.unit == "block" else layer_name(name, "the plan")
            ch.fusion_of[key] = f
    records = list(log.records) if log is not None else []
    ch.from_log = bool(records)
    for r in records:
        ch.counts[r.action] = ch.counts.get(r.action, 0) + 1
    ties: list[tuple[str, str]] = []
    if records:
        for r in records:
            if r.action == "remove":
                target = block_name(r.target, "the rewrite log")
                keeper = r.sources[0] if r.sources else None
                if keeper is None and target in ch.fusion_of:
                    keeper = ch.fusion_of[target].keep
                if keeper is None:
                    raise LfgraphError(f"the rewrite log removes {r.target} without naming the block that absorbed it")
                ch.absorbed_by[target] = block_name(keeper, "the rewrite log")
            elif r.action == "fuse":
                ch.fuse_detail[block_name(r.target, "the rewrite log")] = dict(r.detail)
            elif r.action == "permute":
                b = block_name(r.target, "the rewrite log")
                moved, units = ch.permuted.get(b, (0, 0))
                ch.permuted[b] = (moved + int(r.detail.get("moved", 0)), units + int(r.detail.get("units", 0)))
            elif r.action == "refit":
                b = block_name(r.target, "the rewrite log")
                ch.refits.setdefault(b, []).append(r)
                if r.target in layers:
                    ch.refit_layers[r.target] = r
            elif r.action == "tie":
                if not r.sources:
                    raise LfgraphError(f"the rewrite log ties {r.target} without naming the layer it shares with")
                ties.append((layer_name(r.target, "the rewrite log"), layer_name(r.sources[0], "the rewrite log")))
    else:
        # no log: show what the plan asks for
        for f in plan.fusions:
            if f.unit == "block" and plan.mode == "merge":
                for a in f.absorb:
                    ch.absorbed_by[block_name(a, "the plan")] = block_name(f.keep, "the plan")
            elif f.unit == "layer":
                ties.extend((a, f.keep) for a in f.absorb)
    for absorbed in list(ch.absorbed_by):
        # a keeper that was itself absorbed later: follow the chain to the block that survives
        keeper, seen = ch.absorbed_by[absorbed], {absorbed}
        while keeper in ch.absorbed_by:
            if keeper in seen:
                raise LfgraphError(f"the rewrite log removes {absorbed} into a cycle of removed blocks: the log is corrupt")
            seen.add(keeper)
            keeper = ch.absorbed_by[keeper]
        ch.absorbed_by[absorbed] = keeper
    ch.tie_sets = _tie_sets(ties, order, ch.fusion_of)
    return ch


def _tie_sets(ties: list[tuple[str, str]], order: dict[str, int], fusion_of: dict[str, Fusion]) -> list[_TieSet]:
    """Join (layer, shares-with) pairs into sets; each set's keep is its earliest layer."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in ties:
        ra, rb = find(a), find(b)
        if ra != rb:
            if order[rb] < order[ra]:
                ra, rb = rb, ra
            parent[rb] = ra
    sets: dict[str, list[str]] = {}
    for x in sorted(parent, key=order.__getitem__):
        sets.setdefault(find(x), []).append(x)
    return [_TieSet(keep=m[0], members=m, fusion=fusion_of.get(m[0])) for m in sets.values() if len(m) > 1]


# ----------------------------------------------------------------------------------------
# Scene: a few shape types that both the SVG and the matplotlib writer understand


@dataclass
class _Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str = "none"
    stroke: str = "none"
    sw: float = 1.0
    rx: float = 0.0
    dash: tuple[float, ...] | None = None
    opacity: float = 1.0
    cls: str = ""


@dataclass
class _Text:
    x: float
    y: float
    text: str
    size: float = LABEL_FONT
    fill: str = "#222222"
    anchor: str = "start"
    bold: bool = False
    mono: bool = True
    italic: bool = False


@dataclass
class _Line:
    x1: float
    y1: float
    x2: float
    y2: float
    stroke: str = "#555555"
    sw: float = 1.0
    dash: tuple[float, ...] | None = None
    opacity: float = 1.0


@dataclass
class _Curve:
    """A cubic Bézier from (x1, y1) to (x2, y2) leaving and arriving horizontally."""

    x1: float
    y1: float
    x2: float
    y2: float
    stroke: str = "#555555"
    sw: float = 1.0
    dash: tuple[float, ...] | None = None
    opacity: float = 1.0


@dataclass
class _Circle:
    cx: float
    cy: float
    r: float
    fill: str = "#555555"
    stroke: str = "none"
    sw: float = 1.0


@dataclass
class _Poly:
    points: list[tuple[float, float]]
    fill: str = "#555555"
    opacity: float = 1.0


@dataclass
class _Group:
    children: list["_Shape"] = field(default_factory=list)
    cls: str = ""
    data: dict[str, str] = field(default_factory=dict)
    title: str = ""

    def add(self, *shapes: "_Shape") -> "_Group":
        self.children.extend(shapes)
        return self


_Shape = Union[_Rect, _Text, _Line, _Curve, _Circle, _Poly, _Group]


@dataclass
class _Scene:
    width: float
    height: float
    root: _Group
    title: str


# ----------------------------------------------------------------------------------------
# Layout


@dataclass
class _Row:
    name: str
    block: Block | None
    layers: list[LayerNode]


def _rows(graph: LayerGraph) -> list[_Row]:
    """Blocks and the layers outside blocks, in graph order (a block sits where its first layer is)."""
    rows: list[_Row] = []
    seen: set[str] = set()
    for n in sorted(graph.nodes, key=lambda n: n.order):
        if n.block is None:
            rows.append(_Row(n.name, None, [n]))
            continue
        b = graph.blocks[n.block]
        if b.name not in seen:
            seen.add(b.name)
            rows.append(_Row(b.name, b, sorted((graph.node(m) for m in b.members), key=lambda n: n.order)))
    return rows


def _role_slots(graph: LayerGraph) -> dict[str, int]:
    """A chip position per role, shared by all blocks, so that like layers line up vertically."""
    slots: dict[str, int] = {}
    for b in graph.blocks:
        for m in sorted((graph.node(m) for m in b.members), key=lambda n: n.order):
            slots.setdefault(m.role, len(slots))
    return slots


def _chip_labels(roles: Sequence[str]) -> dict[str, str]:
    """Short, distinct chip labels: the shortest unique suffix of each role, abbreviated."""
    parts = {r: [p for p in r.split(".") if not p.isdigit()] or [r] for r in roles}
    out: dict[str, str] = {}
    for role, words in parts.items():
        for k in range(1, len(words) + 1):
            suffix = words[-k:]
            if sum(1 for w in parts.values() if w[-k:] == suffix) == 1 or k == len(words):
                break
        short = [_ABBREVIATIONS.get(w, w.removesuffix("_proj") or w) for w in suffix]
        label = ".".join(w for w in short if w) or suffix[-1]
        out[role] = label if len(label) <= 8 else label[:7] + "…"
    return out


def _short_block(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 else name


def _short_layer(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _mono_w(chars: int, size: float) -> float:
    return chars * size * MONO_EM


def _tint(color: str, amount: float = 0.82) -> str:
    """``color`` mixed with white (``amount`` of white)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    mix = [round(c + (255 - c) * amount) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_params(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _score(f: Fusion | None) -> str:
    return "" if f is None else f"score {f.score:.4g}"


def _assign_colors(tie_sets: list[_TieSet], row_of: dict[str, int]) -> int:
    """Give each tie set a lane and a colour; returns the number of lanes.

    Lanes are assigned greedily by first row so that sets whose row spans do not overlap
    share a lane; colours are chosen so that sets overlapping in rows differ where the
    palette allows.
    """
    lane_end: list[int] = []
    spans = []
    for t in sorted(tie_sets, key=lambda t: (min(row_of[m] for m in t.members), max(row_of[m] for m in t.members))):
        lo, hi = min(row_of[m] for m in t.members), max(row_of[m] for m in t.members)
        for lane, end in enumerate(lane_end):
            if end < lo:
                t.lane, lane_end[lane] = lane, hi
                break
        else:
            t.lane = len(lane_end)
            lane_end.append(hi)
        # a colour no other set has, while the palette lasts; then one that no set overlapping
        # this one in rows (or sharing its lane) has
        taken = {u.color for u, _, _ in spans}
        clash = {u.color for u, ulo, uhi in spans if not (uhi < lo or ulo > hi) or u.lane == t.lane}
        free = [c for c in PALETTE if c not in taken] or [c for c in PALETTE if c not in clash]
        t.color = free[0] if free else PALETTE[len(spans) % len(PALETTE)]
        spans.append((t, lo, hi))
    return len(lane_end)


def _header_lines(graph: LayerGraph, plan: FusionPlan, ch: _Changes, title: str, interactive: bool) -> list[tuple[str, float, bool, str]]:
    prov = plan.provenance
    n_blocks = len(graph.blocks)
    n_after = n_blocks - len(ch.absorbed_by)
    removed_layers = sum(len(b.members) for b in graph.blocks if b.name in ch.absorbed_by)
    tied_away = sum(len(t.members) - 1 for t in ch.tie_sets)
    n_layers = len(graph.nodes)
    params_before = int(prov.get("params_before") or graph.total_params)
    saved = prov.get("params_saved")
    if saved is None:
        saved = sum(graph.node(m).num_params for b in graph.blocks if b.name in ch.absorbed_by for m in b.members)
        saved += sum(graph.node(m).num_params for t in ch.tie_sets for m in t.members[1:])
    saved = int(saved)
    share = saved / params_before if params_before else 0.0
    how = [f"mode {plan.mode}", f"fuse {plan.fuse}" + (" (aligned)" if any(f.align for f in plan.fusions if f.unit == "block") else "")]
    for key, label in (("select", "select"), ("metric", "metric"), ("scope", "scope")):
        if prov.get(key):
            how.append(f"{label} {prov[key]}")
    if "target" in prov:
        how.append(f"target {prov['target']} of {prov.get('target_kind', 'blocks')}")
    layers_after = f"{n_layers - removed_layers}"
    if tied_away:
        layers_after += f" ({n_layers - removed_layers - tied_away} distinct weights)"
    counts = (f"blocks {n_blocks} → {n_after} · weighted layers {n_layers} → {layers_after} · "
              f"parameters {_fmt_int(params_before)} → {_fmt_int(params_before - saved)} "
              f"(−{_fmt_int(saved)}, {share:.1%})")
    if ch.from_log:
        log_line = "rewrite log: " + " · ".join(f"{v} {k}" for k, v in sorted(ch.counts.items()))
    else:
        log_line = "no rewrite log given: showing what the plan asks for"
    return [
        (title or f"{graph.model_name or 'model'}: {plan.mode} rewrite, {len(plan.fusions)} fusions", 17, True, "#111111"),
        (" · ".join(how), 12, False, "#333333"),
        (counts, 12, True, "#222222"),
        (log_line + (" · hover over blocks, layers, arrows and lanes for details" if interactive else ""), 11, False, "#666666"),
    ]


def _scene(graph: LayerGraph, plan: FusionPlan, ch: _Changes, title: str, interactive: bool = True) -> _Scene:
    rows_before = _rows(graph)
    if not rows_before:
        raise LfgraphError(f"{graph.model_name or 'the model'} has no weighted layers to draw")
    rows_after = [r for r in rows_before if r.name not in ch.absorbed_by]
    slots = _role_slots(graph)
    labels = _chip_labels(list(slots))
    n_slots = max(1, len(slots))
    tie_of = {m: t for t in ch.tie_sets for m in t.members}
    fusion_color: dict[str, str] = {}
    block_index = {b.name: b.index for b in graph.blocks}
    for i, keeper in enumerate(sorted(ch.kept_into, key=block_index.__getitem__)):
        fusion_color[keeper] = PALETTE[i % len(PALETTE)]
        for a in ch.kept_into[keeper]:
            fusion_color[a] = fusion_color[keeper]

    after_index: dict[str, int] = {}
    for r in rows_after:
        if r.block is not None:
            after_index[r.name] = len(after_index)

    def row_label(r: _Row, side: str) -> str:
        """``#position short-name`` for blocks (the position in that column), the layer name otherwise."""
        if r.block is None:
            return _short_layer(r.name)
        return f"#{r.block.index if side == 'before' else after_index[r.name]} {_short_block(r.name)}"

    label_chars = max(max(len(row_label(r, "before")) for r in rows_before),
                      max((len(row_label(r, "after")) for r in rows_after), default=0))
    label_w = _mono_w(label_chars, LABEL_FONT) + 14
    chip_chars = max([len(v) for v in labels.values()] + [4])
    chip_w = max(20.0, _mono_w(chip_chars, CHIP_FONT) + 8)
    badges = {r.name: _badges(r, ch, after=False) for r in rows_before}
    badges_after = {r.name: _badges(r, ch, after=True) for r in rows_after}
    badge_chars = max([sum(len(t) + 2 for t, _ in b) for b in list(badges.values()) + list(badges_after.values())] + [0])
    badge_w = _mono_w(badge_chars, CHIP_FONT) + (10 if badge_chars else 0)
    titles = (f"before: {len(graph.blocks)} blocks, {len(graph.nodes)} weighted layers",
              f"after: {len(after_index)} blocks, {sum(len(r.layers) for r in rows_after)} weighted layers")
    col_w = max(label_w + n_slots * (chip_w + CHIP_GAP) + badge_w + 8, max(len(t) for t in titles) * 12 * 0.64 + 12)

    header = _header_lines(graph, plan, ch, title, interactive)
    header_h = sum(size * 1.55 for _, size, _, _ in header) + 8
    gap = COLUMN_GAP if ch.absorbed_by else 60
    x_before = MARGIN
    x_after = MARGIN + col_w + gap
    row_index = {r.name: i for i, r in enumerate(rows_before)}
    row_index_after = {r.name: i for i, r in enumerate(rows_after)}
    row_of_layer_after = {n.name: row_index_after[r.name] for r in rows_after for n in r.layers}
    n_lanes = _assign_colors(ch.tie_sets, row_of_layer_after) if ch.tie_sets else 0
    lanes_x = x_after + col_w + 22
    width = max(lanes_x + (n_lanes * LANE_W + 40 if n_lanes else 0), x_after + col_w + MARGIN)
    header_w = max(len(t) * s * (0.64 if bold else 0.58) for t, s, bold, _ in header) + 2 * MARGIN
    width = max(width, header_w)
    legend, legend_h = _legend(MARGIN, MARGIN + header_h + 4, width - 2 * MARGIN, ch, rows_before)
    col_title_y = MARGIN + header_h + 4 + legend_h + 22
    top = col_title_y + 12
    height = top + len(rows_before) * PITCH + MARGIN

    root = _Group(cls="lfgraph-rewrite")
    y = MARGIN
    head = _Group(cls="header")
    for text, size, bold, color in header:
        y += size * 1.3
        head.add(_Text(MARGIN, y, text, size=size, bold=bold, fill=color, mono=False))
        y += size * 0.25
    root.add(head)
    root.add(legend)

    def row_y(i: int) -> float:
        return top + i * PITCH

    for x, text in zip((x_before, x_after), titles):
        root.add(_Text(x, col_title_y, text, size=12, bold=True, mono=False, fill="#333333"))

    # connectors first, so that rows are drawn over their ends
    links = _Group(cls="links")
    for r in rows_before:
        y0 = row_y(row_index[r.name]) + ROW_H / 2
        target = ch.absorbed_by.get(r.name, r.name)
        y1 = row_y(row_index_after[target]) + ROW_H / 2
        x0, x1 = x_before + col_w, x_after
        if r.name in ch.absorbed_by:
            color = fusion_color.get(r.name, "#555555")
            f = ch.fusion_of.get(r.name)
            tip = f"{r.name} absorbed into {target}" + (f" ({_score(f)}, fuse {plan.fuse})" if f else "")
            links.add(_Group(cls="link absorbed", data={"from": r.name, "to": target}, title=tip).add(
                _Curve(x0 + 2, y0, x1 - 8, y1, stroke=color, sw=1.8, dash=(5, 3)),
                _Poly([(x1 - 9, y1 - 4.5), (x1 - 1, y1), (x1 - 9, y1 + 4.5)], fill=color),
            ))
        else:
            links.add(_Group(cls="link kept", data={"from": r.name, "to": target}).add(
                _Curve(x0 + 2, y0, x1 - 2, y1, stroke="#c3cbd5", sw=1.0)))
    root.add(links)

    for i, r in enumerate(rows_before):
        root.add(_row_group(r, "before", x_before, row_y(i), col_w, label_w, chip_w, slots, labels, row_label(r, "before"),
                            badges[r.name], ch, fusion_color, tie_of, plan, graph))
    for i, r in enumerate(rows_after):
        root.add(_row_group(r, "after", x_after, row_y(i), col_w, label_w, chip_w, slots, labels,
                            row_label(r, "after"), badges_after[r.name], ch, fusion_color, tie_of, plan, graph,
                            position=after_index.get(r.name)))

    if n_lanes:
        lanes = _Group(cls="tie-lanes")
        lanes.add(_Text(lanes_x - 4, col_title_y, "tie sets", size=12, bold=True, mono=False, fill="#333333"))
        for k, t in enumerate(ch.tie_sets):
            x = lanes_x + t.lane * LANE_W + LANE_W / 2
            ys = [row_y(row_of_layer_after[m]) + ROW_H / 2 for m in t.members]
            saved = sum(graph.node(m).num_params for m in t.members[1:])
            tip = (f"tie set {k + 1}: {len(t.members)} layers share one weight (the mean), saves {_fmt_int(saved)} parameters"
                   + (f", {_score(t.fusion)}" if t.fusion else "") + "\n" + "\n".join(t.members))
            g = _Group(cls="tie-lane", data={"tieset": str(k + 1)}, title=tip)
            g.add(_Line(x, min(ys), x, max(ys), stroke=t.color, sw=2.5))
            for m, yy in zip(t.members, ys):
                g.add(_Circle(x, yy, 4.2 if m == t.keep else 3.2, fill=t.color if m != t.keep else "#ffffff",
                              stroke=t.color, sw=2.0 if m == t.keep else 1.0))
            lanes.add(g)
        root.add(lanes)
    return _Scene(width=round(width), height=round(height), root=root, title=header[0][0])


def _badges(r: _Row, ch: _Changes, after: bool) -> list[tuple[str, str]]:
    """(text, colour) markers at the right end of a row."""
    out: list[tuple[str, str]] = []
    if r.block is None:
        return out
    name = r.name
    if not after and name in ch.permuted:
        moved, units = ch.permuted[name]
        out.append((f"⇄{moved}/{units}", "#555555"))
    if after and name in ch.kept_into:
        out.append((f"⊕{len(ch.kept_into[name]) + 1}", "#333333"))
    if after and name in ch.refits:
        out.append((f"refit×{len(ch.refits[name])}" if len(ch.refits[name]) > 1 else "refit", REFIT_INK))
    return out


def _row_group(
    r: _Row, side: str, x: float, y: float, col_w: float, label_w: float, chip_w: float, slots: dict[str, int],
    labels: dict[str, str], label: str, badges: list[tuple[str, str]], ch: _Changes, fusion_color: dict[str, str],
    tie_of: dict[str, _TieSet], plan: FusionPlan, graph: LayerGraph, position: int | None = None,
) -> _Group:
    removed = side == "before" and r.name in ch.absorbed_by
    is_block = r.block is not None
    color = fusion_color.get(r.name)
    if removed:
        fill, stroke, sw, dash, ink = REMOVED_FILL, color or REMOVED_INK, 1.2, (4.0, 3.0), REMOVED_INK
    elif color:
        fill, stroke, sw, dash, ink = _tint(color), color, 2.0, None, "#111111"
    elif is_block:
        fill, stroke, sw, dash, ink = BLOCK_FILL, BLOCK_STROKE, 1.0, None, "#222222"
    else:
        fill, stroke, sw, dash, ink = "#ffffff", "#c9cfd6", 1.0, (2.0, 2.0), "#444444"
    data = {"name": r.name, "side": side, "removed": "true" if removed else "false"}
    if is_block:
        data["index"] = str(r.block.index)  # type: ignore[union-attr]
    if color:
        data["fusion"] = color
    g = _Group(cls=f"{'block' if is_block else 'layer-row'} {side}" + (" removed" if removed else ""), data=data,
               title=_row_title(r, side, ch, plan, position))
    g.add(_Rect(x, y, col_w, ROW_H, fill=fill, stroke=stroke, sw=sw, rx=4, dash=dash, cls="frame"))
    ty = y + ROW_H / 2 + LABEL_FONT * 0.36
    g.add(_Text(x + 7, ty, label, size=LABEL_FONT, fill=ink, italic=not is_block, bold=bool(color) and not removed))
    if removed:
        g.add(_Line(x + 4, y + ROW_H / 2, x + 10 + _mono_w(len(label), LABEL_FONT), y + ROW_H / 2, stroke="#555555", sw=1.2))
    for n in r.layers:
        slot = slots.get(n.role, 0) if is_block else 0
        cx = x + label_w + slot * (chip_w + CHIP_GAP)
        t = tie_of.get(n.name) if side == "after" else None
        refit = side == "after" and n.name in ch.refit_layers
        chip_fill = REMOVED_FILL if removed else (t.color if t else CHIP_FILL)
        chip_ink = "#ffffff" if t else (REMOVED_INK if removed else "#333333")
        chip_label = labels.get(n.role, "fc" if n.op == "linear" else n.op) if is_block else ("fc" if n.op == "linear" else n.op)
        cdata = {"layer": n.name}
        if t:
            cdata["tieset"] = str(ch.tie_sets.index(t) + 1)
            cdata["color"] = t.color
        chip = _Group(cls="chip" + (" tied" if t else "") + (" refit" if refit else ""), data=cdata,
                      title=_chip_title(n, t, ch, side))
        chip.add(_Rect(cx, y + 3, chip_w, ROW_H - 6, fill=chip_fill, rx=3,
                       stroke=REFIT_INK if refit else ("#ffffff" if t else "none"), sw=2.0 if refit else 0.8))
        chip.add(_Text(cx + chip_w / 2, y + ROW_H / 2 + CHIP_FONT * 0.36, chip_label, size=CHIP_FONT, fill=chip_ink,
                       anchor="middle", bold=bool(t)))
        g.add(chip)
    bx = x + col_w - 6
    for text, ink_color in reversed(badges):
        g.add(_Text(bx, ty, text, size=CHIP_FONT + 1, fill=ink_color, anchor="end", bold=True))
        bx -= _mono_w(len(text) + 2, CHIP_FONT + 1)
    return g


def _row_title(r: _Row, side: str, ch: _Changes, plan: FusionPlan, position: int | None) -> str:
    params = sum(n.num_params for n in r.layers)
    if r.block is None:
        n = r.layers[0]
        return f"{n.name}\n{n.op} {'×'.join(map(str, n.weight.shape))} · {_fmt_int(params)} parameters · outside blocks"
    b = r.block
    lines = [b.name, f"block #{b.index} · {b.skip} skip · {len(b.members)} weighted layers · {_fmt_int(params)} parameters"]
    if position is not None and position != b.index:
        lines.append(f"position #{position} after the rewrite (blocks before it were removed)")
    f = ch.fusion_of.get(b.name)
    if b.name in ch.absorbed_by:
        keeper = ch.absorbed_by[b.name]
        lines.append(f"{'removed: absorbed' if side == 'before' else 'absorbed'} into {keeper}"
                     + (f" ({_score(f)}, fuse {plan.fuse})" if f else ""))
    if b.name in ch.kept_into:
        merged = ch.kept_into[b.name]
        detail = ch.fuse_detail.get(b.name, {})
        rule = detail.get("rule", plan.fuse)
        aligned = detail.get("aligned", f.align if f else False)
        lines.append(f"keeps {len(merged)} absorbed block(s): {', '.join(merged)}")
        lines.append(f"fuse rule {rule}" + (", neurons aligned first" if aligned and rule == "mean" else "")
                     + (f", {_score(f)}" if f else ""))
    if b.name in ch.permuted:
        moved, units = ch.permuted[b.name]
        lines.append(f"hidden units permuted before averaging: {moved} of {units} moved")
    for rec in ch.refits.get(b.name, []):
        before, after = rec.detail.get("relative_error_before"), rec.detail.get("relative_error_after")
        err = f": relative error {before:.3g} → {after:.3g}" if isinstance(before, float) and isinstance(after, float) else ""
        lines.append(f"refit {rec.target}{err}")
    return "\n".join(lines)


def _chip_title(n: LayerNode, t: _TieSet | None, ch: _Changes, side: str) -> str:
    lines = [n.name, f"{n.role} · {n.op} {'×'.join(map(str, n.weight.shape))} · {_fmt_int(n.num_params)} parameters"]
    if t is not None:
        others = [m for m in t.members if m != n.name]
        lines.append(f"tie set {ch.tie_sets.index(t) + 1}: shares one weight with {len(others)} layer(s)"
                     + (f" ({_score(t.fusion)})" if t.fusion else ""))
        lines.extend("  " + m for m in others)
    rec = ch.refit_layers.get(n.name)
    if rec is not None and side == "after":
        lines.append(f"refitted on calibration data (ridge strength {rec.detail.get('strength', '?')})")
    return "\n".join(lines)


def _legend(x: float, y: float, max_w: float, ch: _Changes, rows: list[_Row]) -> tuple[_Group, float]:
    """The legend, wrapped to ``max_w``; only the marks that appear in this picture. Returns it and its height."""
    g = _Group(cls="legend")
    items: list[tuple[str, _Rect | None, str]] = [("block", _Rect(0, 0, 26, 14, fill=BLOCK_FILL, stroke=BLOCK_STROKE, rx=3), "")]
    if ch.absorbed_by:
        items.append(("fused block: kept, holds the fused weights (⊕ = blocks merged)",
                      _Rect(0, 0, 26, 14, fill=_tint(PALETTE[0]), stroke=PALETTE[0], sw=2, rx=3), ""))
        items.append(("removed: absorbed, the arrow points to the block that took it in",
                      _Rect(0, 0, 26, 14, fill=REMOVED_FILL, stroke=REMOVED_INK, dash=(4, 3), rx=3), ""))
    if any(r.block is None for r in rows):
        items.append(("layer outside blocks", _Rect(0, 0, 26, 14, fill="#ffffff", stroke="#c9cfd6", dash=(2, 2), rx=3), ""))
    if ch.permuted:
        items.append(("hidden units permuted before averaging (moved/units)", None, "⇄"))
    if ch.refits:
        items.append(("refitted on calibration data", _Rect(0, 0, 26, 14, fill=CHIP_FILL, stroke=REFIT_INK, sw=2, rx=3), ""))
    if ch.tie_sets:
        items.append(("tied layers: one colour per tie set; on its lane ○ keeps the weight, ● shares it",
                      _Rect(0, 0, 26, 14, fill=PALETTE[2], rx=3), ""))
    cx, cy = x, y
    for text, swatch, glyph in items:
        w = 32 + len(text) * 11 * 0.56 + 22
        if cx > x and cx + w > x + max_w:
            cx, cy = x, cy + 20
        if swatch is not None:
            swatch.x, swatch.y = cx, cy
            g.add(swatch)
        else:
            g.add(_Text(cx + 13, cy + 12, glyph, size=14, anchor="middle", bold=True, fill="#555555"))
        g.add(_Text(cx + 32, cy + 11, text, size=11, mono=False, fill="#444444"))
        cx += w
    return g, cy - y + 14


# ----------------------------------------------------------------------------------------
# Writers


def _dash_attr(dash: tuple[float, ...] | None) -> str:
    return f' stroke-dasharray="{" ".join(f"{d:g}" for d in dash)}"' if dash else ""


def _a(v: object) -> str:
    return html.escape(str(v), quote=True)


def _svg_shape(s: _Shape, out: list[str]) -> None:
    if isinstance(s, _Group):
        attrs = (f' class="{_a(s.cls)}"' if s.cls else "") + "".join(f' data-{k}="{_a(v)}"' for k, v in s.data.items())
        out.append(f"<g{attrs}>")
        if s.title:
            out.append(f"<title>{_a(s.title)}</title>")
        for c in s.children:
            _svg_shape(c, out)
        out.append("</g>")
    elif isinstance(s, _Rect):
        cls = f' class="{_a(s.cls)}"' if s.cls else ""
        op = f' opacity="{s.opacity:g}"' if s.opacity < 1 else ""
        out.append(f'<rect{cls} x="{s.x:.1f}" y="{s.y:.1f}" width="{s.w:.1f}" height="{s.h:.1f}" rx="{s.rx:g}" '
                   f'fill="{s.fill}" stroke="{s.stroke}" stroke-width="{s.sw:g}"{_dash_attr(s.dash)}{op}/>')
    elif isinstance(s, _Text):
        style = (' font-weight="bold"' if s.bold else "") + (' font-style="italic"' if s.italic else "")
        family = MONO if s.mono else SANS
        out.append(f'<text x="{s.x:.1f}" y="{s.y:.1f}" font-size="{s.size:g}" font-family="{family}" fill="{s.fill}" '
                   f'text-anchor="{s.anchor}"{style}>{_a(s.text)}</text>')
    elif isinstance(s, _Line):
        out.append(f'<line x1="{s.x1:.1f}" y1="{s.y1:.1f}" x2="{s.x2:.1f}" y2="{s.y2:.1f}" stroke="{s.stroke}" '
                   f'stroke-width="{s.sw:g}"{_dash_attr(s.dash)}/>')
    elif isinstance(s, _Curve):
        mid = (s.x1 + s.x2) / 2
        out.append(f'<path d="M{s.x1:.1f},{s.y1:.1f} C{mid:.1f},{s.y1:.1f} {mid:.1f},{s.y2:.1f} {s.x2:.1f},{s.y2:.1f}" '
                   f'fill="none" stroke="{s.stroke}" stroke-width="{s.sw:g}"{_dash_attr(s.dash)}/>')
    elif isinstance(s, _Circle):
        out.append(f'<circle cx="{s.cx:.1f}" cy="{s.cy:.1f}" r="{s.r:g}" fill="{s.fill}" stroke="{s.stroke}" stroke-width="{s.sw:g}"/>')
    elif isinstance(s, _Poly):
        pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in s.points)
        out.append(f'<polygon points="{pts}" fill="{s.fill}"/>')


def _svg(scene: _Scene) -> str:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{scene.width}" height="{scene.height}" '
           f'viewBox="0 0 {scene.width} {scene.height}" role="img" aria-label="{_a(scene.title)}">',
           f'<rect x="0" y="0" width="{scene.width}" height="{scene.height}" fill="#ffffff"/>']
    _svg_shape(scene.root, out)
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body { font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 16px; color: #222; }
svg .block:hover > rect.frame, svg .layer-row:hover > rect.frame { stroke: #111; stroke-width: 2.5; }
svg .chip:hover > rect { stroke: #111; stroke-width: 2; }
svg .link:hover path { stroke-width: 3; }
svg .tie-lane:hover line { stroke-width: 5; }
svg.focus .chip.tied:not(.hl), svg.focus .tie-lane:not(.hl) { opacity: 0.25; }
table { border-collapse: collapse; font-size: 12px; margin-top: 8px; }
th, td { border: 1px solid #d5dae0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: DejaVu Sans Mono, Menlo, Consolas, monospace; font-size: 11px; }
h2 { font-size: 15px; margin-top: 22px; }
details { margin-top: 14px; }
"""

# Hovering one member of a tie set dims the other sets, so a set can be followed across the
# stack; plain DOM calls, no library.
_JS = """
(function () {
  var svg = document.querySelector('svg');
  function set(id, on) {
    svg.querySelectorAll('[data-tieset="' + id + '"]').forEach(function (e) { e.classList.toggle('hl', on); });
    svg.classList.toggle('focus', on);
  }
  svg.querySelectorAll('[data-tieset]').forEach(function (e) {
    e.addEventListener('mouseenter', function () { set(e.getAttribute('data-tieset'), true); });
    e.addEventListener('mouseleave', function () { set(e.getAttribute('data-tieset'), false); });
  });
})();
"""


def _tables(graph: LayerGraph, plan: FusionPlan, ch: _Changes, log: RewriteLog | None) -> str:
    rows = []
    for i, f in enumerate(plan.fusions, 1):
        did = []
        if f.unit == "block":
            for a in f.absorb:
                if a in ch.permuted:
                    did.append(f"{a}: {ch.permuted[a][0]}/{ch.permuted[a][1]} units permuted")
            if f.keep in ch.fuse_detail:
                d = ch.fuse_detail[f.keep]
                did.append(f"fused ({d.get('rule', plan.fuse)}{', aligned' if d.get('aligned') else ''})")
            if ch.refits.get(f.keep):
                did.append(f"{len(ch.refits[f.keep])} projection(s) refitted")
            gone = [a for a in f.absorb if a in ch.absorbed_by]
            if gone:
                did.append(f"{len(gone)} removed")
        else:
            t = next((t for t in ch.tie_sets if f.keep in t.members), None)
            if t is not None:
                did.append(f"tie set {ch.tie_sets.index(t) + 1}: {len(t.members)} layers share one weight")
        if not ch.from_log:
            did = ["(no rewrite log)"]
        rows.append(f"<tr><td class=num>{i}</td><td>{f.unit}</td><td><code>{_a(f.keep)}</code></td>"
                    f"<td>{'<br>'.join(f'<code>{_a(a)}</code>' for a in f.absorb)}</td><td class=num>{f.score:.4g}</td>"
                    f"<td>{'yes' if f.align else 'no'}</td><td>{_a('; '.join(did))}</td></tr>")
    parts = [f"<h2>Fusions ({len(plan.fusions)}, fuse rule {_a(plan.fuse)})</h2>",
             "<table><tr><th>#</th><th>unit</th><th>keep</th><th>absorb</th><th>score</th><th>align</th>"
             "<th>what the rewrite did</th></tr>", *rows, "</table>"]
    if plan.provenance:
        parts.append("<details><summary>Plan provenance</summary><table>")
        parts.extend(f"<tr><th>{_a(k)}</th><td><code>{_a(v)}</code></td></tr>" for k, v in sorted(plan.provenance.items()))
        parts.append("</table></details>")
    if log is not None and log.records:
        parts.append(f"<details><summary>Rewrite log ({len(log.records)} records)</summary><table>"
                     "<tr><th>pass</th><th>action</th><th>target</th><th>sources</th><th>detail</th></tr>")
        for r in log.records:
            detail = json.dumps(r.detail, sort_keys=True, default=str)
            parts.append(f"<tr><td>{_a(r.pass_name)}</td><td>{_a(r.action)}</td><td><code>{_a(r.target)}</code></td>"
                         f"<td><code>{_a(', '.join(r.sources))}</code></td><td><code>{_a(detail)}</code></td></tr>")
        parts.append("</table></details>")
    return "\n".join(parts)


def _html(scene: _Scene, tables: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_a(scene.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{_svg(scene)}\n{tables}\n<script>{_JS}</script>\n</body>\n</html>\n"
    )


def _png(scene: _Scene, path: str | Path, scale: float = 2.0) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Circle, FancyBboxPatch, PathPatch, Polygon
        from matplotlib.path import Path as MPath
    except ImportError:
        raise LfgraphError("a PNG view needs matplotlib: pip install 'lfgraph[viz]' (or write .html)") from None
    # 1 scene pixel = 1/100 inch, so font sizes in pixels become points by * 0.72
    pt = 0.72
    fig = Figure(figsize=(scene.width / 100, scene.height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, scene.width)
    ax.set_ylim(scene.height, 0)
    ax.axis("off")
    z = [0]

    def dashes(d: tuple[float, ...] | None, sw: float) -> Any:
        # matplotlib scales dash lengths by the line width; SVG does not
        return "solid" if not d else (0, tuple(v / max(sw, 0.5) for v in d))

    def draw(s: _Shape) -> None:
        z[0] += 1
        if isinstance(s, _Group):
            for c in s.children:
                draw(c)
        elif isinstance(s, _Rect):
            ax.add_patch(FancyBboxPatch((s.x, s.y), s.w, s.h, boxstyle=f"round,pad=0,rounding_size={s.rx}",
                                        facecolor=s.fill, edgecolor=s.stroke, linewidth=s.sw * pt if s.stroke != "none" else 0,
                                        linestyle=dashes(s.dash, s.sw), alpha=s.opacity, zorder=z[0]))
        elif isinstance(s, _Text):
            ax.text(s.x, s.y, s.text, fontsize=s.size * pt, color=s.fill, va="baseline",
                    ha={"start": "left", "middle": "center", "end": "right"}[s.anchor],
                    family="DejaVu Sans Mono" if s.mono else "DejaVu Sans", fontweight="bold" if s.bold else "normal",
                    fontstyle="italic" if s.italic else "normal", zorder=z[0])
        elif isinstance(s, _Line):
            ax.plot([s.x1, s.x2], [s.y1, s.y2], color=s.stroke, linewidth=s.sw * pt, linestyle=dashes(s.dash, s.sw),
                    alpha=s.opacity, zorder=z[0], solid_capstyle="butt")
        elif isinstance(s, _Curve):
            mid = (s.x1 + s.x2) / 2
            p = MPath([(s.x1, s.y1), (mid, s.y1), (mid, s.y2), (s.x2, s.y2)],
                      [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4])
            ax.add_patch(PathPatch(p, facecolor="none", edgecolor=s.stroke, linewidth=s.sw * pt,
                                   linestyle=dashes(s.dash, s.sw), alpha=s.opacity, zorder=z[0]))
        elif isinstance(s, _Circle):
            ax.add_patch(Circle((s.cx, s.cy), s.r, facecolor=s.fill, edgecolor=s.stroke,
                                linewidth=s.sw * pt if s.stroke != "none" else 0, zorder=z[0]))
        elif isinstance(s, _Poly):
            ax.add_patch(Polygon(s.points, closed=True, facecolor=s.fill, edgecolor="none", alpha=s.opacity, zorder=z[0]))

    draw(scene.root)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100 * scale, facecolor="white")
    except OSError as e:
        raise LfgraphError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------
# Public API


def render_rewrite(graph: LayerGraph, plan: FusionPlan, log: RewriteLog | None, path: str | Path, title: str = "") -> None:
    """Draw what ``plan`` (as recorded in ``log``) did to ``graph``, before → after.

    Args:
        graph: the LayerGraph of the model *before* the rewrite (the one the plan was made for).
        plan: the applied plan; gives the fuse rule, the scores and the provenance counts.
        log: the rewrite pass's log (``PassResult.log`` or ``RewriteLog.from_json`` of the
            file ``lfgraph compress --log`` writes). ``None`` or an empty log draws what the
            plan asks for instead.
        path: output file; ``.png`` writes a PNG through matplotlib, anything else a
            self-contained HTML page (inline SVG, hover text, no external assets).
        title: the heading; by default the model name and the mode.

    The file is written atomically. Raises ``LfgraphError`` when the plan or the log names
    a block or layer that ``graph`` does not have (they were made for another model), or
    when the file cannot be written. Nothing passed in is modified.
    """
    changes = _changes(graph, plan, log)
    if str(path).lower().endswith(".png"):
        _png(_scene(graph, plan, changes, title, interactive=False), path)
        return
    scene = _scene(graph, plan, changes, title)
    try:
        write_text_atomic(path, _html(scene, _tables(graph, plan, changes, log)))
    except OSError as e:
        raise LfgraphError(f"cannot write {path}: {e.strerror or e}") from None


def load_log(path: str | Path) -> RewriteLog:
    """Read a rewrite log written by ``lfgraph compress --log`` (``LfgraphError`` if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise LfgraphError(f"rewrite log {p} does not exist: write one with `lfgraph compress MODEL --log {p} ...`")
    try:
        return RewriteLog.from_json(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise LfgraphError(f"{p} is not a rewrite log ({str(e).splitlines()[0][:200]}): "
                           "write one with `lfgraph compress MODEL --log FILE`") from None


def _graph_for(spec: str) -> LayerGraph:
    if spec.lower().endswith(".onnx"):
        if not Path(spec).is_file():
            raise LfgraphError(f"ONNX file {spec} does not exist")
        try:
            from .frontends.onnx_graph import build_layer_graph, load_onnx
        except ImportError:
            raise LfgraphError("this build of lfgraph has no ONNX frontend: give the PyTorch model instead") from None
        return build_layer_graph(load_onnx(spec), model_name=Path(spec).stem)
    from .pipeline import load, trace

    return trace(load(spec))


def demo(path: str | Path = "rewrite-demo.html", mode: str = "merge", layers: int = 8, quiet: bool = False) -> FusionPlan:
    """Build a tiny random Llama, plan a ``merge`` (a quarter of the blocks) or a ``tie``
    (30 % of the parameters), rewrite it and render the result to ``path``; returns the plan."""
    import torch

    from .frontends.torch_fx import build_layer_graph
    from .models import CausalLMLogits
    from .passes.planner import make_plan
    from .passes.rewrite_torch import apply_plan
    from .zoo import tiny_llama

    def say(msg: str) -> None:
        if not quiet:
            print(f"visualize: {msg}", flush=True)

    model = CausalLMLogits(tiny_llama(layers=layers, hidden=64))
    say(f"tracing a tiny Llama ({layers} decoder layers, hidden size 64)")
    graph = build_layer_graph(model, (torch.arange(12).reshape(1, 12) % 128,), model_name=f"tiny-llama-{layers}")
    if mode == "merge":
        plan = make_plan(graph, metric="bures", target=0.25, mode="merge", fuse="mean", align=True)
    elif mode == "tie":
        plan = make_plan(graph, metric="bures", target=0.3, target_kind="params", mode="tie", scope="global")
    else:
        raise LfgraphError(f"unknown demo mode {mode!r}: choose merge or tie")
    say(f"planned {len(plan.fusions)} fusions ({mode}); rewriting")
    result = apply_plan(model, graph, plan)
    render_rewrite(graph, plan, result.log, path, title=f"demo: tiny Llama, {mode}")
    say(f"wrote {path}")
    return plan


def build_parser() -> argparse.ArgumentParser:
    """The ``tools/visualize.py`` command line."""
    p = argparse.ArgumentParser(
        prog="visualize.py",
        description="Draw what a fusion plan did to a model: blocks before and after, absorbed blocks, tied layers.",
        epilog="MODEL is an alias (smollm2, minilm), a Hugging Face model folder, a .gguf file or an .onnx file: "
               "the model the plan was made for, before compression.",
    )
    p.add_argument("model", nargs="?", help="the original model (not needed with --demo)")
    p.add_argument("--plan", help="the plan JSON (lfgraph plan -o plan.json)")
    p.add_argument("--log", help="the rewrite log JSON (lfgraph compress --log rewrite.json); without it the plan is drawn")
    p.add_argument("-o", "--output", action="append", help="output .html or .png (repeat for both; default rewrite.html)")
    p.add_argument("--title", default="", help="heading of the picture")
    p.add_argument("--demo", action="store_true", help="build, plan, rewrite and draw a tiny Llama: no input files")
    p.add_argument("--mode", choices=["merge", "tie"], default="merge", help="what --demo does (default merge)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the --demo model (default 8)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a user error, printed on one line)."""
    args = build_parser().parse_args(argv)
    outputs = args.output or (["rewrite-demo.html"] if args.demo else ["rewrite.html"])
    try:
        if args.demo:
            if args.model or args.plan or args.log:
                raise LfgraphError("--demo builds its own model and plan: leave out MODEL, --plan and --log")
            if args.layers < 2:
                raise LfgraphError("--layers must be at least 2: one block cannot be fused with anything")
            plan = demo(outputs[0], mode=args.mode, layers=args.layers)
            return 0 if plan.fusions else 1
        if not args.model or not args.plan:
            raise LfgraphError("give the model and --plan (and --log for what the rewrite did), or use --demo")
        plan = FusionPlan.load(args.plan)
        log = load_log(args.log) if args.log else None
        graph = _graph_for(args.model)
        plan.check_applies_to(graph.fingerprint())
        for out in outputs:
            render_rewrite(graph, plan, log, out, title=args.title)
            print(f"visualize: wrote {out}")
        return 0
    except LfgraphError as e:
        print(f"visualize: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())


def add_subcommand(sub: "argparse._SubParsersAction") -> None:
    """Register ``lfgraph visualize`` (the same options as :func:`build_parser`)."""
    p = sub.add_parser("visualize", help="draw what a plan or rewrite did to a model (HTML or PNG)")
    for action in build_parser()._actions[1:]:
        p._add_action(action)
    p.set_defaults(run=lambda args: main_args(args))


def main_args(args: argparse.Namespace) -> int:
    outputs = args.output or (["rewrite-demo.html"] if args.demo else ["rewrite.html"])
    if args.demo:
        if args.model or args.plan or args.log:
            raise LfgraphError("--demo builds its own model and plan: leave out MODEL, --plan and --log")
        if args.layers < 2:
            raise LfgraphError("--layers must be at least 2: one block cannot be fused with anything")
        plan = demo(outputs[0], mode=args.mode, layers=args.layers)
        return 0 if plan.fusions else 1
    if not args.model or not args.plan:
        raise LfgraphError("give the model and --plan (and --log for what the rewrite did), or use --demo")
    plan = FusionPlan.load(args.plan)
    log = load_log(args.log) if args.log else None
    graph = _graph_for(args.model)
    plan.check_applies_to(graph.fingerprint())
    for out in outputs:
        render_rewrite(graph, plan, log, out, title=args.title)
        print(f"visualize: wrote {out}")
    return 0
