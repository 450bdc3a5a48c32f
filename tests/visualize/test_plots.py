"""Analysis plots: a real PNG, written atomically, and clear errors."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from lfgraph.errors import LfgraphError
from lfgraph.graph import Block, LayerGraph, LayerNode
from lfgraph.passes.analysis import Analysis, GroupAnalysis, analyze
from lfgraph.visualize.plots import _layer_labels, plot_analysis


def toy_graph(n_blocks: int) -> LayerGraph:
    """``n_blocks`` blocks of three 8x8 layers (three compatible groups)."""
    rng = np.random.default_rng(0)
    nodes, blocks = [], []
    for b in range(n_blocks):
        names = [f"m.layers.{b}.{r}" for r in ("q", "k", "down")]
        for name in names:
            nodes.append(LayerNode(name, "linear", name.split(".")[-1], rng.standard_normal((8, 8)).astype(np.float32), None, b, len(nodes)))
        blocks.append(Block(b, f"m.layers.{b}", names, kind="decoder"))
    return LayerGraph(nodes, blocks, source="test", model_name="toy", total_params=64 * len(nodes))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    return analyze(toy_graph(n_blocks=5), "euclidean")


def test_writes_a_png_with_blocks_and_groups(tmp_path: Path, analysis: Analysis) -> None:
    out = tmp_path / "analysis.png"
    plot_analysis(analysis, out)
    width, height = png_size(out)
    assert width > 800 and height > 600
    assert out.stat().st_size > 30_000
    assert [p.name for p in tmp_path.iterdir()] == ["analysis.png"]
    # with the graph, ticks name blocks even when layer names do not start with block names
    graph = toy_graph(n_blocks=5)
    plot_analysis(analysis, tmp_path / "with-graph.svg", graph=graph)
    svg = (tmp_path / "with-graph.svg").read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    group = next(iter(analysis.groups.values()))
    assert _layer_labels(group, [], graph) == (["0", "1", "2", "3", "4"], "block")
    assert _layer_labels(group, [], None) == (["0", "1", "2", "3", "4"], "layer # in group")


def test_groups_without_blocks_and_incompatible_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    d = rng.random((5, 5))
    d = d + d.T
    np.fill_diagonal(d, 0.0)
    flat = Analysis("bures", {"linear:net.*:8x8": GroupAnalysis("linear:net.*:8x8", [f"net.{i}" for i in range(5)], "fully-connected", d)})
    plot_analysis(flat, tmp_path / "flat.png")
    assert png_size(tmp_path / "flat.png")[0] > 200
    # a group of two has one distinct distance; blocks of another kind are NaN in the block matrix
    two = np.array([[0.0, 3.0], [3.0, 0.0]])
    blocks = np.array([[0.0, 1.0, np.nan], [1.0, 0.0, np.nan], [np.nan, np.nan, 0.0]])
    odd = Analysis("euclidean", {"conv:conv1:4x4x3x3": GroupAnalysis("conv:conv1:4x4x3x3", ["b.0.conv1", "b.1.conv1"], "convolutional", two)},
                   block_names=["b.0", "b.1", "b.2"], block_distances=blocks)
    plot_analysis(odd, tmp_path / "odd.png")
    assert png_size(tmp_path / "odd.png")[0] > 200


def test_failure_leaves_no_file(tmp_path: Path, analysis: Analysis, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(LfgraphError, match="cannot write"):
        plot_analysis(analysis, blocker / "analysis.png")
    with pytest.raises(LfgraphError, match="does not exist"):
        plot_analysis(analysis, tmp_path / "no-such-folder" / "analysis.png")
    # a failure half way through writing: the old file stays, no temporary file is left
    target = tmp_path / "analysis.png"
    target.write_bytes(b"previous")
    from matplotlib.figure import Figure

    def broken_savefig(self: Figure, fname: str, **kwargs: object) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(LfgraphError, match="No space left"):
        plot_analysis(analysis, target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "analysis.png"]


def test_user_errors(tmp_path: Path, analysis: Analysis, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LfgraphError, match="nothing to plot"):
        plot_analysis(Analysis("bures", {}), tmp_path / "empty.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(LfgraphError, match=r"pip install 'lfgraph\[viz\]'"):
        plot_analysis(analysis, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
