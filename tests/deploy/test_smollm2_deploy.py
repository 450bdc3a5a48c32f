"""SmolLM2-135M compressed by 25% into a deploy folder that onnxruntime-genai generates from."""

from __future__ import annotations

import pytest

from lfgraph import pipeline
from lfgraph.deploy.cli import sample_texts
from lfgraph.deploy.folder import write_deploy_folder

pytestmark = pytest.mark.slow


def test_smollm2_deploy_folder_generates_on_genai(tmp_path):
    model = pipeline.load("smollm2")
    graph = pipeline.trace(model)
    calib = pipeline.calibration_tokens(model, n_windows=2, seq_len=64)
    plan = pipeline.plan_model(model, graph, 0.25, select="block_influence", fuse="remove", calibration=calib, progress=False)
    hf = pipeline.rewrite(model, graph, plan, progress=False).model.model
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = [int(t) for t in (prompt["input_ids"] if hasattr(prompt, "keys") else prompt)]
    report = write_deploy_folder(hf, tmp_path / "out", plan=plan, n_layers_before=30, prompt=prompt, new_tokens=32)
    assert report.generation.ok, str(report.generation)
    assert any("onnxruntime-genai" in c.name for c in report.generation.checks)
    assert hf.config.num_hidden_layers == 30 - len(plan.absorbed) == 22
    text = sample_texts(tmp_path / "out", ["What is the capital of France?"], max_new_tokens=16)[0]["compressed"]
    assert len(text.split()) >= 3
