"""What ONNX Runtime cannot run is known from the config before the heavy work
(``lfgraph.deploy.limits``): a head size ``GroupQueryAttention`` does not take (the op
onnxruntime-genai's builder writes) gives a checkpoint-only folder that says why in auto
mode, and a one-line refusal when ONNX is asked for explicitly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lfgraph.cli import main
from lfgraph.deploy.limits import GQA_HEAD_SIZE_MULTIPLE, head_size, onnx_refusal
from lfgraph.errors import LfgraphError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "blocks"))
from blocks_helpers import save_folder  # noqa: E402

#: 4 heads of 12: a Llama ONNX Runtime's GroupQueryAttention refuses (12 % 16 != 0)
ODD = dict(hidden=48, intermediate=96)


def test_the_refusal_is_read_from_the_config_and_names_what_avoids_it():
    assert head_size({"hidden_size": 48, "num_attention_heads": 4}) == 12
    assert head_size({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}) == 32
    why = onnx_refusal({"hidden_size": 48, "num_attention_heads": 4}, "genai-builder")
    assert "head size is 12" in why and f"multiples of {GQA_HEAD_SIZE_MULTIPLE}" in why and "--no-onnx" in why and "engine='export'" in why
    assert onnx_refusal({"hidden_size": 64, "num_attention_heads": 4}, "genai-builder") is None
    assert onnx_refusal({"hidden_size": 48, "num_attention_heads": 4}, "export") is None  # standard ops: any head size


@pytest.fixture(scope="module")
def odd_heads(tmp_path_factory) -> Path:
    return save_folder(tmp_path_factory.mktemp("odd-heads") / "m", layers=4, **ODD)


def _no_builder(monkeypatch):
    monkeypatch.setattr("lfgraph.deploy.genai_builder.write_onnx", lambda *a, **k: pytest.fail("the builder ran for a model ONNX Runtime cannot run"))


def test_auto_writes_the_checkpoint_only_and_says_why(odd_heads, tmp_path, capsys, monkeypatch):
    """Before: the builder wrote the ONNX file and its check died in ONNX Runtime
    ("head_size shall be a multiple of 16"), an unexpected error after all the work."""
    _no_builder(monkeypatch)
    out = tmp_path / "out"
    code = main(["compress", str(odd_heads), "--stream", "--fuse", "remove", "--calibration-windows", "2",
                 "--calibration-seq-len", "16", "-o", str(out)])
    table = capsys.readouterr().out
    assert code == 0 and "no ONNX: the model's attention head size is 12" in table and "checkpoint only" in table
    # said before the work, with the estimate (known from the config), not found after it
    early = table.index("lfgraph: no ONNX will be written: the model's attention head size is 12")
    assert early < table.index("no ONNX: the model's attention head size is 12") and "--no-onnx" in table[early:].splitlines()[0]
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not names & {"model.onnx", "genai_config.json"}


def test_the_in_memory_builder_engine_is_refused_before_writing(odd_heads, tmp_path):
    from transformers import AutoModelForCausalLM

    from lfgraph.deploy import write_deploy_folder

    hf = AutoModelForCausalLM.from_pretrained(odd_heads)
    with pytest.raises(LfgraphError, match="engine 'genai-builder'.*head size is 12"):
        write_deploy_folder(hf, tmp_path / "out", engine="genai-builder", verify=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_onnx_runtime_still_refuses_that_head_size(odd_heads, tmp_path):
    """The premise, measured (onnxruntime 1.32.0): the builder writes the file, ONNX Runtime
    refuses to run it. When a newer ONNX Runtime runs it, relax GQA_HEAD_SIZE_MULTIPLE."""
    import shutil

    import onnxruntime as ort

    from lfgraph.deploy.genai_builder import build_onnx

    folder = shutil.copytree(odd_heads, tmp_path / "m")
    build_onnx(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.arange(8, dtype=np.int64)[None]
    feeds = {i.name: ids if i.name == "input_ids" else np.ones_like(ids) if i.name == "attention_mask"
             else np.zeros((1, 2, 0, 12), np.float32) for i in session.get_inputs()}
    with pytest.raises(Exception, match="GroupQueryAttention.*head_size (must|shall) be a multiple of"):
        session.run(["logits"], feeds)
