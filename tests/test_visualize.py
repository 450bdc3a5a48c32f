"""The rewrite viewer: well-formed SVG, one element per block before and after, removed
blocks marked, tie sets coloured alike, PNG output, user errors, the command line."""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from lfgraph.errors import LfgraphError
from lfgraph.graph import Block, LayerGraph, LayerNode
from lfgraph.passes.base import RewriteLog
from lfgraph.passes.planner import make_plan
from lfgraph.plan import Fusion, FusionPlan
from lfgraph.visualize import _chip_labels, load_log, main, render_rewrite

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")


def toy_graph(n_blocks: int = 6, seed: int = 0) -> LayerGraph:
    """A decoder-like stack: a projection in front, ``n_blocks`` blocks of four layers, a head."""
    rng = np.random.default_rng(seed)
    nodes: list[LayerNode] = []
    blocks: list[Block] = []

    def add(name: str, role: str, block: int | None) -> None:
        w = rng.standard_normal((8, 8)).astype(np.float32)
        nodes.append(LayerNode(name, "linear", role, w, None, block, len(nodes), ref=name))

    add("m.embed_proj", "embed_proj", None)
    for b in range(n_blocks):
        for role in ROLES:
            add(f"m.layers.{b}.{role}", role, b)
        blocks.append(Block(b, f"m.layers.{b}", [f"m.layers.{b}.{r}" for r in ROLES], "identity", kind="decoder"))
    add("m.lm_head", "lm_head", None)
    return LayerGraph(nodes, blocks, source="test", model_name="toy", total_params=sum(n.num_params for n in nodes))


def merge_log(plan: FusionPlan) -> RewriteLog:
    """What the torch merge pass records for ``plan`` (permute, fuse, remove)."""
    log = RewriteLog()
    for f in plan.fusions:
        for a in f.absorb:
            log.add("merge", "permute", a, [f.keep], units=32, moved=30)
        log.add("merge", "fuse", f.keep, [f.keep, *f.absorb], rule="mean", aligned=True)
        for a in f.absorb:
            log.add("merge", "remove", a, [f.keep], fuse="mean")
    return log


def svg_of(path: Path) -> ET.Element:
    text = path.read_text(encoding="utf-8")
    match = re.search(r"<svg\b.*?</svg>", text, re.S)
    assert match, "no <svg> element in the page"
    return ET.fromstring(match.group(0))


def groups(svg: ET.Element, *classes: str) -> list[ET.Element]:
    ns = "{http://www.w3.org/2000/svg}"
    return [g for g in svg.iter(f"{ns}g") if set(classes) <= set(g.get("class", "").split())]


@pytest.fixture(scope="module")
def graph() -> LayerGraph:
    return toy_graph()


@pytest.fixture(scope="module")
def merge_plan(graph: LayerGraph) -> FusionPlan:
    return make_plan(graph, metric="euclidean", target=0.34, mode="merge")


@pytest.fixture(scope="module")
def tie_plan(graph: LayerGraph) -> FusionPlan:
    return make_plan(graph, metric="euclidean", target=0.3, target_kind="params", mode="tie", scope="global")


def tie_log(plan: FusionPlan) -> RewriteLog:
    log = RewriteLog()
    for f in plan.fusions:
        for a in f.absorb:
            log.add("tie", "tie", a, [f.keep], params_saved=64)
    return log


def test_merge_page_has_one_element_per_block_and_marks_the_removed(tmp_path: Path, graph: LayerGraph, merge_plan: FusionPlan) -> None:
    out = tmp_path / "view.html"
    render_rewrite(graph, merge_plan, merge_log(merge_plan), out)
    svg = svg_of(out)
    before, after = groups(svg, "block", "before"), groups(svg, "block", "after")
    absorbed = set(merge_plan.absorbed)
    assert len(absorbed) == 2
    assert [g.get("data-name") for g in before] == [b.name for b in graph.blocks]
    assert [g.get("data-name") for g in after] == [b.name for b in graph.blocks if b.name not in absorbed]
    removed = {g.get("data-name") for g in before if "removed" in g.get("class", "").split()}
    assert removed == absorbed
    assert all(g.get("data-removed") == "true" for g in before if g.get("data-name") in absorbed)
    assert not groups(svg, "block", "after", "removed")
    # every absorbed block has an arrow into its keeper; kept blocks go straight across
    keeper = {a: f.keep for f in merge_plan.fusions for a in f.absorb}
    arrows = {g.get("data-from"): g.get("data-to") for g in groups(svg, "link", "absorbed")}
    assert arrows == keeper
    # the layers outside blocks appear in both columns
    assert len(groups(svg, "layer-row", "before")) == len(groups(svg, "layer-row", "after")) == 2


def test_header_counts_and_marks(tmp_path: Path, graph: LayerGraph, merge_plan: FusionPlan) -> None:
    out = tmp_path / "view.html"
    render_rewrite(graph, merge_plan, merge_log(merge_plan), out, title="toy merge")
    text = out.read_text(encoding="utf-8")
    saved = merge_plan.provenance["params_saved"]
    assert "toy merge" in text
    assert "blocks 6 → 4" in text
    assert f"−{saved:,}" in text
    assert "⇄30/32" in text  # the permute detail on each absorbed block
    assert f"⊕{len(merge_plan.fusions[0].absorb) + 1}" in text  # kept blocks say how many blocks they hold
    assert f"score {merge_plan.fusions[0].score:.4g}" in text  # the plan's score in the hover text


def test_tie_sets_share_a_colour(tmp_path: Path, graph: LayerGraph, tie_plan: FusionPlan) -> None:
    out = tmp_path / "tie.html"
    render_rewrite(graph, tie_plan, tie_log(tie_plan), out)
    svg = svg_of(out)
    ns = "{http://www.w3.org/2000/svg}"
    fill_of: dict[str, str] = {}
    sets: dict[str, set[str]] = {}
    for chip in groups(svg, "chip", "tied"):
        rect = chip.find(f"{ns}rect")
        assert rect is not None
        fill_of[chip.get("data-layer")] = rect.get("fill")
        sets.setdefault(chip.get("data-tieset"), set()).add(chip.get("data-layer"))
    assert len(sets) == len(tie_plan.fusions)
    for f in tie_plan.fusions:
        members = {f.keep, *f.absorb}
        assert members in sets.values()
        assert len({fill_of[m] for m in members}) == 1, f"tie set of {f.keep} has several colours"
    # different sets get different colours while the palette lasts
    assert len({fill_of[f.keep] for f in tie_plan.fusions}) == len(tie_plan.fusions)
    # untied layers and the "before" column stay neutral
    assert not [c for c in groups(svg, "chip") if c.get("data-tieset") and c.get("data-layer") not in fill_of]
    lanes = groups(svg, "tie-lane")
    assert len(lanes) == len(tie_plan.fusions)
    assert all(not g.get("data-removed") == "true" for g in groups(svg, "block"))


def test_refit_and_plan_only(tmp_path: Path, graph: LayerGraph) -> None:
    plan = FusionPlan([Fusion("m.layers.1", ["m.layers.2"], score=0.5)], mode="merge", fuse="calibrated")
    log = RewriteLog()
    log.add("calibrated", "refit", "m.layers.1.mlp.down_proj", ["m.layers.1", "m.layers.2"],
            relative_error_before=0.4, relative_error_after=0.1, strength=0.01)
    log.add("calibrated", "remove", "m.layers.2", ["m.layers.1"], reason="absorbed by calibrated fit")
    out = tmp_path / "refit.html"
    render_rewrite(graph, plan, log, out)
    svg = svg_of(out)
    refit_chips = groups(svg, "chip", "refit")
    assert [c.get("data-layer") for c in refit_chips] == ["m.layers.1.mlp.down_proj"]
    assert "relative error 0.4 → 0.1" in out.read_text(encoding="utf-8")
    # without a log the plan is drawn, and the page says so
    render_rewrite(graph, plan, None, out)
    assert [g.get("data-name") for g in groups(svg_of(out), "block", "before", "removed")] == ["m.layers.2"]
    assert "no rewrite log given" in out.read_text(encoding="utf-8")


def test_page_is_self_contained(tmp_path: Path, graph: LayerGraph, merge_plan: FusionPlan) -> None:
    out = tmp_path / "view.html"
    render_rewrite(graph, merge_plan, merge_log(merge_plan), out)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    urls = set(re.findall(r"https?://[^\s\"'<>]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}
    assert "<link" not in text and "src=" not in text


def test_log_file_round_trip_draws_the_same(tmp_path: Path, graph: LayerGraph, merge_plan: FusionPlan) -> None:
    log = merge_log(merge_plan)
    (tmp_path / "rewrite.json").write_text(log.to_json(), encoding="utf-8")
    render_rewrite(graph, merge_plan, log, tmp_path / "a.html")
    render_rewrite(graph, FusionPlan.from_json(merge_plan.to_json()), load_log(tmp_path / "rewrite.json"), tmp_path / "b.html")
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()


def test_png_is_a_real_image(tmp_path: Path, graph: LayerGraph, tie_plan: FusionPlan) -> None:
    out = tmp_path / "tie.png"
    render_rewrite(graph, tie_plan, tie_log(tie_plan), out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 600 and height > 400
    assert len(data) > 20_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tie.png"]


def test_user_errors(tmp_path: Path, graph: LayerGraph, merge_plan: FusionPlan) -> None:
    foreign = RewriteLog()
    foreign.add("merge", "remove", "other.layers.9", ["other.layers.8"])
    with pytest.raises(LfgraphError, match="another model"):
        render_rewrite(graph, merge_plan, foreign, tmp_path / "x.html")
    wrong_plan = FusionPlan([Fusion("m.layers.0.mlp.up_proj", ["nope.mlp.up_proj"], unit="layer")], mode="tie")
    with pytest.raises(LfgraphError, match="does not have"):
        render_rewrite(graph, wrong_plan, None, tmp_path / "x.html")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for name in ("x.html", "x.png"):
        with pytest.raises(LfgraphError):
            render_rewrite(graph, merge_plan, merge_log(merge_plan), blocker / name)
    with pytest.raises(LfgraphError, match="does not exist"):
        render_rewrite(graph, merge_plan, None, tmp_path / "missing-folder" / "x.html")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LfgraphError, match="not a rewrite log"):
        load_log(tmp_path / "bad.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bad.json"]


def test_chip_labels_are_short_and_distinct() -> None:
    bert = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense"]
    labels = _chip_labels(bert)
    assert labels["attention.self.query"] == "q"
    assert len(set(labels.values())) == len(bert)
    assert all(len(v) <= 8 for v in labels.values())
    llama = [f"{p}.{r}_proj" for p, rs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for r in rs]
    assert list(_chip_labels(llama).values()) == ["q", "k", "v", "o", "gate", "up", "down"]


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "use --demo" in capsys.readouterr().err
    assert main(["--demo", "--plan", "p.json", "-o", str(tmp_path / "d.html")]) == 2
    out = tmp_path / "demo.html"
    assert main(["--demo", "--mode", "merge", "--layers", "4", "-o", str(out)]) == 0
    svg = svg_of(out)
    assert len(groups(svg, "block", "before")) == 4
    assert len(groups(svg, "block", "after")) == 3
