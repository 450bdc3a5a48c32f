"""`lfgraph compress model.onnx`: the ONNX path through the CLI, on files lfgraph exported."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch

from lfgraph.cli import main
from lfgraph.export import export_onnx
from lfgraph.frontends.onnx_graph import build_layer_graph as onnx_graph
from lfgraph.frontends.torch_fx import build_layer_graph as torch_graph
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_onnx import apply_plan as onnx_apply, make_inputs
from lfgraph.passes.rewrite_torch import apply_plan as torch_apply

import tiny_models as zoo


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(zoo.ResNetCNN(stages=((8, 3), (16, 3))))
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    export_onnx(model, (torch.randn(1, 3, 16, 16),), path, ["input"], ["logits"], {"input": {0: "batch"}})
    return model, path


def _float_params(path) -> int:
    m = onnx.load(str(path))
    return int(sum(np.prod(t.dims) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT))


@pytest.mark.parametrize("mode,args", [
    ("merge", ["--target", "0.34"]),
    ("tie", ["--target", "0.2", "--target-kind", "params", "--scope", "global"]),
])
def test_compress_onnx_drops_exactly_the_planned_parameters(cnn_onnx, tmp_path, capsys, mode, args):
    _, src = cnn_onnx
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    plan_path, out = tmp_path / "plan.json", tmp_path / "out.onnx"
    assert main(["plan", str(src), "--mode", mode, *args, "-o", str(plan_path)]) == 0
    assert main(["compress", str(src), "--plan", str(plan_path), "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "(onnx)" in table and "quality vs the original" in table
    import json

    plan = json.loads(plan_path.read_text())
    saved = plan["provenance"]["params_saved"]  # the weighted layers' parameters
    dropped = _float_params(src) - _float_params(out)
    # every replaced weight is gone: nothing kept alive by shape arithmetic on it
    if mode == "tie":
        assert dropped == saved
    else:  # merge also drops the removed blocks' norm parameters and statistics
        assert dropped >= saved
        names = [t.name for t in onnx.load(str(out)).graph.initializer]
        for f in plan["fusions"]:
            for gone in f["absorb"]:
                assert not any(n.startswith(gone + ".") for n in names)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


def test_onnx_and_torch_paths_agree_on_an_lfgraph_export(cnn_onnx):
    model, src = cnn_onnx
    tg = torch_graph(model, (torch.randn(1, 3, 16, 16),))
    og = onnx_graph(onnx.load(str(src)))
    tplan = make_plan(tg, target=0.34, mode="merge")
    oplan = make_plan(og, target=0.34, mode="merge")
    assert [(f.keep, f.absorb) for f in tplan.fusions] == [(f.keep, f.absorb) for f in oplan.fusions]
    merged_onnx = onnx_apply(onnx.load(str(src)), og, oplan).model
    merged_torch = torch_apply(model, tg, tplan).model
    import onnxruntime as ort

    x = make_inputs(merged_onnx, batch=2)
    got = ort.InferenceSession(merged_onnx.SerializeToString()).run(None, x)[0]
    want = merged_torch(torch.from_numpy(x["input"])).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_bad_onnx_files_give_one_line_and_are_not_touched(cnn_onnx, tmp_path, capsys, damage):
    _, src = cnn_onnx
    data = src.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x00\xffnot a model" * 50)
    before = bad.read_bytes()
    code = main(["compress", str(bad), "--mode", "merge", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("lfgraph: error: ")]) == 1
    assert bad.read_bytes() == before and not (tmp_path / "o.onnx").exists()


def test_output_may_not_overwrite_the_input(cnn_onnx, capsys):
    _, src = cnn_onnx
    assert main(["compress", str(src), "--mode", "merge", "--target", "0.34", "-o", str(src)]) == 2
    assert "is an input of this run" in capsys.readouterr().err
