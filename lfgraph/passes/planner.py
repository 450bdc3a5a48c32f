"""Planner: analysis scores + a target → a deterministic :class:`FusionPlan`.

Targets:
- ``target_kind="blocks"``: the fraction of the graph's blocks to remove (``merge``) or to
  tie onto other blocks (``tie``): ``round(target * n_blocks)`` blocks, at least one.
- ``target_kind="params"``: the fraction of the model's parameters to remove: ``tie`` shares
  layers (each tie saves one layer's parameters), ``merge`` removes blocks until enough
  parameters are gone.

Fusions are chosen greedily from the most alike pair down, joining sets with union-find
(a set of k members saves k-1), restricted to neighbours in graph order when
``scope="adjacent"``. Each set keeps its first member (lowest in the graph) and absorbs the
others. The same graph and options always give byte-identical JSON: ties in score are
broken by name, and no randomness is involved.
"""

from __future__ import annotations

from .. import __version__
from ..errors import LfgraphError
from ..graph import LayerGraph
from ..plan import FUSE_RULES, Fusion, FusionPlan
from .analysis import SCOPES, Analysis, analyze

MODES = ("tie", "merge")
TARGET_KINDS = ("blocks", "params")


class _UnionFind:
    def __init__(self, items: list[str]) -> None:
        self.parent = {i: i for i in items}
        self.order = {name: k for k, name in enumerate(items)}

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        # the member earliest in the graph stays the root, i.e. the kept one
        if self.order[rb] < self.order[ra]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        return True

    def sets(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for x in sorted(self.parent, key=self.order.__getitem__):
            out.setdefault(self.find(x), []).append(x)
        return [v for v in out.values() if len(v) > 1]


def _check_options(target: float, target_kind: str, scope: str, mode: str, fuse: str) -> None:
    if not (0.0 < target < 1.0):
        raise LfgraphError(f"target {target} is out of range: give a fraction strictly between 0 and 1 (e.g. 0.25)")
    for value, allowed, what in ((target_kind, TARGET_KINDS, "target kind"), (scope, SCOPES, "scope"), (mode, MODES, "mode"), (fuse, FUSE_RULES, "fuse rule")):
        if value not in allowed:
            raise LfgraphError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")
    if mode == "tie" and fuse != "mean":
        raise LfgraphError(f"mode 'tie' shares one weight, the mean of the tied layers: fuse {fuse!r} needs mode 'merge'")


def make_plan(
    graph: LayerGraph,
    metric: str = "bures",
    target: float = 0.25,
    target_kind: str = "blocks",
    scope: str = "adjacent",
    mode: str = "merge",
    fuse: str = "mean",
    align: bool = True,
    analysis: Analysis | None = None,
    progress: bool = False,
) -> FusionPlan:
    """Plan fusions that reach ``target``.

    Raises ``LfgraphError`` when the target is out of range or cannot be reached (e.g. more
    blocks than the model has removable ones), ``NoCompatibleGroupsError`` when nothing is
    fusable.
    """
    _check_options(target, target_kind, scope, mode, fuse)
    analysis = analysis or analyze(graph, metric, progress=progress, scope=scope)
    if mode == "merge" or target_kind == "blocks":
        fusions = _plan_blocks(graph, analysis, target, target_kind, scope, mode, align)
    else:
        fusions = _plan_layers(graph, analysis, target, scope)
    saved = _saved_params(graph, fusions)
    n_blocks_removed = sum(len(f.absorb) for f in fusions if f.unit == "block") if mode == "merge" else 0
    provenance = {
        "lfgraph_version": __version__,
        "model": graph.model_name,
        "model_fingerprint": graph.fingerprint(),
        "source": graph.source,
        "metric": analysis.metric,
        "scope": scope,
        "target": target,
        "target_kind": target_kind,
        "blocks_before": len(graph.blocks),
        "blocks_after": len(graph.blocks) - n_blocks_removed,
        "params_before": graph.total_params,
        "params_saved": saved,
    }
    return FusionPlan(fusions=fusions, mode=mode, fuse=fuse, provenance=provenance)


def _plan_blocks(graph: LayerGraph, analysis: Analysis, target: float, target_kind: str, scope: str, mode: str, align: bool) -> list[Fusion]:
    removable = {b.name for b in (graph.removable_blocks() if mode == "merge" else graph.blocks)}
    if not removable:
        raise LfgraphError(
            f"{graph.model_name or 'the model'} has no blocks with an identity skip path: merge cannot remove any; "
            "share weights instead with --mode tie --target-kind params"
        )
    block_params = {b.name: sum(graph.node(m).num_params for m in b.members) for b in graph.blocks}
    if target_kind == "blocks":
        want = max(1, round(target * len(graph.blocks)))
        if want > len(removable) - 1:
            raise LfgraphError(
                f"target {target} asks to remove {want} of {len(graph.blocks)} blocks but only {len(removable) - 1} can go: lower the target"
            )
    else:
        want_params = target * graph.total_params
    uf = _UnionFind(analysis.block_names)
    union_scores: list[tuple[str, float]] = []
    removed, removed_params = 0, 0
    for score, a, b in analysis.ranked_block_pairs(scope):
        if a not in removable or b not in removable:
            continue
        if target_kind == "blocks" and removed >= want:
            break
        if target_kind == "params" and removed_params >= want_params:
            break
        if uf.union(a, b):
            removed += 1
            removed_params += block_params[b]
            union_scores.append((a, score))
    if target_kind == "blocks" and removed < want:
        raise LfgraphError(f"only {removed} blocks could be fused under scope {scope!r} (asked {want}): lower the target or use --scope global")
    if target_kind == "params" and removed_params < want_params:
        raise LfgraphError(f"fusing every compatible block saves {removed_params} parameters, short of the target {target}: lower the target")
    fusions = []
    for members in uf.sets():
        keep, absorb = members[0], members[1:]
        score = max((s for a, s in union_scores if a in members), default=0.0)
        if mode == "tie":
            fusions.extend(_tie_block_members(graph, keep, absorb, score))
        else:
            fusions.append(Fusion(keep=keep, absorb=absorb, unit="block", score=score, align=align))
    return fusions


def _tie_block_members(graph: LayerGraph, keep: str, absorb: list[str], score: float) -> list[Fusion]:
    blocks = {b.name: b for b in graph.blocks}
    kept = graph.block_members(blocks[keep])
    out = []
    for role, node in sorted(kept.items()):
        others = [graph.block_members(blocks[a])[role].name for a in absorb]
        out.append(Fusion(keep=node.name, absorb=others, unit="layer", score=score, align=False))
    return out


def _plan_layers(graph: LayerGraph, analysis: Analysis, target: float, scope: str) -> list[Fusion]:
    want = target * graph.total_params
    names = [n.name for n in sorted(graph.nodes, key=lambda n: n.order)]
    uf = _UnionFind(names)
    saved = 0
    scores: dict[str, float] = {}
    for score, a, b, _key in analysis.ranked_layer_pairs(scope):
        if saved >= want:
            break
        if uf.union(a, b):
            saved += graph.node(b).num_params
            scores[b] = score
    if saved < want:
        raise LfgraphError(
            f"tying every compatible layer saves {saved} of {graph.total_params} parameters "
            f"({saved / max(graph.total_params, 1):.1%}), short of the target {target}: lower the target"
        )
    # tying does not align neurons: permuting one layer's outputs would change what its
    # consumers see, and a tied weight has no per-layer consumer to compensate
    return [
        Fusion(keep=m[0], absorb=m[1:], unit="layer", score=max(scores.get(x, 0.0) for x in m[1:]), align=False)
        for m in uf.sets()
    ]


def _saved_params(graph: LayerGraph, fusions: list[Fusion]) -> int:
    blocks = {b.name: b for b in graph.blocks}
    total = 0
    for f in fusions:
        for a in f.absorb:
            if f.unit == "layer":
                total += graph.node(a).num_params
            else:
                total += sum(graph.node(m).num_params for m in blocks[a].members)
    return total
