"""Session fixtures for the deploy tests (each ONNX export takes seconds: build once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lfgraph import pipeline

from deploy_helpers import tiny_decoder


@pytest.fixture(scope="session")
def gqa_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gqa")
    tiny_decoder(folder, gqa=True, tied=True)
    return folder


@pytest.fixture(scope="session")
def mha_untied_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-mha-untied")
    tiny_decoder(folder, gqa=False, tied=False, seed=1)
    return folder


@pytest.fixture(scope="session")
def gqa_loaded(gqa_folder):
    model = pipeline.load(str(gqa_folder))
    return model, pipeline.trace(model)
