"""An ONNX file from another exporter, compressed without its framework: the ONNX path.

    python examples/04_foreign_onnx.py [MODEL.onnx]      (about 20 s on a CPU)

By default it takes the ResNet-50 graph that the ``onnx`` package ships for its backend
tests (exported by another tool long ago; opset 9). Blocks are found from the graph's
structure alone (residual ``Add`` patterns, repeated subgraphs), not from names; the
rewrite edits the ONNX graph itself (an absorbed block's consumers are rewired to its
input), then ONNX Runtime runs both graphs.

Note: the weights of that test file are all one constant, so every distance is 0 and the
planner breaks the ties by name: it shows the mechanics, not a ranking. Give your own
``.onnx`` file for a real one. Writes examples/out/foreign-merged.onnx and foreign-merge.html.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

from lfgraph.errors import LfgraphError
from lfgraph.frontends.onnx_graph import build_layer_graph, load_onnx
from lfgraph.passes.analysis import analyze
from lfgraph.passes.planner import make_plan
from lfgraph.onnx_io import save_onnx
from lfgraph.passes.rewrite_onnx import apply_plan, make_inputs
from lfgraph.verify import verify_against_onnx
from lfgraph.pipeline import plan_summary
from lfgraph.visualize import render_rewrite

OUT = Path(__file__).resolve().parent / "out"
DEFAULT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"


def main(argv: list[str]) -> int:
    OUT.mkdir(exist_ok=True)
    source = Path(argv[0]) if argv else DEFAULT
    try:
        model = load_onnx(source)
    except LfgraphError as e:
        print(f"cannot use {source}: {e}", file=sys.stderr)
        return 2
    producer = f"{model.producer_name} {model.producer_version}".strip() or "unknown exporter"
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    print(f"{source.name}: {len(model.graph.node)} nodes, opset {opset}, written by {producer}")

    graph = build_layer_graph(model, model_name=source.stem)
    print(graph.summary())
    print("blocks (found from structure): " + ", ".join(f"{b.name} [{b.skip}]" for b in graph.blocks))

    analysis = analyze(graph, "euclidean")
    plan = make_plan(graph, metric="euclidean", target=0.25, mode="merge", fuse="mean", align=True,
                     scope="adjacent", analysis=analysis)
    print("\n" + plan_summary(plan))

    result = apply_plan(model, graph, plan)
    out = OUT / "foreign-merged.onnx"
    save_onnx(result.model, out)
    print(f"\nrewrite: {len(model.graph.node)} -> {len(result.model.graph.node)} nodes, "
          f"{result.log.count('remove')} blocks removed; written to {out}")

    # the merged network computes something else than the original: this run shows that the
    # edited graph is valid and runs, with the same outputs and shapes, and how far it moved
    report = verify_against_onnx(model, result.model, make_inputs(model, batch=2))
    for o in report.outputs:
        print(f"  {o.name}: runs on {report.provider}; change vs the original {o.max_rel:.3g} (relative)")
    runs = all(o.max_rel != float("inf") for o in report.outputs)

    view = OUT / "foreign-merge.html"
    render_rewrite(graph, plan, result.log, view, title=f"{source.name}: a quarter of the blocks merged (ONNX path)")
    print(f"view: {view}")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
