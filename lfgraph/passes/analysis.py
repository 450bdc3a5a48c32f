"""Analysis pass: similarity of every compatible layer pair, and of every block pair.

Expects a :class:`~lfgraph.graph.LayerGraph`. Guarantees: for each compatible group a
symmetric distance matrix under the chosen metric (lower = more alike, diagonal 0), and for
blocks of one kind an aggregated block distance matrix. Nothing is modified.

Block scores aggregate member scores: each role's distances are divided by that role's
median off-diagonal distance (roles differ in scale by orders of magnitude), then averaged
over the block's roles, so that every role counts equally.

Asymmetric metrics (``kl``) keep the paper's asymmetry: "the divergence in both directions
can be used to assign a weight to each layer pair". A pair is ranked by the *smaller*
direction, ``min(KL(i‖j), KL(j‖i))``: how well one layer's distribution stands in for the
other's, which is what fusing them needs. (Averaging both directions would make ``kl`` rank
exactly like ``jeffreys``, its symmetrised sum.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import NoCompatibleGroupsError
from ..graph import LayerGraph
from .metrics import get_metric, pairwise_distances

SCOPES = ("global", "adjacent")


@dataclass
class GroupAnalysis:
    """Distances between the members of one compatible group (graph order)."""

    key: str
    names: list[str]
    family: str
    distances: np.ndarray


@dataclass
class Analysis:
    """Result of the analysis pass under one metric."""

    metric: str
    groups: dict[str, GroupAnalysis]
    block_names: list[str] = field(default_factory=list)
    block_distances: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def ranked_layer_pairs(self, scope: str = "global") -> list[tuple[float, str, str, str]]:
        """(normalised score, layer a, layer b, group key), most alike first.

        ``adjacent`` keeps pairs that are neighbours in their group's graph order. Scores
        are divided by the group's median distance so that groups can be ranked together.
        """
        out = []
        for key, g in self.groups.items():
            scale = _median_offdiag(g.distances)
            n = len(g.names)
            for i in range(n):
                for j in range(i + 1, n):
                    if scope == "adjacent" and j != i + 1:
                        continue
                    d = _pair(g.distances, i, j)
                    if np.isfinite(d):
                        out.append((d / scale, g.names[i], g.names[j], key))
        out.sort(key=lambda t: (t[0], t[1], t[2]))
        return out

    def ranked_block_pairs(self, scope: str = "adjacent") -> list[tuple[float, str, str]]:
        """(score, block a, block b) for compatible block pairs, most alike first."""
        out = []
        n = len(self.block_names)
        for i in range(n):
            for j in range(i + 1, n):
                if scope == "adjacent" and j != i + 1:
                    continue
                d = self.block_distances[i, j]
                if np.isfinite(d):
                    out.append((float(d), self.block_names[i], self.block_names[j]))
        out.sort(key=lambda t: (t[0], t[1], t[2]))
        return out


def _pair(d: np.ndarray, i: int, j: int) -> float:
    """A pair's score: the smaller direction (equal to either one for symmetric metrics)."""
    return float(min(d[i, j], d[j, i])) if np.isfinite(d[i, j]) and np.isfinite(d[j, i]) else float("nan")


def _median_offdiag(d: np.ndarray) -> float:
    n = d.shape[0]
    vals = [v for i in range(n) for j in range(i + 1, n) if np.isfinite(v := _pair(d, i, j))]
    med = float(np.median(vals)) if vals else 1.0
    return med if med > 0 and np.isfinite(med) else 1.0


def analyze(
    graph: LayerGraph,
    metric: str = "bures",
    progress: bool = False,
    families: tuple[str, ...] | None = None,
    scope: str = "global",
) -> Analysis:
    """Run the analysis pass.

    ``scope="adjacent"`` computes only the distances between neighbours in each group
    (the others are NaN): all a plan of adjacent fusions needs, at a fraction of the cost
    of all pairs for the expensive metrics. ``families`` restricts the groups to some of ``attention``, ``fully-connected``,
    ``convolutional`` (default: all). Raises ``NoCompatibleGroupsError`` when the graph has
    no group of two or more compatible layers.
    """
    m = get_metric(metric)
    groups = graph.groups()
    if families:
        groups = {k: v for k, v in groups.items() if v[0].family in families}
    if not groups:
        raise NoCompatibleGroupsError(
            f"{graph.model_name or 'the model'} has no two layers of the same op, role and weight shape: "
            "nothing can be fused (layer fusion needs repeated layers, e.g. a stack of blocks)"
        )
    results: dict[str, GroupAnalysis] = {}

    def n_pairs(k: int) -> int:
        return k - 1 if scope == "adjacent" else k * (k - 1) // 2

    from tqdm import tqdm

    # one bar over every pair of every group: per-group bars flood the terminal
    with tqdm(total=sum(n_pairs(len(v)) for v in groups.values()), desc=f"analysis ({m.name})", unit="pair",
              disable=not progress, leave=False) as bar:
        for key, members in groups.items():
            pairs = [(i, i + 1) for i in range(len(members) - 1)] if scope == "adjacent" else None
            d = pairwise_distances(m, [n.matrix for n in members], pairs=pairs)
            results[key] = GroupAnalysis(key=key, names=[n.name for n in members], family=members[0].family, distances=d)
            bar.update(n_pairs(len(members)))
    analysis = Analysis(metric=m.name, groups=results)
    _aggregate_blocks(graph, analysis)
    return analysis


def _aggregate_blocks(graph: LayerGraph, analysis: Analysis) -> None:
    blocks = graph.blocks
    nb = len(blocks)
    analysis.block_names = [b.name for b in blocks]
    if nb == 0:
        return
    total = np.zeros((nb, nb))
    count = np.zeros((nb, nb))
    index_in_group = {}
    for g in analysis.groups.values():
        scale = _median_offdiag(g.distances)
        for i, name in enumerate(g.names):
            index_in_group[name] = (g, i, scale)
    for a in range(nb):
        for b in range(a + 1, nb):
            if blocks[a].kind != blocks[b].kind:
                continue
            ma, mb = graph.block_members(blocks[a]), graph.block_members(blocks[b])
            for role, na in ma.items():
                nb_node = mb.get(role)
                if nb_node is None or na.name not in index_in_group or nb_node.name not in index_in_group:
                    continue
                g, i, scale = index_in_group[na.name]
                g2, j, _ = index_in_group[nb_node.name]
                if g2 is not g:
                    continue
                d = _pair(g.distances, i, j)
                if np.isfinite(d):
                    total[a, b] += d / scale
                    count[a, b] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    d = np.where(np.isnan(d), d.T, d)  # mirror the upper triangle
    np.fill_diagonal(d, 0.0)
    analysis.block_distances = d
