"""What the block-by-block path writes: the input's dtype, a loadable folder, and nothing at
all when it fails or is interrupted."""

from __future__ import annotations

import json

import pytest

from lfgraph.errors import LfgraphError
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lfgraph import pipeline
from lfgraph.blocks import write as blocks_write

from blocks_helpers import save_folder


def compress_checkpoint(folder, out, *, fuse="calibrated", target=0.25, calibration_windows=4, calibration_seq_len=32, overwrite=False, **kw):
    """``compress`` block by block, checkpoint only, quietly, without the quality measure."""
    return pipeline.compress(str(folder), out, target=target, select=kw.pop("select", "block_influence"), fuse=fuse,
                             calibration_windows=calibration_windows, calibration_seq_len=calibration_seq_len, eval_windows=0,
                             engine="stream", quiet=True, onnx=False, overwrite=overwrite, **kw)


def _dtypes(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_slice(k).get_dtype() for k in st.keys()})
    return out


@pytest.mark.parametrize("sharded", [False, True])
def test_bf16_in_bf16_out(tmp_path, sharded):
    folder = save_folder(tmp_path / "model", "qwen2", layers=8, sharded=sharded, dtype=torch.bfloat16)
    out = tmp_path / "out"
    report = compress_checkpoint(folder, out)
    assert set(_dtypes(out).values()) == {"BF16"}
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    # the refitted projection differs from the stored one; the other kept tensors are copied unchanged
    keep = int(report.plan.fusions[0].keep.rsplit(".", 1)[1])
    kept = [i for i in range(8) if f"model.model.layers.{i}" not in report.plan.absorbed]
    kept_new = kept.index(keep)
    original = AutoModelForCausalLM.from_pretrained(folder)
    assert not torch.equal(model.model.layers[kept_new].mlp.down_proj.weight, original.model.layers[keep].mlp.down_proj.weight)
    assert torch.equal(model.model.layers[kept_new].mlp.up_proj.weight, original.model.layers[keep].mlp.up_proj.weight)
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(_dtypes(out))
        assert index["metadata"]["total_size"] == sum(e.nbytes for e in pipeline_entries(out))


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    folder = save_folder(tmp_path / "model", "llama", layers=6, sharded=True)
    out = tmp_path / "out"

    def interrupted(ckpt, staging, *args, **kwargs):
        (staging / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(blocks_write, "write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(folder, out, fuse="remove", calibration_windows=2, calibration_seq_len=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_run_keeps_the_previous_output(tmp_path, monkeypatch):
    folder = save_folder(tmp_path / "model", "llama", layers=6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(blocks_write, "write_checkpoint", failing)
    with pytest.raises(RuntimeError):
        compress_checkpoint(folder, out, fuse="remove", calibration_windows=2, calibration_seq_len=16, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
    assert (out / "old.txt").read_text() == "previous"
    monkeypatch.undo()
    with pytest.raises(LfgraphError, match="--overwrite"):  # a folder lfgraph did not write (lfgraph.fileio)
        compress_checkpoint(folder, out, fuse="remove", calibration_windows=2, calibration_seq_len=16)
    compress_checkpoint(folder, out, fuse="remove", calibration_windows=2, calibration_seq_len=16, overwrite=True)
    assert (out / "old.txt").read_text() == "previous" and (out / "config.json").is_file()  # only lfgraph's files written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_a_damaged_block_read_ahead_is_refused(tmp_path):
    """A NaN in a block read in the background (the selection pass reads the next block while
    one computes) raises the one-line error, and nothing is written."""
    from safetensors.torch import load_file, save_file

    folder = save_folder(tmp_path / "model", "llama", layers=4)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LfgraphError, match=r"model.layers.2.mlp.up_proj.weight contains NaN or Inf"):
        compress_checkpoint(folder, tmp_path / "out", calibration_windows=4, calibration_seq_len=16)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tensor,value", [("model.norm.weight", float("inf")), ("lm_head.weight", float("nan"))])
@pytest.mark.parametrize("fuse", ["remove", "calibrated"])
def test_a_damaged_final_norm_or_head_is_refused_not_copied(tmp_path, tensor, value, fuse, capsys):
    """Before: the stream checked block weights only, and copied an Inf final norm or a NaN
    untied head into the output with exit 0. Every tensor the output will hold is checked:
    here with the quality measure off, so nothing but the check itself reads them."""
    from safetensors.torch import load_file, save_file

    from lfgraph.cli import main

    folder = save_folder(tmp_path / "model", "qwen2", layers=4)  # untied head
    tensors = load_file(folder / "model.safetensors")
    tensors[tensor].view(-1)[3] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    before = (folder / "model.safetensors").read_bytes()
    code = main(["compress", str(folder), "--stream", "--fuse", fuse, "--no-onnx", "--eval-windows", "0", "--calibration-windows", "2",
                 "--calibration-seq-len", "16", "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{tensor} contains NaN or Inf" in err
    assert not (tmp_path / "out").exists() and (folder / "model.safetensors").read_bytes() == before


def pipeline_entries(folder):
    from lfgraph.blocks.checkpoint import Checkpoint

    return list(Checkpoint(folder).tensors.values())
