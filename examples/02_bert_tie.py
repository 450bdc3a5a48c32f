"""A BERT encoder with 30 % of its parameters shared: plan ties → rewrite → ONNX → verify → view.

    python examples/02_bert_tie.py           (about 30 s on a CPU)

Tying keeps the depth and makes similar layers (same role, same shape, anywhere in the
stack) share one weight, the mean of theirs. The exported ONNX file stores every shared
weight once, so the file shrinks with the parameter count. Writes examples/out/bert-tie.onnx
and bert-tie.html.
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
from lfgraph.models import EncoderHidden
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan, unique_parameter_count
from lfgraph.visualize import render_rewrite
from lfgraph_study.zoo import tiny_bert

OUT = Path(__file__).resolve().parent / "out"
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    # (input_ids, attention_mask) -> last hidden state, so that torch.export can trace it
    model = EncoderHidden(tiny_bert(layers=6, hidden=64)).eval()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    graph = build_layer_graph(model, (ids, mask), model_name="tiny-BERT-6")
    print(graph.summary())

    print("\nplan: tie layers until 30 % of all parameters are shared (most alike pairs first, any depth)")
    plan = make_plan(graph, metric="bures", target=0.3, target_kind="params", mode="tie", scope="global")
    for f in plan.fusions:
        print(f"  {len(f.absorb) + 1} x {graph.node(f.keep).role:<24} keep {f.keep}  (score {f.score:.3f})")
    saved = plan.provenance["params_saved"]
    print(f"  saves {saved:,} of {graph.total_params:,} parameters ({saved / graph.total_params:.1%})")

    result = apply_plan(model, graph, plan)
    tied = result.model.eval()
    before, after = unique_parameter_count(model), unique_parameter_count(tied)
    print(f"\nrewrite: {result.log.count('tie')} layers now share a weight; unique parameters {before:,} -> {after:,}")

    onnx_path = OUT / "bert-tie.onnx"
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    rep = export_onnx(tied, (ids, mask), onnx_path, ["input_ids", "attention_mask"], ["last_hidden_state"], axes)
    print(f"export: {onnx_path} {rep.file_bytes / 1e6:.2f} MB, {rep.deduplicated} duplicate initializers stored once")

    # another batch size and length than the export example, with padding in the second row
    g = torch.Generator().manual_seed(1)
    check_ids = torch.randint(0, 128, (2, 11), generator=g)
    check_mask = torch.ones_like(check_ids)
    check_mask[1, 7:] = 0
    check = verify_against_torch(onnx_path, tied, {"input_ids": check_ids, "attention_mask": check_mask})
    print("\n".join(check.lines()))

    view = OUT / "bert-tie.html"
    render_rewrite(graph, plan, result.log, view, title="tiny BERT: 30 % of the parameters tied")
    print(f"view: {view}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
