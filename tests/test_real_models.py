"""The real models that ship in PyPI packages: SmolLM2-135M (LLaMA) and all-MiniLM-L6-v2 (BERT)."""

from __future__ import annotations

import pytest
import torch

from lfgraph.export import export_onnx
from lfgraph.verify import verify_against_torch
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.models import load_model
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan, unique_parameter_count
from lfgraph.model_types import model_type

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    lm = load_model("smollm2")
    return lm, build_layer_graph(lm.module, lm.example_inputs, model_name=lm.name)


def test_smollm2_graph(smollm2):
    lm, g = smollm2
    assert len(g.blocks) == 30 and all(b.skip == "identity" for b in g.blocks)
    groups = g.groups()
    assert len(groups) == 7 and all(len(v) == 30 for v in groups.values())
    assert "linear:mlp.down_proj:576x1536" in groups
    assert all(b.hidden and b.hidden[0].size == 1536 for b in g.blocks)
    assert 134_000_000 < unique_parameter_count(lm.module) < 136_000_000


def test_smollm2_merge_quarter_of_layers(smollm2):
    lm, g = smollm2
    plan = make_plan(g, metric="bures", target=0.25, scope="adjacent", mode="merge")
    merged = apply_plan(lm.module, g, plan).model
    assert len(merged.model.model.layers) == 22
    ids = lm.tokenizer("Layer fusion merges similar layers.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = merged(ids)
    assert logits.shape == (1, ids.shape[1], lm.hf_model.config.vocab_size) and torch.isfinite(logits).all()


def test_minilm_tie_exports_and_matches_on_ort(tmp_path):
    lm = load_model("minilm")
    g = build_layer_graph(lm.module, lm.example_inputs, model_name=lm.name)
    assert len(g.blocks) == 6
    plan = make_plan(g, metric="ca", target=0.2, target_kind="params", scope="global", mode="tie")
    tied = apply_plan(lm.module, g, plan).model
    kind = model_type(lm)
    report = export_onnx(tied, kind.export_args(), tmp_path / "minilm.onnx", kind.input_names, kind.output_names, kind.dynamic_axes())
    assert report.initializer_bytes <= unique_parameter_count(tied) * 4 * 1.01
    check = verify_against_torch(report.path, tied, kind.verification_inputs())
    assert check.ok, check.lines()
