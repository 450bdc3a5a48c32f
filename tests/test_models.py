"""Hugging Face folders as transformers reads them: a config without ``architectures`` is
read by its ``model_type``; a tokenizer that makes ids the embedding cannot take, and a
``config.json`` that is not an object, are one line (exit 2) before any weight is read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lfgraph import models, pipeline  # noqa: F401  (imported before the tests patch the loader)
from lfgraph.cli import main
from lfgraph.errors import LfgraphError

import tiny_models as zoo
from cli_checks import one_line
from tiny_text import tiny_tokenizer


def _without_architectures(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["architectures"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_causal_lm_config_without_architectures_is_read_by_its_model_type(tiny_llama_folder, tmp_path):
    folder = _without_architectures(tiny_llama_folder, tmp_path / "m")
    got, want = models.load_model(str(folder)), models.load_model(str(tiny_llama_folder))
    assert got.family == want.family == "causal-lm"
    ids = want.example_inputs[0]
    torch.testing.assert_close(got.module(ids), want.module(ids), rtol=0, atol=0)


def test_an_encoder_config_without_architectures_stays_an_encoder(tiny_bert_folder, tmp_path):
    # BERT has a causal-LM class too (BertLMHeadModel), and a masked-LM one: its checkpoints are encoders
    folder = _without_architectures(tiny_bert_folder, tmp_path / "m")
    assert models.load_model(str(folder)).family == "encoder"


def test_the_streaming_path_reads_a_config_without_architectures(tmp_path):
    from blocks.blocks_helpers import save_folder

    from lfgraph import pipeline

    src = save_folder(tmp_path / "src", layers=4)
    folder = _without_architectures(src, tmp_path / "m")
    options = dict(target=0.25, fuse="remove", calibration_windows=2, calibration_seq_len=16, eval_windows=0, quiet=True, onnx=False,
                   engine="stream")
    a = pipeline.compress(str(src), tmp_path / "a", **options)
    b = pipeline.compress(str(folder), tmp_path / "b", **options)
    assert [f.__dict__ for f in a.plan.fusions] == [f.__dict__ for f in b.plan.fusions]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def small_embedding(tmp_path_factory):
    """A tokenizer of 300 ids beside a model whose embedding has 200 rows."""
    folder = tmp_path_factory.mktemp("small-embedding")
    tiny_tokenizer(folder)
    zoo.tiny_llama(layers=2, vocab_size=200).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("args", [["analyze"], ["compress", "--stream", "--no-onnx"], ["compress", "--no-onnx"]])
def test_a_tokenizer_larger_than_the_embedding_is_refused_before_the_weights(small_embedding, tmp_path, capsys, monkeypatch, args):
    def refuse(*a, **k):
        raise AssertionError("weights were read before the tokenizer was checked")

    monkeypatch.setattr(models, "from_pretrained_checked", refuse)
    monkeypatch.setattr("lfgraph.blocks.checkpoint.Checkpoint.load", refuse)
    out = [] if args == ["analyze"] else ["-o", str(tmp_path / "out"), "--quiet"]
    line = one_line(capsys, main([args[0], str(small_embedding), *out, *args[1:]]), "token ids up to 299")
    assert "0..199" in line and str(small_embedding) in line
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_an_object_is_one_line_for_the_estimate_too(tiny_llama_folder, tmp_path):
    from lfgraph.estimate import check_in_memory_fits

    folder = shutil.copytree(tiny_llama_folder, tmp_path / "m")
    (folder / "config.json").write_text('"llama"')
    with pytest.raises(LfgraphError, match="holds a JSON str, not an object"):
        check_in_memory_fits(folder)
