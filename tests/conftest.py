"""Shared fixtures: tiny models built here (no downloads), saved as Hugging Face folders
where a test needs the CLI's model loading path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_models as zoo

from tiny_text import tiny_tokenizer


@pytest.fixture(autouse=True)
def _few_threads():
    # the CI machine has 2 cores; tests build tiny models where threads only add overhead
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # exported originals are cached by fingerprint; keep test runs from sharing a cache
    monkeypatch.setenv("LFGRAPH_CACHE", str(tmp_path_factory.getbasetemp() / "lfgraph-cache"))


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory) -> Path:
    """A 6-layer random Llama with its tokenizer, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer(folder)
    model = zoo.tiny_llama(layers=6, vocab_size=len(tok))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = tiny_tokenizer(folder)
    model = zoo.tiny_bert(layers=4, vocab_size=len(tok))
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: the checks under test must come first."""
    from lfgraph import models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input and options were checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr("lfgraph.sources.load_model", refuse)
