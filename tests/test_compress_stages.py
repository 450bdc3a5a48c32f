"""The stages other issues add to the one compress path, end to end through the CLI on a
tiny Llama: healing before export, the deploy folder, and the report page."""

from __future__ import annotations

import json

import pytest

from lfgraph.cli import main

PLAN = ["--target", "0.34", "--select", "similarity", "--fuse", "remove", "--quiet", "--eval-windows", "2", "--eval-seq-len", "32"]


@pytest.fixture(scope="module")
def deploy_run(tiny_llama_folder, tmp_path_factory):
    """One compress run with every stage on: heal, deploy folder, report page."""
    tmp = tmp_path_factory.mktemp("stages")
    out, page = tmp / "out", tmp / "page.html"
    code = main(["compress", str(tiny_llama_folder), "-o", str(out), *PLAN, "--heal", "6", "--heal-seq-len", "32",
                 "--heal-windows", "8", "--report", str(page)])
    return code, out, page


@pytest.mark.slow
def test_deploy_folder_is_written_checked_and_reloads(deploy_run, tiny_llama_folder):
    import torch
    from transformers import AutoModelForCausalLM

    code, out, _ = deploy_run
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model.onnx", "genai_config.json", "plan.json"} <= names
    assert not list(out.parent.glob(".out.*"))  # no staging left behind
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4  # 6 blocks, 2 removed
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert len(reloaded.model.layers) == 4
    ids = torch.arange(10)[None, :] % 50
    from lfgraph.deploy.generation import OrtDecoder

    ort_logits, _ = OrtDecoder(out / "model.onnx").prefill(ids.numpy())
    with torch.no_grad():
        want = reloaded(ids).logits.numpy()
    assert abs(ort_logits - want).max() / abs(want).max() < 1e-4


@pytest.mark.slow
def test_the_report_says_what_healing_did_and_checks_generation(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", str(tiny_llama_folder), "-o", str(out), *PLAN, "--heal", "4", "--heal-seq-len", "32", "--heal-windows", "8"]) == 0
    table = capsys.readouterr().out
    assert "healed: 4 steps" in table
    assert "greedy 32 tokens on ORT == PyTorch" in table and "decode, ms/token" in table


def test_report_page_counts_match_the_plan(deploy_run):
    from lfgraph.visualize import read_page_data

    code, out, page = deploy_run
    data = read_page_data(page.read_text())
    plan = json.loads((out / "plan.json").read_text())
    removed = sum(len(f["absorb"]) for f in plan["fusions"])
    text = json.dumps(data)
    assert removed == 2 and all(b in text for f in plan["fusions"] for b in f["absorb"])
    assert "loss" in text  # the healing curve is on the page


def test_folder_output_is_for_language_models_only(tmp_path, capsys):
    import torch

    from lfgraph import pipeline
    import tiny_models as zoo
    from lfgraph.errors import LfgraphError
    from lfgraph.models import wrap_module

    cnn = wrap_module(zoo.ResNetCNN(stages=((8, 2),)), (torch.randn(1, 3, 16, 16),), family="vision")
    with pytest.raises(LfgraphError, match="causal language models only"):
        pipeline.compress(cnn, tmp_path / "folder", target=0.5, quiet=True)


def test_a_with_past_onnx_decoder_compresses_straight_from_the_graph(deploy_run, tmp_path, capsys):
    code, out, _ = deploy_run
    src = out / "model.onnx"
    before = src.read_bytes()
    again = tmp_path / "shallower"
    assert main(["compress", str(src), "--target", "0.25", "-o", str(again), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "(onnx decoder)" in table and "greedy tokens on ORT == onnxruntime-genai" in table
    genai = json.loads((again / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 3
    import onnx

    inputs = [i.name for i in onnx.load(str(again / "model.onnx"), load_external_data=False).graph.input]
    assert sum(n.startswith("past_key_values.") for n in inputs) == 2 * 3
    assert src.read_bytes() == before  # the input is never modified
