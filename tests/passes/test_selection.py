"""Selection criteria pick what their definitions say on hand-built models.

The toy language model's blocks are ``x + down(tanh(up(x)))``; zeroing a block's down
projection makes it exactly the identity, which has Block Influence 0, leaves the angular
distance across it at 0, and costs nothing in calibration loss when removed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.passes.selection import (
    SELECTORS, Run, angular, angular_distances, block_influence, block_influence_scores, runs_from_dropped, runs_to_plan,
    select_runs, sleb,
)
from tiny_models import ResNetCNN, randomize_batchnorm

torch.set_num_threads(2)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.down(torch.tanh(self.up(x)))


class ToyLM(nn.Module):
    """Token ids → logits; blocks take a keyword argument, as Hugging Face layers do."""

    def __init__(self, n: int = 6, d: int = 16, vocab: int = 32, identity: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():
            for i in identity:
                self.layers[i].down.weight.zero_()
                self.layers[i].down.bias.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h, scale=1.0)
        return self.head(h)


NAMES = [f"layers.{i}" for i in range(6)]


def _ids(n: int = 6, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 32, (n, seq), generator=torch.Generator().manual_seed(0))


def test_identity_block_has_zero_influence_and_is_dropped_first() -> None:
    model = ToyLM(identity=(3,)).eval()
    scores = block_influence_scores(model, NAMES, _ids())
    assert scores[3] == pytest.approx(0.0, abs=1e-9)
    assert all(s > 1e-4 for i, s in scores.items() if i != 3)
    runs = block_influence(model, NAMES, _ids(), 1)
    assert runs == [Run([2, 3], keep=2, score=runs[0].score)]


def test_angular_finds_the_identity_run() -> None:
    model = ToyLM(identity=(2, 3)).eval()
    dist = angular_distances(model, NAMES, _ids(), 2)
    assert dist[2] == pytest.approx(0.0, abs=1e-6)
    assert min(d for l, d in dist.items() if l != 2) > 1e-3
    runs = angular(model, NAMES, _ids(), 2)
    assert [(r.blocks, r.keep) for r in runs] == [([1, 2, 3], 1)]


def _greedy_text(model: ToyLM, n: int, seq: int) -> torch.Tensor:
    """Sequences the model itself predicts: any change to a confident model raises their NLL."""
    ids = torch.arange(n)[:, None] % 32
    with torch.no_grad():
        for _ in range(seq - 1):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def test_sleb_drops_the_blocks_that_cost_nothing() -> None:
    model = ToyLM(identity=(1, 4)).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # confident predictions
    runs = sleb(model, NAMES, _greedy_text(model, 4, 10), 2)
    assert sorted(i for r in runs for i in r.absorb) == [1, 4]
    # the model itself was never changed while candidates were scored
    assert len(model.layers) == 6


def test_sleb_on_a_cnn_scores_agreement_with_the_original() -> None:
    torch.manual_seed(0)
    net = randomize_batchnorm(ResNetCNN(stages=((8, 3), (16, 2)), num_classes=4))
    with torch.no_grad():
        net.blocks[1].conv2.weight.zero_()
        net.blocks[1].bn2.bias.zero_()  # relu(0 + x) = x: block 1 is a no-op
    names = ["blocks.0", "blocks.1", "blocks.2", "blocks.4"]  # block 3 downsamples
    runs = sleb(net, names, torch.randn(8, 3, 8, 8), 1)
    assert [(r.blocks, r.keep) for r in runs] == [([0, 1], 0)]


def test_runs_from_dropped_groups_neighbours() -> None:
    allowed = list(range(8))
    assert [(r.blocks, r.keep) for r in runs_from_dropped([5, 6, 2], allowed)] == [([1, 2], 1), ([4, 5, 6], 4)]
    # at the bottom of a stack the block above keeps the dropped ones
    assert [(r.blocks, r.keep) for r in runs_from_dropped([0, 1], allowed)] == [([0, 1, 2], 2)]
    # two groups sharing a keeper become one run
    assert [(r.blocks, r.keep) for r in runs_from_dropped([0, 2], allowed)] == [([0, 1, 2], 1)]
    with pytest.raises(LfgraphError):
        runs_from_dropped([0, 1, 2], [0, 1, 2])


def test_registry_plan_and_errors() -> None:
    assert set(SELECTORS) == {"block_influence", "angular", "sleb", "similarity"}
    model = ToyLM().eval()
    with pytest.raises(LfgraphError):
        select_runs("nope", model, NAMES, _ids(), 1)
    with pytest.raises(LfgraphError):
        select_runs("angular", model, NAMES, _ids(), 6)
    with pytest.raises(LfgraphError):
        select_runs("similarity", model, NAMES, None, 1)  # needs the layer graph
    plan = runs_to_plan([Run([1, 2, 3], keep=1)], "layers", fuse="calibrated")
    assert plan.fusions[0].keep == "layers.1" and plan.fusions[0].absorb == ["layers.2", "layers.3"]
    assert plan.fuse == "calibrated" and plan.provenance["blocks_removed"] == 2


def test_similarity_picks_identical_neighbours() -> None:
    pytest.importorskip("lfgraph.passes.planner")
    from lfgraph.frontends.torch_fx import build_layer_graph

    model = ToyLM().eval()
    with torch.no_grad():
        for p_src, p_dst in zip(model.layers[3].parameters(), model.layers[4].parameters()):
            p_dst.copy_(p_src)
    graph = build_layer_graph(model, (_ids(1, 8),))
    runs = select_runs("similarity", model, [b.name for b in graph.blocks], None, 1, graph=graph)
    assert [(r.blocks, r.keep) for r in runs] == [([3, 4], 3)]
