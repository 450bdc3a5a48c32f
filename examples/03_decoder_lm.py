"""A Llama-style decoder made shallower, exported with dynamic batch and sequence axes.

    python examples/03_decoder_lm.py         (about 30 s on a CPU)

Plans the merge of a quarter of the decoder layers (adjacent, most alike first), averages
each merged pair after aligning the MLP's hidden units, removes the absorbed layers (the
Hugging Face config and the per-layer KV-cache indices follow), exports
``(input_ids, attention_mask) -> logits`` to ONNX and checks it on another batch size and
length, with padding. Writes examples/out/llama-merge.onnx and llama-merge.html.
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
from lfgraph.models import CausalLMLogits
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan, unique_parameter_count
from lfgraph.pipeline import plan_summary
from lfgraph.visualize import render_rewrite
from lfgraph_study.zoo import tiny_llama

OUT = Path(__file__).resolve().parent / "out"
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    # (input_ids, attention_mask) -> logits without a KV cache, so that it can be traced
    model = CausalLMLogits(tiny_llama(layers=8, hidden=64)).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    graph = build_layer_graph(model, (ids, mask), model_name="tiny-Llama-8")
    print(graph.summary())

    plan = make_plan(graph, metric="bures", target=0.25, mode="merge", fuse="mean", align=True, scope="adjacent")
    print("\n" + plan_summary(plan))

    result = apply_plan(model, graph, plan)
    merged = result.model.eval()
    cfg = merged.model.config
    moved = [f"{r.target}: {r.detail['moved']}/{r.detail['units']} units" for r in result.log.records if r.action == "permute"]
    print(f"\nrewrite: decoder layers {len(model.model.model.layers)} -> {len(merged.model.model.layers)} "
          f"(config.num_hidden_layers = {cfg.num_hidden_layers}), unique parameters "
          f"{unique_parameter_count(model):,} -> {unique_parameter_count(merged):,}")
    print("  aligned before averaging: " + "; ".join(moved))

    onnx_path = OUT / "llama-merge.onnx"
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    rep = export_onnx(merged, (ids, mask), onnx_path, ["input_ids", "attention_mask"], ["logits"], axes,
                      metadata={"lfgraph.plan": plan.to_json()})
    print(f"export: {onnx_path} {rep.file_bytes / 1e6:.2f} MB (the plan is stored in its metadata)")

    # batch 3, length 9 (the export used 1 x 12); the last row is right-padded
    check_ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    check_mask = torch.ones_like(check_ids)
    check_mask[2, 5:] = 0
    check = verify_against_torch(onnx_path, merged, {"input_ids": check_ids, "attention_mask": check_mask})
    print("\n".join(check.lines()))

    view = OUT / "llama-merge.html"
    render_rewrite(graph, plan, result.log, view, title="tiny Llama: a quarter of the decoder layers merged")
    print(f"view: {view}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
