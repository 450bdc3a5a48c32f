"""Export to ONNX and ORT-vs-PyTorch parity after every rewrite; tied weights stored once."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from lfgraph.errors import LfgraphError
from lfgraph.export import export_onnx
from lfgraph.onnx_io import read_metadata
from lfgraph.verify import verify_against_torch
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.models import CausalLMLogits, EncoderHidden
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan, unique_parameter_count

import tiny_models as zoo

G = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 128, (1, 8), generator=G)
LM_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}

MODELS = {
    "cnn": (lambda: zoo.randomize_batchnorm(zoo.ResNetCNN(stages=((8, 3),))), "image"),
    "llama": (lambda: CausalLMLogits(zoo.tiny_llama(layers=4)), "tokens"),
    "gpt2": (lambda: CausalLMLogits(zoo.tiny_gpt2(layers=4)), "tokens"),
    "bert": (lambda: EncoderHidden(zoo.tiny_bert(layers=4)), "tokens"),
}


def _export_and_verify(model, kind, path, plan=None):
    if kind == "image":
        args, names, axes = (torch.randn(1, 3, 16, 16, generator=G),), ["input"], {"input": {0: "batch"}}
        check = {"input": torch.randn(3, 3, 16, 16, generator=G)}
    else:
        args, names, axes = (IDS, torch.ones_like(IDS)), ["input_ids", "attention_mask"], LM_AXES
        ids = torch.randint(0, 128, (2, 13), generator=G)  # another batch size and length
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # padding: positions that attend to nothing are not compared
        check = {"input_ids": ids, "attention_mask": mask}
    meta = {"lfgraph.plan": plan.to_json()} if plan else None
    report = export_onnx(model, args, path, names, ["output"], axes, meta)
    return report, verify_against_torch(path, model, check)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["tie", "merge"])
def test_rewritten_model_matches_pytorch_on_ort(name, mode, tmp_path):
    build, kind = MODELS[name]
    model = build()
    x = (torch.randn(1, 3, 16, 16),) if kind == "image" else (IDS,)
    g = build_layer_graph(model, x)
    if mode == "tie":
        plan = make_plan(g, target=0.15, target_kind="params", scope="global", mode="tie")
    else:
        plan = make_plan(g, target=0.3, mode="merge")
    rewritten = apply_plan(model, g, plan).model
    report, verify = _export_and_verify(rewritten, kind, tmp_path / "m.onnx", plan)
    assert verify.ok, verify.lines()
    assert verify.max_rel <= 1e-4
    assert read_metadata(report.path)["lfgraph.plan"] == plan.to_json()
    onnx.checker.check_model(onnx.load(str(report.path)), full_check=True)


@pytest.mark.slow
def test_tied_weights_are_stored_once(tmp_path):
    model = CausalLMLogits(zoo.tiny_llama(layers=6, hidden=96))
    g = build_layer_graph(model, (IDS,))
    plan = make_plan(g, target=0.3, target_kind="params", scope="global", mode="tie")
    tied = apply_plan(model, g, plan).model
    orig_report, _ = _export_and_verify(model, "tokens", tmp_path / "orig.onnx")
    tied_report, verify = _export_and_verify(tied, "tokens", tmp_path / "tied.onnx")
    assert verify.ok
    # the file holds the unique parameters once, plus a graph of a few tens of kB (initializers
    # with equal contents, like freshly initialised norm weights, are merged too)
    for report, module in ((orig_report, model), (tied_report, tied)):
        unique_bytes = unique_parameter_count(module) * 4
        assert unique_bytes * 0.98 <= report.initializer_bytes <= unique_bytes * 1.02 + 4096
        assert report.file_bytes - report.initializer_bytes < 200_000
    saved_bytes = plan.provenance["params_saved"] * 4
    assert orig_report.file_bytes - tied_report.file_bytes == pytest.approx(saved_bytes, rel=0.02)


def test_export_failure_leaves_existing_file_untouched(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("an op without an ONNX translation")

    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(LfgraphError, match="ONNX export"):
        export_onnx(Broken(), (torch.randn(2, 3),), target, ["x"], ["y"], {"x": {0: "batch"}})
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_verify_reports_a_wrong_model(tmp_path):
    model = zoo.MLP()
    path = tmp_path / "mlp.onnx"
    export_onnx(model, (torch.randn(2, 16),), path, ["input"], ["output"], {"input": {0: "batch"}})
    other = zoo.MLP()
    with torch.no_grad():
        other.net[0].weight.add_(0.5)
    report = verify_against_torch(path, other, {"input": torch.randn(3, 16)})
    assert not report.ok and "✗" in report.lines()[0]
