"""``lfgraph generate``: sample text from the deploy folder beside the original's."""

from __future__ import annotations

import argparse

import pytest

from lfgraph import pipeline
from lfgraph.deploy.cli import add_subcommand, run, sample_texts
from lfgraph.deploy.folder import write_deploy_folder
from lfgraph.errors import LfgraphError

from deploy_helpers import remove_plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfgraph")
    add_subcommand(p.add_subparsers(dest="command", required=True))
    return p


@pytest.fixture(scope="module")
def folder(gqa_loaded, tmp_path_factory):
    model, graph = gqa_loaded
    hf = pipeline.rewrite(model, graph, remove_plan(graph, [2])).model.model
    out = tmp_path_factory.mktemp("gen") / "out"
    write_deploy_folder(hf, out, verify=False)
    return out, hf


@pytest.mark.slow
def test_generate_prints_original_and_compressed(folder, gqa_folder, capsys):
    out, _ = folder
    args = _parser().parse_args(["generate", str(out), "--prompt", "The quick brown fox", "--original", str(gqa_folder),
                                 "--max-new-tokens", "12", "--no-chat-template"])
    assert run(args) == 0
    text = capsys.readouterr().out
    assert "prompt: The quick brown fox" in text
    assert text.index("── original") < text.index("── compressed")


def test_both_runtimes_give_the_same_text_and_it_is_the_pytorch_text(folder):
    from transformers import AutoTokenizer

    from lfgraph.deploy.generation import torch_greedy

    out, hf = folder
    prompt = "Tied weights are stored"
    genai = sample_texts(out, [prompt], max_new_tokens=12, runtime="genai", chat=False)[0]["compressed"]
    ort = sample_texts(out, [prompt], max_new_tokens=12, runtime="ort", chat=False)[0]["compressed"]
    tok = AutoTokenizer.from_pretrained(out)
    want = tok.decode(torch_greedy(hf, tok(prompt).input_ids, 12), skip_special_tokens=True)
    assert genai == ort == want


def test_generate_refuses_a_folder_without_a_model(tmp_path):
    args = _parser().parse_args(["generate", str(tmp_path), "--prompt", "hi"])
    with pytest.raises(LfgraphError, match="no model.onnx"):
        run(args)
    with pytest.raises(SystemExit):  # options.COUNT: refused while parsing
        _parser().parse_args(["generate", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "0"])


def test_alternating_decode_speed_runs_every_model(folder):
    from lfgraph.deploy.generation import alternating_decode_speed

    out, _ = folder
    rows = alternating_decode_speed([out / "model.onnx", out / "model.onnx"], list(range(5, 21)), new_tokens=4, rounds=2, head_dim=16)
    assert len(rows) == 2 and all(ms > 0 and tps > 0 for ms, tps in rows)
