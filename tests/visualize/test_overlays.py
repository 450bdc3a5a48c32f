"""Model Explorer overlays: built by Model Explorer's own builder (the file equals the
builder's output for the same results), accepted by its Python API, every key a node of
the ORIGINAL ONNX graph (its name, or ``<node_i>`` for the i-th node when unnamed, as the
model-explorer-onnx adapter names it), and the nodes of removed blocks carry the removed
fate and their block's score."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from lfgraph.frontends.onnx_graph import analyze_onnx, build_layer_graph, load_onnx
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_onnx import apply_plan
from lfgraph.visualize import write_report
from lfgraph.visualize.overlays import FATES

# tests/ is on sys.path through its conftest.py (pytest's default "prepend" import mode)
from onnx_builders import residual_mlp

builder = pytest.importorskip("model_explorer.node_data_builder", reason="ai-edge-model-explorer is not installed")
LIGHT_RESNET50 = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"


def rebuilt(text: str) -> str:
    """The same overlay rebuilt with Model Explorer's builder from the parsed file."""
    d = json.loads(text)
    g = builder.GraphNodeData(
        name=d.get("name"), results={k: builder.NodeDataResult(**v) for k, v in d["results"].items()},
        thresholds=[builder.ThresholdItem(**t) for t in d.get("thresholds", [])],
        gradient=[builder.GradientItem(**t) for t in d.get("gradient", [])],
    )
    return g.to_json_string(indent=1) + "\n"


def check_overlay(src: Path, tmp_path: Path, scores: dict | None = None) -> tuple[dict, dict, object, object]:
    m = load_onnx(src)
    graph = build_layer_graph(m, model_name=src.stem)
    plan = make_plan(graph, metric="euclidean", target=0.25, mode="merge", fuse="mean")
    log = apply_plan(m, graph, plan).log
    out = tmp_path / f"{src.stem}.me.json"
    written = write_report(out, graph, plan, log, scores=scores, format="model-explorer", original_onnx=src)
    assert written[0] == out
    text = out.read_text()
    assert text == rebuilt(text)
    from model_explorer import config

    config().add_node_data_from_path(str(out))  # Model Explorer's API accepts the file
    fate = json.loads(text)
    ids = {n.name or f"<node_{i}>" for i, n in enumerate(m.graph.node)}
    assert fate["results"] and set(fate["results"]) <= ids
    score = json.loads(written[1].read_text()) if len(written) > 1 else None
    return fate, score, graph, plan


def removed_keys(src: Path, graph, plan) -> set[str]:
    """Keys of every node inside the ONNX blocks the plan removed (found from lfgraph's
    ONNX structure, independently of the overlay code's block matching)."""
    m = load_onnx(src)
    st = analyze_onnx(m)
    by_name = {b.name: b for b in st.blocks}
    keys = set()
    for name in plan.absorbed:
        for i in by_name[name].nodes:
            n = st.nodes[i]
            keys.add(n.name or f"<node_{i}>")
    return keys


def test_named_onnx_model(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    onnx.save(residual_mlp(blocks=4), src)
    graph = build_layer_graph(load_onnx(src))
    scores = {"block_influence": {b.name: float(b.index + 1) for b in graph.blocks}}
    fate, score, graph, plan = check_overlay(src, tmp_path, scores)
    gone = removed_keys(src, graph, plan)
    assert gone and {k for k, v in fate["results"].items() if v["value"] == FATES["removed"][0]} == gone
    assert all(fate["results"][k]["bgColor"] == FATES["removed"][1] for k in gone)
    # removed nodes carry their block's score in the score overlay
    block_of = {}
    st = analyze_onnx(load_onnx(src))
    for b in st.blocks:
        for i in b.nodes:
            block_of[st.nodes[i].name or f"<node_{i}>"] = b.name
    assert score is not None
    for k in gone:
        assert score["results"][k]["value"] == scores["block_influence"][block_of[k]]


@pytest.mark.skipif(not LIGHT_RESNET50.is_file(), reason="the onnx package has no light ResNet-50 test model")
def test_light_resnet50_unnamed_nodes_are_keyed_as_model_explorer_names_them(tmp_path: Path) -> None:
    fate, _, graph, plan = check_overlay(LIGHT_RESNET50, tmp_path)
    m = onnx.load(LIGHT_RESNET50)
    assert len(fate["results"]) == len(m.graph.node)  # every node has an id, named or not
    gone = removed_keys(LIGHT_RESNET50, graph, plan)
    assert gone and all(fate["results"][k]["value"] == FATES["removed"][0] for k in gone)


@pytest.mark.slow
def test_pytorch_model_overlay_is_keyed_by_its_cached_onnx_export(tmp_path: Path, tiny_llama_folder: Path) -> None:
    """A PyTorch source: the command line exports the original once (lfgraph's cache) and
    keys the overlay by that export's nodes; removed blocks' nodes are all marked removed."""
    import argparse

    from lfgraph.pipeline import load, plan_model, rewrite, trace
    from lfgraph.sources import TorchSource
    from lfgraph.visualize.command import add_subcommand, run

    model = load(str(tiny_llama_folder))
    graph = trace(model)
    plan = plan_model(model, graph, 0.34, select="similarity", fuse="aligned-mean", metric="euclidean", progress=False)
    plan.save(tmp_path / "plan.json")
    (tmp_path / "rewrite.json").write_text(rewrite(model, graph, plan, progress=False).log.to_json())
    p = argparse.ArgumentParser()
    add_subcommand(p.add_subparsers(dest="command"))
    out = tmp_path / "me.json"
    args = ["visualize", str(tiny_llama_folder), str(tmp_path), "-o", str(out), "--format", "model-explorer", "--no-heatmaps"]
    assert run(p.parse_args(args)) == 0
    text = out.read_text()
    assert text == rebuilt(text)
    m = load_onnx(TorchSource(model).original_file())  # cached: the file the overlay was made for
    ids = {n.name or f"<node_{i}>" for i, n in enumerate(m.graph.node)}
    fate = json.loads(text)["results"]
    assert set(fate) <= ids
    gone = removed_keys(TorchSource(model).original_file(), graph, plan)
    assert gone and {k for k, v in fate.items() if v["value"] == FATES["removed"][0]} == gone
