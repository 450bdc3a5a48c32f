"""A ResNet-style CNN made shallower: analyze → plan a merge → rewrite → ONNX → verify → view.

    python examples/01_cnn_merge.py          (about 20 s on a CPU)

Writes to examples/out/: cnn-analysis.png (distance heatmaps), cnn-merge.onnx (the
shallower network) and cnn-merge.html (what the rewrite did).

The weights are random (nothing is downloaded), so the merged network computes something
else than the original; on a trained network one retrains it (``lfgraph.retrain``). What
this example checks is the machinery: the rewrite removes the planned blocks and the ONNX
file computes exactly what the rewritten PyTorch model computes.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch

from lfgraph.export import export_onnx
from lfgraph.verify import verify_against_torch
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.passes.analysis import analyze
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan, unique_parameter_count
from lfgraph.pipeline import plan_summary
from lfgraph.visualize.plots import plot_analysis
from lfgraph.visualize import render_rewrite
from lfgraph_study.zoo import ResNetCNN, randomize_batchnorm

OUT = Path(__file__).resolve().parent / "out"
# the exporter's notes about optional torchvision ops and deprecations are noise here
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    # two stages of three basic blocks; the first block of stage 2 downsamples (projection
    # skip) and cannot be removed, the other five can
    model = randomize_batchnorm(ResNetCNN(stages=((16, 3), (32, 3))))
    images = torch.randn(2, 3, 32, 32)

    print("1. trace the model into a LayerGraph (torch.export)")
    graph = build_layer_graph(model, (images,), model_name="ResNetCNN")
    print(graph.summary())

    print("\n2. analyze: Bures distances between compatible layers, aggregated per block")
    analysis = analyze(graph, "bures")
    for score, a, b in analysis.ranked_block_pairs("adjacent")[:3]:
        print(f"   {score:.4f}  {a} ~ {b}")
    plot_analysis(analysis, OUT / "cnn-analysis.png")
    print(f"   heatmaps: {OUT / 'cnn-analysis.png'}")

    print("\n3. plan: merge a third of the blocks, averaging after neuron alignment")
    plan = make_plan(graph, metric="bures", target=0.34, mode="merge", fuse="mean", align=True, analysis=analysis)
    print(plan_summary(plan))

    print("\n4. rewrite the PyTorch model (the original is not modified)")
    result = apply_plan(model, graph, plan)
    compressed = result.model.eval()
    print(f"   blocks {len(model.blocks)} -> {len(compressed.blocks)}, parameters "
          f"{unique_parameter_count(model):,} -> {unique_parameter_count(compressed):,}; "
          f"log: {result.log.count('permute')} permute, {result.log.count('fuse')} fuse, {result.log.count('remove')} remove")
    with torch.no_grad():
        before, after = model(images), compressed(images)
    change = float((after - before).abs().max() / before.abs().max())
    print(f"   output change on random weights: {change:.3f} relative (retraining recovers it on a trained model)")

    print("\n5. export to ONNX and verify on ONNX Runtime with a new batch size")
    onnx_path = OUT / "cnn-merge.onnx"
    rep = export_onnx(compressed, (images,), onnx_path, ["images"], ["logits"], {"images": {0: "batch"}})
    print(f"   {onnx_path}: {rep.file_bytes / 1e3:.0f} kB in {rep.seconds:.1f} s")
    check = verify_against_torch(onnx_path, compressed, {"images": torch.randn(5, 3, 32, 32)})
    print("\n".join(check.lines()))

    print("\n6. draw what the rewrite did")
    view = OUT / "cnn-merge.html"
    render_rewrite(graph, plan, result.log, view, title="ResNetCNN: merge a third of the blocks")
    print(f"   {view}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
