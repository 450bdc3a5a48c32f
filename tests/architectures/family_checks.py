"""The checks every family's tiny model goes through, shared by ``test_families.py`` (the
first families, parametrized over ``tiny_families.FAMILIES``) and the test file of each
family added in its own module (``test_family_NAME.py``)."""

from __future__ import annotations

from pathlib import Path

import torch

from lfgraph import architectures
from lfgraph.cli import main
from lfgraph.deploy.checkpoint import save_hf_checkpoint
from lfgraph.models import CausalLMLogits
from lfgraph.passes.calibrated_fusion import calibrated_merge


def calibration(vocab: int, n: int = 4, seq: int = 24) -> torch.Tensor:
    return torch.randint(2, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def check_calibrated_fusion_and_checkpoint(family: str, hf, folder: Path, out: Path) -> None:
    """``hf``: the tiny 4-block model of ``family`` saved in ``folder``. The registry finds
    the family and its stack; calibrated fusion of blocks 1 and 2 refits and lowers the fit
    error; the 3-block checkpoint reloads with no missing/unexpected weights, same logits."""
    from transformers import AutoModelForCausalLM

    arch = architectures.of_model(hf)
    assert arch is architectures.lookup(family) and arch.name == family
    cpath = arch.stack_path(CausalLMLogits(hf))
    assert len(arch.blocks(hf)) == 4

    wrapper = CausalLMLogits(hf).eval()
    result = calibrated_merge(wrapper, [[f"{cpath}.1", f"{cpath}.2"]], calibration(hf.config.vocab_size), keep="first")
    refits = [r for r in result.log.records if r.action == "refit"]
    assert refits and all(r.detail["relative_error_after"] <= r.detail["relative_error_before"] + 1e-9 for r in refits)
    compressed = result.model.model
    assert compressed.config.num_hidden_layers == 3 and hf.config.num_hidden_layers == 4

    save_hf_checkpoint(compressed, out, tokenizer_source=folder, kept_layers=[0, 1, 3])
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = calibration(hf.config.vocab_size, 1, 12)
    with torch.no_grad():
        want, got = compressed.eval()(ids).logits, loaded.eval()(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def check_compress_cli(family: str, folder: Path, out: Path, capsys) -> None:
    """``lfgraph compress FOLDER --target 0.25 --fuse calibrated -o OUT/`` on the tiny 4-block
    model of ``family``: the deploy folder's checkpoint reloads with no missing/unexpected
    weights and 3 blocks; where the family can go to ONNX (no ``no_onnx``), ``model.onnx``'s
    prefill equals the reloaded checkpoint's logits (rel <= 1e-4), else the folder is the
    checkpoint alone and the report says why there is no ONNX."""
    from transformers import AutoModelForCausalLM

    from lfgraph.deploy.generation import OrtDecoder

    code = main(["compress", str(folder), "--target", "0.25", "--fuse", "calibrated", "-o", str(out),
                 "--eval-windows", "0", "--calibration-windows", "4", "--calibration-seq-len", "64"])
    assert code == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.num_hidden_layers == 3
    if architectures.lookup(family).no_onnx:  # the checkpoint, checked by reloading it, and why there is no ONNX
        assert "model.onnx" not in names and {"config.json", "plan.json", "tokenizer.json"} <= names
        assert "no ONNX" in capsys.readouterr().out
        return
    assert {"config.json", "model.onnx", "genai_config.json", "tokenizer.json"} <= names
    ids = calibration(loaded.config.vocab_size, 1, 12)
    head_dim = getattr(loaded.config, "head_dim", None) or loaded.config.hidden_size // loaded.config.num_attention_heads
    ort_logits, _ = OrtDecoder(out / "model.onnx").prefill(ids.numpy(), head_dim=head_dim)
    with torch.no_grad():
        want = loaded.eval()(ids).logits.numpy()
    assert abs(ort_logits - want).max() <= 1e-4 * abs(want).max()
