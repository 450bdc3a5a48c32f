"""The streamed fingerprint: hashed from the blocks the selection pass reads (only the layers
outside the blocks are read for it), equal to the one read layer by layer from the checkpoint
and to the in-memory graph's; skipped with ``fingerprint=False``."""

from __future__ import annotations

import pytest
import torch

from lfgraph import pipeline
from lfgraph.stream import compress_checkpoint
from lfgraph.stream.checkpoint import Checkpoint
from lfgraph.stream.fingerprint import checkpoint_fingerprint, linear_layers
from lfgraph.stream.skeleton import Skeleton

from stream_helpers import save_folder

OPTIONS = dict(target=0.25, select="block_influence", fuse="remove", calibration_windows=4, calibration_seq_len=16,
               progress=False, onnx="none")


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("qwen2", torch.float32)])
def test_streamed_fingerprint_reads_only_the_layers_outside_the_blocks(tmp_path, arch, dtype):
    folder = save_folder(tmp_path / "model", arch, layers=4, dtype=dtype)
    with_fp = compress_checkpoint(folder, tmp_path / "a", **OPTIONS)
    without = compress_checkpoint(folder, tmp_path / "b", **OPTIONS, fingerprint=False)
    assert "model_fingerprint" not in without.plan.provenance
    skeleton = Skeleton(Checkpoint(folder))
    fp = with_fp.plan.provenance["model_fingerprint"]
    assert fp == checkpoint_fingerprint(skeleton)
    if dtype == torch.float32:
        assert fp == pipeline.graph_of(str(folder))[1].fingerprint()
    outside = {w for node, w, _ in linear_layers(skeleton) if not node.startswith("model.model.layers.")}
    assert outside == {"model.embed_tokens.weight" if arch == "llama" else "lm_head.weight"}  # tied / untied head
    extra = with_fp.bytes_read - without.bytes_read
    assert extra == sum(skeleton.ckpt.entry(n).nbytes for n in outside)
