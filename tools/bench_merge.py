"""Benchmark: SmolLM2-135M held-out perplexity after a depth-reducing merge, per metric.

For each weight-similarity metric, plan a merge of ``--target`` of the decoder layers
(adjacent runs) and measure held-out perplexity with the paper's fusion rule (neuron-aligned
mean) and with plain deletion of the same blocks; beside them, deleting the same number of
layers with the lowest Block Influence (ShortGPT) and the calibrated refit. One run, one
table, ratios against the ShortGPT deletion.

    .venv/bin/python tools/bench_merge.py --target 0.25 --windows 16
"""

from __future__ import annotations

import argparse
import time

import torch

from lfgraph.calibration import calibration_windows, heldout_windows, perplexity
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.models import load_model
from lfgraph.passes.analysis import analyze
from lfgraph.passes.metrics import METRICS
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan
from lfgraph.passes.selection import runs_to_plan, select_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calibration-windows", type=int, default=16)
    ap.add_argument("--metrics", default=",".join(METRICS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2")
    graph = build_layer_graph(lm.module, lm.example_inputs, model_name=lm.name)
    held = heldout_windows(lm.tokenizer, args.windows, args.seq_len)
    cal = calibration_windows(lm.tokenizer, args.calibration_windows, 256)
    n_drop = max(1, round(args.target * len(graph.blocks)))
    rows: list[tuple[str, str, float, float]] = []

    def measure(label: str, rule: str, build) -> float:  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        model = build()
        secs = time.perf_counter() - t
        ppl = perplexity(model, held)
        rows.append((label, rule, ppl, secs))
        print(f"  {label:<28} {rule:<14} ppl {ppl:9.2f}   ({secs:.1f} s to compress)", flush=True)
        return ppl

    print(f"SmolLM2-135M, {len(graph.blocks)} decoder layers, removing {n_drop} ({args.target:.0%}); "
          f"held-out {args.windows} x {args.seq_len} tokens", flush=True)
    base = measure("original", "-", lambda: lm.module)
    blocks = [b.name for b in graph.blocks]
    container = blocks[0].rpartition(".")[0]
    bi_runs = select_runs("block_influence", lm.module, blocks, cal, n_drop)
    bi_remove = runs_to_plan(bi_runs, container, fuse="remove", provenance={"model_fingerprint": graph.fingerprint()})
    short = measure("ShortGPT (Block Influence)", "remove", lambda: apply_plan(lm.module, graph, bi_remove).model)
    bi_cal = runs_to_plan(bi_runs, container, fuse="calibrated", provenance={"model_fingerprint": graph.fingerprint()})
    measure("Block Influence", "calibrated", lambda: apply_plan(lm.module, graph, bi_cal, calibration=cal).model)
    for metric in args.metrics.split(","):
        t = time.perf_counter()
        analysis = analyze(graph, metric, scope="adjacent")
        print(f"  ({metric}: adjacent analysis {time.perf_counter() - t:.1f} s)", flush=True)
        for rule, align in (("mean", True), ("remove", False)):
            plan = make_plan(graph, metric=metric, target=args.target, scope="adjacent", mode="merge", fuse=rule, align=align, analysis=analysis)
            label = f"weights: {metric}"
            measure(label, "aligned-mean" if align else rule, lambda plan=plan: apply_plan(lm.module, graph, plan).model)

    print(f"\n{'selection':<28} {'fusion':<14} {'perplexity':>10} {'vs ShortGPT':>12} {'compress s':>11}")
    for label, rule, ppl, secs in rows:
        print(f"{label:<28} {rule:<14} {ppl:10.2f} {ppl / short:11.2f}x {secs:11.1f}")
    print(f"\noriginal perplexity {base:.2f}; ShortGPT deletion {short:.2f}")


if __name__ == "__main__":
    main()
