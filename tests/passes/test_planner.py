"""Planner: targets, scopes, determinism, provenance, and refusals."""

from __future__ import annotations

import pytest
import torch

from lfgraph.errors import LfgraphError, NoCompatibleGroupsError
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.models import CausalLMLogits
from lfgraph.passes.planner import make_plan
from lfgraph.plan import FusionPlan

import tiny_models as zoo

IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_graph():
    return build_layer_graph(CausalLMLogits(zoo.tiny_llama(layers=8)), (IDS,))


def test_plan_is_byte_identical_across_runs():
    a = build_layer_graph(CausalLMLogits(zoo.tiny_llama(layers=8)), (IDS,))
    b = build_layer_graph(CausalLMLogits(zoo.tiny_llama(layers=8)), (IDS,))
    for kw in ({"mode": "merge"}, {"mode": "tie", "target_kind": "params", "scope": "global", "metric": "ca"}):
        assert make_plan(a, target=0.25, **kw).to_json() == make_plan(b, target=0.25, **kw).to_json()


def test_merge_removes_the_requested_fraction_of_blocks_in_adjacent_runs(llama_graph):
    plan = make_plan(llama_graph, metric="bures", target=0.25, scope="adjacent", mode="merge")
    assert sum(len(f.absorb) for f in plan.fusions) == 2  # round(0.25 * 8)
    index = {b.name: b.index for b in llama_graph.blocks}
    for f in plan.fusions:
        members = sorted(index[n] for n in [f.keep, *f.absorb])
        assert members == list(range(members[0], members[0] + len(members)))
        assert index[f.keep] == members[0]  # the first of a run is kept
    p = plan.provenance
    assert (p["blocks_before"], p["blocks_after"], p["metric"], p["scope"]) == (8, 6, "bures", "adjacent")
    assert p["model_fingerprint"] == llama_graph.fingerprint()


def test_global_scope_may_pair_distant_blocks_and_ranks_by_score(llama_graph):
    plan = make_plan(llama_graph, metric="euclidean", target=0.25, scope="global", mode="merge", align=False)
    from lfgraph.passes.analysis import analyze

    best = analyze(llama_graph, "euclidean").ranked_block_pairs("global")[0]
    assert any({best[1], best[2]} <= {f.keep, *f.absorb} for f in plan.fusions)


def test_tie_reaches_the_parameter_target(llama_graph):
    plan = make_plan(llama_graph, target=0.2, target_kind="params", scope="global", mode="tie")
    assert plan.mode == "tie" and all(f.unit == "layer" for f in plan.fusions)
    saved = sum(llama_graph.node(a).num_params for f in plan.fusions for a in f.absorb)
    assert saved == plan.provenance["params_saved"]
    assert saved >= 0.2 * llama_graph.total_params
    groups = {n.name: n.group_key for n in llama_graph.nodes}
    for f in plan.fusions:  # only compatible layers are fused
        assert {groups[n] for n in [f.keep, *f.absorb]} == {groups[f.keep]}


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_target_out_of_range_is_refused(llama_graph, target):
    with pytest.raises(LfgraphError, match="out of range"):
        make_plan(llama_graph, target=target)


def test_target_beyond_what_can_be_removed_is_refused(llama_graph):
    with pytest.raises(LfgraphError, match="lower the target"):
        make_plan(llama_graph, target=0.99, mode="merge")


def test_unknown_options_are_refused(llama_graph):
    with pytest.raises(LfgraphError, match="choose one of"):
        make_plan(llama_graph, scope="sideways")
    with pytest.raises(LfgraphError, match="unknown metric"):
        make_plan(llama_graph, metric="cosine-ish")


def test_merge_needs_blocks():
    g = build_layer_graph(zoo.MLP(), (torch.randn(2, 16),))
    with pytest.raises(LfgraphError, match="no blocks with an identity skip"):
        make_plan(g, mode="merge", target=0.3)


def test_model_without_compatible_groups_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    g = build_layer_graph(model, (torch.randn(1, 4),))
    with pytest.raises(NoCompatibleGroupsError, match="nothing can be fused"):
        make_plan(g, mode="tie", target_kind="params", target=0.1)


def test_plan_json_round_trip_and_fingerprint_guard(llama_graph, tmp_path):
    plan = make_plan(llama_graph, target=0.25)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = FusionPlan.load(path)
    assert again.to_json() == plan.to_json()
    again.check_applies_to(llama_graph.fingerprint())
    with pytest.raises(LfgraphError, match="fingerprint"):
        again.check_applies_to("0" * 16)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('{"schema_version": 99}', "schema_version 99"),
    ('{"schema_version": 1, "fusions": [{"keep": "a"}], "mode": "merge"}', "lacks the field"),
])
def test_bad_plan_files_are_refused(text, match):
    with pytest.raises(LfgraphError, match=match):
        FusionPlan.from_json(text)


@pytest.mark.slow
def test_adjacent_analysis_computes_neighbours_only_and_plans_the_same(llama_graph):
    import numpy as np

    from lfgraph.passes.analysis import analyze

    adjacent = analyze(llama_graph, "bures", scope="adjacent")
    full = analyze(llama_graph, "bures")
    for key, g in adjacent.groups.items():
        n = len(g.names)
        band = np.array([[abs(i - j) <= 1 for j in range(n)] for i in range(n)])
        assert np.isfinite(g.distances[band]).all() and np.isnan(g.distances[~band]).all()
        np.testing.assert_allclose(g.distances[band], full.groups[key].distances[band])
    a = make_plan(llama_graph, target=0.25, scope="adjacent", analysis=adjacent)
    b = make_plan(llama_graph, target=0.25, scope="adjacent")
    assert a.to_json() == b.to_json()
