"""Every family in the architecture registry, on a tiny random model saved as a Hugging Face
folder (tests/architectures/tiny_families.py).

The checks themselves are in family_checks.py; a family added in its own module has its own
test file, test_family_NAME.py, that runs them on its tiny model.

Fast, per family: the registry finds the family and its stack; calibrated fusion of two
blocks runs (refit into the family's projection: dense, through the post-MLP norm, or into
every MoE expert) and lowers the fit error; the compressed checkpoint reloads in
transformers with no missing or unexpected weights and the same logits.

Slow, per family: ``lfgraph compress DIR --target 0.25 --fuse calibrated -o OUT/`` ends in a
deploy folder whose own checks pass (ONNX prefill = PyTorch, decode steps, greedy tokens on
ORT and onnxruntime-genai), checked again here from the files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfgraph import architectures
from lfgraph.cli import main
from lfgraph.errors import LfgraphError
from lfgraph.models import CausalLMLogits
from lfgraph.passes.calibrated_fusion import calibrated_merge

from cli_checks import one_line
from family_checks import calibration as _calibration, check_calibrated_fusion_and_checkpoint, check_compress_cli
from tiny_families import FAMILIES, tiny_family_model

CAUSAL = sorted(FAMILIES)
#: families added later, each in its own module with its own test file (test_family_NAME.py)
OWN_TEST_FILES = {p.stem.removeprefix("test_family_") for p in Path(__file__).parent.glob("test_family_*.py")}


def test_every_family_is_registered_and_tested():
    assert set(CAUSAL) <= set(architectures.ARCHITECTURES) and not set(CAUSAL) & OWN_TEST_FILES
    # the encoder is tested in tests/test_pipeline.py; every other family here or in its own file
    assert set(architectures.ARCHITECTURES) - set(CAUSAL) - OWN_TEST_FILES == {"bert"}
    assert OWN_TEST_FILES <= set(architectures.ARCHITECTURES)


def test_every_module_in_the_families_folder_is_imported_and_registers():
    """A family is a file in lfgraph/architectures/families/: the package imports each one
    (no list to edit), and each registers at least one family."""
    from lfgraph.architectures import families

    folder = Path(families.__file__).parent
    assert set(families.MODULES) == {p.stem for p in folder.glob("*.py") if not p.name.startswith("_")}
    assert {type(a).__module__ for a in architectures.ARCHITECTURES.values()} == {f"{families.__name__}.{m}" for m in families.MODULES}


@pytest.mark.parametrize("family", CAUSAL)
def test_calibrated_fusion_and_checkpoint(family, tmp_path):
    hf = tiny_family_model(family, tmp_path / "in")
    check_calibrated_fusion_and_checkpoint(family, hf, tmp_path / "in", tmp_path / "out")


def test_post_norm_refit_fits_through_the_norm(tmp_path):
    """Gemma 2's block adds post_feedforward_layernorm(mlp(.)): the refit changes both the
    down projection and the norm's scale, and the kept block lands closer to the run."""
    hf = tiny_family_model("gemma2", tmp_path / "in")
    wrapper = CausalLMLogits(hf).eval()
    result = calibrated_merge(wrapper, [["model.model.layers.1", "model.model.layers.2"]], _calibration(hf.config.vocab_size))
    targets = [r.target for r in result.log.records if r.action == "refit"]
    assert targets == ["model.model.layers.1.mlp.down_proj", "model.model.layers.1.post_feedforward_layernorm"]


def test_moe_refit_folds_one_map_into_every_expert(tmp_path):
    """The MoE output is sum_e g_e D_e h_e: a map M on it equals M D_e in every expert, for
    any router weights (Qwen3-MoE's top-k weights do not sum to 1)."""
    from lfgraph.passes.calibrated_fusion import _Projection

    hf = tiny_family_model("qwen3_moe", tmp_path / "in")
    block = hf.model.layers[0]
    x = torch.randn(2, 5, hf.config.hidden_size)
    M = torch.eye(hf.config.hidden_size) + 0.1 * torch.randn(hf.config.hidden_size, hf.config.hidden_size)
    with torch.no_grad():
        want = block.mlp(x) @ M.T
        _Projection(block, *architectures.of_model(hf).mlp_target(block)).set(M.double())
        got = block.mlp(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_family_defaults():
    from lfgraph.recipes import default_recipe

    assert default_recipe("causal-lm", "merge", True, 0.25, architecture=architectures.lookup("mixtral"))[1] == "calibrated"
    assert default_recipe("causal-lm", "merge", True, 0.25, architecture=architectures.lookup("gemma2"))[1] == "calibrated-distill"
    assert architectures.lookup("opt").block_kind(type("C", (), {"do_layer_norm_before": False})()) == "post-norm-residual"


def test_unknown_family_is_refused_in_one_line(tmp_path, capsys):
    """A model whose model_type has no class in the registry: exit 2, one line naming where to add it."""
    from transformers import GPTJConfig, GPTJForCausalLM

    from tiny_text import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "in")
    GPTJForCausalLM(GPTJConfig(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, rotary_dim=4)).save_pretrained(tmp_path / "in")
    for engine in ([], ["--stream"]):  # refused by the registry on both paths, before a weight is read
        code = main(["compress", str(tmp_path / "in"), "--target", "0.25", "-o", str(tmp_path / "out"), *engine])
        line = one_line(capsys, code, "model type 'gptj'")
        assert "lfgraph/architectures/" in line and not (tmp_path / "out").exists()
    with pytest.raises(LfgraphError, match="not a family lfgraph knows"):
        architectures.for_config(GPTJConfig())


@pytest.mark.slow
@pytest.mark.parametrize("family", CAUSAL)
def test_compress_cli_writes_a_deploy_folder(family, tmp_path, capsys):
    tiny_family_model(family, tmp_path / "in")
    check_compress_cli(family, tmp_path / "in", tmp_path / "out", capsys)
