"""The Python API on a plain nn.Module: the ResNet-style CNN with and without calibration data."""

from __future__ import annotations

import torch

from lfgraph import pipeline
from lfgraph.models import wrap_module

import tiny_models as zoo


def _cnn():
    torch.manual_seed(0)
    return zoo.randomize_batchnorm(zoo.ResNetCNN(stages=((8, 3), (16, 3))))


def test_vision_default_with_calibration_data_is_block_influence_and_calibrated(tmp_path):
    data = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = wrap_module(_cnn(), (data[:1],), name="cnn", family="vision", calibration=data)
    report = pipeline.compress(model, tmp_path / "cnn.onnx", target=0.34, quiet=True)
    assert "select block_influence" in report.recipe and "fuse calibrated" in report.recipe
    assert report.blocks == (6, 4)
    assert report.parity.ok
    assert report.params[1] < report.params[0]


def test_without_calibration_data_the_default_selects_by_weights(tmp_path):
    model = wrap_module(_cnn(), (torch.randn(1, 3, 16, 16),), name="cnn", family="vision")
    report = pipeline.compress(model, tmp_path / "cnn.onnx", target=0.34, quiet=True)
    assert "select similarity" in report.recipe and "fuse remove" in report.recipe
    assert report.blocks == (6, 4) and report.parity.ok
