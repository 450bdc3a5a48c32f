"""The report page's data: counts equal the plan's and the log's, heatmaps are the
analysis's matrices with the fused pairs outlined, scores are Block Influence computed a
second way, the page embeds exactly that data, user errors, the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lfgraph.errors import LfgraphError
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.graph import LayerGraph
from lfgraph.models import CausalLMLogits
from lfgraph.passes.analysis import analyze
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan
from lfgraph.plan import FusionPlan
from lfgraph.visualize import read_page_data, report_data, write_report
from lfgraph.visualize.command import add_subcommand, run
from lfgraph.visualize.scores import selection_scores
from tiny_models import tiny_llama

# tests/ is on sys.path through its conftest.py (pytest's default "prepend" import mode)
from onnx_builders import residual_mlp


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, LayerGraph]:
    torch.manual_seed(0)
    model = CausalLMLogits(tiny_llama(layers=8, hidden=32)).eval()
    graph = build_layer_graph(model, (torch.arange(10).reshape(1, 10) % 128,), model_name="tiny-llama-8")
    return model, graph


@pytest.fixture(scope="module")
def analysis(llama):
    return analyze(llama[1], "euclidean")


@pytest.fixture(scope="module")
def merged(llama, analysis):
    model, graph = llama
    plan = make_plan(graph, metric="euclidean", target=0.375, mode="merge", fuse="mean", align=True, analysis=analysis)
    return plan, apply_plan(model, graph, plan).log


def test_merge_counts_equal_the_plan(llama, analysis, merged) -> None:
    graph = llama[1]
    plan, log = merged
    d = report_data(graph, plan, log, analysis=analysis)
    c = d["counts"]
    assert c["removed"] == len(plan.absorbed) == log.count("remove") == 3
    assert c["merged"] == len(plan.fusions)
    assert c["blocks_after"] == len(graph.blocks) - len(plan.absorbed)
    assert c["tied"] == 0 and c["refitted"] == 0
    removed = {r["name"] for r in d["rows"] if r.get("fate") == "removed"}
    assert removed == set(plan.absorbed)
    for f in plan.fusions:
        keeper = next(r for r in d["rows"] if r.get("name") == f.keep)
        assert keeper["fate"] == "keeper" and sorted(keeper["absorbs"]) == sorted(f.absorb)
        for a in f.absorb:
            assert next(r for r in d["rows"] if r.get("name") == a)["absorbed_by"] == f.keep
    # every layer of the graph appears once, in graph order
    names = [l["name"] for r in d["rows"] for l in r["layers"]]
    assert names == [n.name for n in sorted(graph.nodes, key=lambda n: n.order)]
    assert len(d["log"]) == len(log.records)


def test_heatmaps_are_the_analysis_with_fused_pairs_outlined(llama, analysis, merged) -> None:
    graph = llama[1]
    plan, log = merged
    d = report_data(graph, plan, log, analysis=analysis)
    h = d["heatmaps"]
    assert h["metric"] == analysis.metric and len(h["groups"]) == len(analysis.groups)
    n_pairs = sum(len(f.absorb) for f in plan.fusions)  # one layer per role and block
    for g in h["groups"]:
        ref = analysis.groups[g["key"]]
        np.testing.assert_allclose(np.array(g["values"], dtype=float), ref.distances, rtol=1e-5)
        assert len(g["chosen"]) == n_pairs
        for i, j in g["chosen"]:
            bi, bj = graph.node(g["names"][i]).block, graph.node(g["names"][j]).block
            pair = {graph.blocks[bi].name, graph.blocks[bj].name}
            assert any(pair <= {f.keep, *f.absorb} for f in plan.fusions)
    assert len(h["blocks"]["chosen"]) == n_pairs


def test_tie_counts_equal_the_plan(llama, analysis) -> None:
    model, graph = llama
    plan = make_plan(graph, metric="euclidean", target=0.3, target_kind="params", mode="tie", scope="global", analysis=analysis)
    log = apply_plan(model, graph, plan).log
    d = report_data(graph, plan, log)
    layer_fusions = [f for f in plan.fusions if f.unit == "layer"]
    assert d["counts"]["tied"] == sum(len(f.absorb) for f in layer_fusions) == log.count("tie") > 0
    assert d["counts"]["removed"] == 0
    tied = [l for r in d["rows"] for l in r["layers"] if l["tie"] is not None and not l["tie_keep"]]
    assert len(tied) == d["counts"]["tied"]
    for s in d["tie_sets"]:  # each set's members share one colour and name the same kept layer
        assert s["keep"] == s["members"][0]


def test_calibrated_fusion_marks_refitted_layers(llama) -> None:
    model, graph = llama
    plan = make_plan(graph, metric="euclidean", target=0.25, mode="merge", fuse="calibrated")
    cal = torch.randint(0, 128, (4, 16))
    log = apply_plan(model, graph, plan, calibration=cal).log
    d = report_data(graph, plan, log)
    refit_layers = {r.target for r in log.records if r.action == "refit"}
    assert refit_layers and d["counts"]["refitted"] == len(refit_layers)
    marked = {l["name"] for r in d["rows"] for l in r["layers"] if l["refit"]}
    assert marked == refit_layers
    assert all(next(r for r in d["rows"] if r.get("name") == f.keep)["refit"] > 0 for f in plan.fusions)


def test_plan_without_log_shows_the_plan(llama, merged) -> None:
    graph = llama[1]
    plan, _ = merged
    d = report_data(graph, plan, None)
    assert d["from_log"] is False and d["log"] == []
    assert d["counts"]["removed"] == len(plan.absorbed)
    assert d["table"][0] == ["blocks", "8", str(8 - len(plan.absorbed)), f"{(8 - len(plan.absorbed)) / 8:.3f}×"]


def test_block_influence_scores_match_hidden_states(llama) -> None:
    """BI = 1 - cos(input, output) per token, checked against Hugging Face's hidden states."""
    model, graph = llama
    cal = torch.randint(0, 128, (3, 12))
    scores = selection_scores(model, graph, cal, ["block_influence", "angular"])
    with torch.no_grad():
        hs = model.model(cal, output_hidden_states=True).hidden_states
    # the last entry has the final norm applied: compare blocks 0 .. n-2
    for i in range(len(graph.blocks) - 1):
        a, b = hs[i].reshape(-1, hs[i].shape[-1]).double(), hs[i + 1].reshape(-1, hs[i].shape[-1]).double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        name = graph.blocks[i].name
        assert scores["block_influence"][name] == pytest.approx(float((1 - cos).mean()), rel=1e-6, abs=1e-9)
        assert scores["angular"][name] == pytest.approx(float((torch.arccos(cos.clamp(-1, 1)) / np.pi).mean()), rel=1e-6, abs=1e-9)


def test_page_embeds_the_data_and_is_self_contained(tmp_path: Path, llama, analysis, merged) -> None:
    graph = llama[1]
    plan, log = merged
    scores = {"block_influence": {b.name: 0.1 * b.index for b in graph.blocks}}
    kw = dict(analysis=analysis, scores=scores, table=[("latency", "2.0 ms", "1.5 ms", "0.75×")], loss_curve=[(0, 2.0), (10, 1.0)])
    write_report(tmp_path / "r.html", graph, plan, log, **kw)
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    expected = json.loads(json.dumps(report_data(graph, plan, log, **kw), default=str))
    assert read_page_data(text) == expected
    assert expected["scores"]["block_influence"][graph.blocks[3].name] == pytest.approx(0.3)
    assert expected["loss_curve"] == [[0, 2.0], [10, 1.0]]
    # nothing is fetched: no external URLs in src/href, no module imports
    for bad in ("src=\"http", "href=\"http", "@import", "//cdn", "fetch("):
        assert bad not in text
    write_report(tmp_path / "r.json", graph, plan, log, **kw)
    assert json.loads((tmp_path / "r.json").read_text()) == expected


def test_user_errors(tmp_path: Path, llama, merged) -> None:
    graph = llama[1]
    plan, log = merged
    other = FusionPlan.from_json(plan.to_json().replace("layers.", "blocks."))
    with pytest.raises(LfgraphError, match="another model"):
        report_data(graph, other, None)
    with pytest.raises(LfgraphError, match="no blocks"):
        report_data(graph, plan, log, scores={"block_influence": {"nope": 1.0}})
    with pytest.raises(LfgraphError, match="does not exist"):
        write_report(tmp_path / "missing" / "r.html", graph, plan, log)
    with pytest.raises(LfgraphError, match="format"):
        write_report(tmp_path / "r.html", graph, plan, log, format="pdf")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfgraph")
    add_subcommand(p.add_subparsers(dest="command"))
    return p


def test_command_line_on_an_onnx_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from lfgraph.frontends.onnx_graph import build_layer_graph as onnx_graph
    from lfgraph.passes.rewrite_onnx import apply_plan as onnx_apply

    m = residual_mlp(blocks=4)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    graph = onnx_graph(m, model_name="m")
    plan = make_plan(graph, metric="euclidean", target=0.25, mode="merge", fuse="mean")
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    plan.save(out_dir / "plan.json")
    (out_dir / "rewrite.json").write_text(onnx_apply(m, graph, plan).log.to_json())
    report = {"table": [["latency", "2 ms", "1 ms", "0.5×"]], "loss_curve": [[0, 1.5], [1, 1.0]], "healed": [plan.fusions[0].keep]}
    (out_dir / "report.json").write_text(json.dumps(report))
    (out_dir / "scores.json").write_text(json.dumps({"sleb": {b.name: float(b.index) for b in graph.blocks}}))
    assert run(parser().parse_args(["visualize", str(src), str(out_dir), "-o", str(tmp_path / "r.html")])) == 0
    d = read_page_data((tmp_path / "r.html").read_text())
    assert d["counts"]["removed"] == len(plan.absorbed) and d["from_log"] and d["heatmaps"]["metric"] == "euclidean"
    assert d["table"] == report["table"] and d["loss_curve"] == report["loss_curve"]
    assert [r["name"] for r in d["rows"] if r.get("healed")] == report["healed"]
    assert d["scores"]["sleb"] == {b.name: float(b.index) for b in graph.blocks}
    assert run(parser().parse_args(["visualize", str(src), str(out_dir), "-o", str(tmp_path / "me.json"), "--format", "model-explorer"])) == 0
    ids = {n.name or f"<node_{i}>" for i, n in enumerate(m.graph.node)}
    assert set(json.loads((tmp_path / "me.json").read_text())["results"]) <= ids
    assert json.loads((tmp_path / "me.score.json").read_text())["name"] == "lfgraph selection score: sleb"
    assert run(parser().parse_args(["visualize", str(src), "--plan", str(out_dir / "plan.json"), "-o", str(tmp_path / "r.json"), "--no-heatmaps"])) == 0
    assert json.loads((tmp_path / "r.json").read_text())["heatmaps"] is None
    with pytest.raises(LfgraphError, match="no lfgraph plan"):
        run(parser().parse_args(["visualize", str(src), "-o", str(tmp_path / "x.html")]))
    with pytest.raises(LfgraphError, match="does not exist"):
        run(parser().parse_args(["visualize", str(src), "--plan", str(tmp_path / "none.json"), "-o", str(tmp_path / "x.html")]))
    assert "wrote" in capsys.readouterr().out


def test_healed_blocks_are_marked(llama, merged) -> None:
    graph = llama[1]
    plan, log = merged
    keepers = [f.keep for f in plan.fusions]
    d = report_data(graph, plan, log, healed=keepers, loss_curve=[(0, 1.0), (1, 0.5)])
    assert sorted(r["name"] for r in d["rows"] if r.get("healed")) == sorted(keepers)
    assert d["counts"]["healed"] == sum(len(graph.blocks[0].members) for _ in keepers)
    with pytest.raises(LfgraphError, match="healed"):
        report_data(graph, plan, log, healed=["no.such.block"])
