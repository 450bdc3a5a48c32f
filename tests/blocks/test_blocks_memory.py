"""Peak memory of the block-by-block path, measured: a few blocks above a bare runtime, not the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from blocks_helpers import save_folder

#: hidden 512, MLP 1536, 16 layers: 3.0M parameters (12 MB in float32) per block, 192 MB of blocks.
HIDDEN, INTERMEDIATE, LAYERS = 512, 1536, 16
#: Allowed peak above the baseline: 4 blocks' worth (50 MB), against the model's ~200 MB.
#: What it pays for: one block in float32 plus the block's file pages while it is read, the
#: meta skeleton and its model classes, the hidden states, one batch's activations.
#: The baseline is a fresh process that imports lfgraph, torch and transformers and makes
#: the calibration windows (loading the tokenizer and tokenizing the bundled corpus costs
#: ~150 MB whatever the model's size). Measured here: ~2.5 blocks above it.
BOUND_BLOCKS = 4

_CHILD = """
import json, sys
import lfgraph, torch, transformers
from lfgraph import pipeline
from lfgraph.calibration import calibration_windows
from lfgraph.models import _tokenizer_or_none
calibration_windows(_tokenizer_or_none(__import__("pathlib").Path(sys.argv[2])), 8, 64)
if sys.argv[1] == "compress":
    torch.set_num_threads(1)
    pipeline.compress(sys.argv[2], sys.argv[3], target=0.25, select="block_influence", fuse="remove", calibration_windows=8,
                      calibration_seq_len=64, eval_windows=0, engine="stream", quiet=True, onnx=False)
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the forking parent's size
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps(int(hwm) * 1024))
"""


def _max_rss(*args: str) -> int:
    """Peak resident bytes of a fresh Python process running ``_CHILD`` with ``args``."""
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_peak_memory_is_a_few_blocks(tmp_path):
    folder = save_folder(tmp_path / "model", "llama", layers=LAYERS, sharded=True, hidden=HIDDEN, intermediate=INTERMEDIATE)
    model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    block_bytes = model_bytes / LAYERS
    assert model_bytes > 150e6
    base = _max_rss("bare", str(folder))
    peak = _max_rss("compress", str(folder), str(tmp_path / "out"))
    above = peak - base
    print(f"baseline (runtime + calibration windows) {base / 1e6:.0f} MB, streaming compress {peak / 1e6:.0f} MB: {above / 1e6:.0f} MB above "
          f"({above / block_bytes:.1f} blocks of {block_bytes / 1e6:.1f} MB; model {model_bytes / 1e6:.0f} MB)")
    assert above < BOUND_BLOCKS * block_bytes
    assert (tmp_path / "out" / "config.json").is_file()
