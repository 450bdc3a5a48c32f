#!/usr/bin/env python
"""Make the report pages and PNG screenshots in docs/ (headless Chromium via Selenium).

    python tools/visualize_docs.py smollm2 cnn resnet50 [--out docs]

- ``smollm2``: SmolLM2-135M, 25 % of blocks merged: Block Influence selection, fuse
  ``remove`` (lfgraph.pipeline's load/trace/plan_model/rewrite), angular and BI scores.
- ``smollm2-calibrated``: the same plan with fuse ``calibrated`` (kept blocks refitted on
  4 x 128 calibration tokens).
- ``cnn``: lfgraph_study.zoo.ResNetCNN (random weights, stages (16, 3), (32, 3)), Block Influence
  on random images, fuse ``mean``, then healed: 80 steps of distillation from the original
  (the loss curve on the page).
- ``resnet50``: the onnx package's light ResNet-50 (weights are placeholders, so the
  distances are all equal), weight-similarity plan, ONNX rewrite.

Each page is written to OUT/<name>.html (not committed) and screenshotted to OUT/<name>.png
with the first merged block expanded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from lfgraph.visualize import write_report
from lfgraph.visualize.browser import console_errors, headless, open_page, screenshot


def smollm2(out: Path, fuse: str = "remove") -> Path:
    from lfgraph.passes.analysis import analyze
    from lfgraph.pipeline import calibration_tokens, load, plan_model, rewrite, trace
    from lfgraph.visualize.scores import selection_scores

    model = load("smollm2")
    graph = trace(model)
    cal = calibration_tokens(model, 4, 128)
    plan = plan_model(model, graph, 0.25, select="block_influence", fuse=fuse, calibration=cal, progress=False)
    result = rewrite(model, graph, plan, calibration=cal if fuse == "calibrated" else None, progress=False)
    scores = selection_scores(model.module, graph, cal)
    analysis = analyze(graph, "euclidean")
    path = out / ("smollm2.html" if fuse == "remove" else f"smollm2-{fuse}.html")
    write_report(path, graph, plan, result.log, analysis=analysis, scores=scores,
                 title=f"SmolLM2-135M: 25 % of blocks removed (Block Influence, fuse {fuse})")
    return path


def smollm2_calibrated(out: Path) -> Path:
    return smollm2(out, "calibrated")


def cnn(out: Path) -> Path:
    from lfgraph.frontends.torch_fx import build_layer_graph
    from lfgraph.passes.analysis import analyze
    from lfgraph.passes.rewrite_torch import apply_plan
    from lfgraph.passes.selection import runs_to_plan, select_runs
    from lfgraph_study.loops.loop import retrain
    from lfgraph.retrain.objectives import OBJECTIVES
    from lfgraph.visualize.scores import selection_scores
    from lfgraph_study.zoo import ResNetCNN, randomize_batchnorm

    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetCNN(stages=((16, 3), (32, 3)), num_classes=10)).eval()
    x = torch.randn(32, 3, 32, 32)
    graph = build_layer_graph(model, (x[:2],), model_name="ResNetCNN")
    blocks = [b.name for b in graph.removable_blocks()]
    runs = select_runs("block_influence", model, blocks, x, 2)
    plan = runs_to_plan(runs, "blocks", fuse="mean", align=True, provenance={"select": "block_influence", "model": "ResNetCNN"})
    result = apply_plan(model, graph, plan)
    # heal: distil the merged model from the original for a few steps, recording the loss
    curve: list[tuple[int, float]] = []

    def recording(student: torch.nn.Module, batch: torch.Tensor, teacher: torch.nn.Module) -> torch.Tensor:
        loss = OBJECTIVES["distill"](student, batch, teacher)
        curve.append((len(curve), float(loss.detach())))
        return loss

    retrain(result.model, [], data=[x[i:i + 8] for i in range(0, len(x), 8)], steps=80, objective=recording, teacher=model,
            lr=2e-3, progress=False)
    path = out / "cnn.html"
    write_report(path, graph, plan, result.log, analysis=analyze(graph, "bures"), scores=selection_scores(model, graph, x),
                 loss_curve=curve, title="ResNetCNN (lfgraph_study.zoo): 2 blocks merged (Block Influence, aligned mean), healed by distillation")
    return path


def resnet50(out: Path) -> Path:
    import onnx

    from lfgraph.frontends.onnx_graph import build_layer_graph, load_onnx
    from lfgraph.passes.analysis import analyze
    from lfgraph.passes.planner import make_plan
    from lfgraph.passes.rewrite_onnx import apply_plan

    src = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    m = load_onnx(src)
    graph = build_layer_graph(m, model_name="light_resnet50")
    analysis = analyze(graph, "euclidean")
    plan = make_plan(graph, metric="euclidean", target=0.25, mode="merge", fuse="mean", analysis=analysis)
    result = apply_plan(m, graph, plan)
    path = out / "resnet50.html"
    write_report(path, graph, plan, result.log, analysis=analysis,
                 title="light ResNet-50 (onnx package; placeholder weights): 25 % of blocks merged")
    return path


MAKERS = {"smollm2": smollm2, "smollm2-calibrated": smollm2_calibrated, "cnn": cnn, "resnet50": resnet50}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", choices=sorted(MAKERS))
    p.add_argument("--out", default="docs")
    p.add_argument("--width", type=int, default=1300)
    p.add_argument("--max-height", type=int, default=1700, help="CSS pixels of the page kept in the PNG")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    for name in args.models:
        t = time.perf_counter()
        page = MAKERS[name](out)
        with headless(width=args.width, height=900) as d:
            open_page(d, page)
            d.execute_script("var k = document.querySelector('.row.keeper[data-side=before] .head'); if (k) k.click();")
            errors = console_errors(d)
            if errors:
                print(f"{name}: console errors: {errors}", file=sys.stderr)
                return 1
            png = out / f"{name}.png"
            screenshot(d, png, max_height=args.max_height)
        print(f"{name}: {page}, {png} ({png.stat().st_size // 1024} kB) in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
