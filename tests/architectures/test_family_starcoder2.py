"""StarCoder2 (lfgraph/architectures/families/starcoder2.py), the family added last: a tiny
random model through the checks every family goes through (tests/architectures/family_checks.py),
then ``lfgraph generate`` on the deploy folder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfgraph import architectures
from lfgraph.models import CausalLMLogits

from family_checks import check_calibrated_fusion_and_checkpoint, check_compress_cli
from tiny_families import tiny_model

#: 4 blocks, hidden 64, GQA; a sliding window longer than any test sequence (real StarCoder2: 4096)
CONFIG = ("Starcoder2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, sliding_window=128))


def test_detected_from_its_config_with_its_stack_and_projections(tmp_path):
    from transformers import Starcoder2Config

    arch = architectures.for_config(Starcoder2Config())
    assert arch is architectures.lookup("starcoder2") and arch.name == "starcoder2"
    assert (arch.block_kind(Starcoder2Config()), arch.genai_type, arch.no_onnx, arch.default_fuse) == ("pre-norm", "llama", None, None)

    hf = tiny_model(*CONFIG, tmp_path / "in")
    assert architectures.of_model(CausalLMLogits(hf)) is arch
    assert architectures.block_stack(CausalLMLogits(hf))[0] == arch.stack_path(CausalLMLogits(hf)) == "model.model.layers"
    block = arch.blocks(hf)[0]
    assert arch.mlp_target(block) == ("mlp.c_proj", None)
    mlp_out, attn_out = block.get_submodule(arch.mlp_out), block.get_submodule(arch.attn_out)
    assert isinstance(mlp_out, nn.Linear) and mlp_out.out_features == hf.config.hidden_size and mlp_out.bias is not None
    assert isinstance(attn_out, nn.Linear) and attn_out.out_features == hf.config.hidden_size


def test_calibrated_fusion_and_checkpoint(tmp_path):
    hf = tiny_model(*CONFIG, tmp_path / "in")
    check_calibrated_fusion_and_checkpoint("starcoder2", hf, tmp_path / "in", tmp_path / "out")


@pytest.mark.slow
def test_compress_cli_writes_a_deploy_folder_that_generates(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lfgraph.cli import main
    from lfgraph.deploy.cli import sample_texts
    from lfgraph.deploy.generation import torch_greedy

    tiny_model(*CONFIG, tmp_path / "in")
    out = tmp_path / "out"
    check_compress_cli("starcoder2", tmp_path / "in", out, capsys)

    prompt = "def fib(n):"
    genai = sample_texts(out, [prompt], max_new_tokens=12, runtime="genai", chat=False)[0]["compressed"]
    ort = sample_texts(out, [prompt], max_new_tokens=12, runtime="ort", chat=False)[0]["compressed"]
    tok = AutoTokenizer.from_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = tok.decode(torch_greedy(loaded, tok(prompt).input_ids, 12), skip_special_tokens=True)
    assert genai == ort == want and want
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", prompt, "--max-new-tokens", "8", "--no-chat-template"]) == 0
    assert "compressed" in capsys.readouterr().out
