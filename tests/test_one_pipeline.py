"""One compress path for both sources: the same test body runs on a PyTorch model and on
its ONNX export, and must see the same plan, the same report fields and the same exit
codes — including a failed export check (exit 1) and a missing output (fails)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfgraph import pipeline
from lfgraph.cli import main
from lfgraph.models import load_model, wrap_module
from lfgraph.sources import OnnxSource, Source, TorchSource
from lfgraph.verify import compare_outputs

import tiny_models as zoo

PLAN_OPTIONS = dict(target=0.34, mode="merge", select="similarity", fuse="remove", metric="bures", scope="adjacent")


def _cnn_pair(tmp_path):
    torch.manual_seed(0)
    cnn = zoo.randomize_batchnorm(zoo.ResNetCNN(stages=((8, 3), (16, 3))))
    loaded = wrap_module(cnn, (torch.randn(1, 3, 16, 16),), name="cnn", family="vision")
    path = tmp_path / "cnn.onnx"
    TorchSource(loaded).write(loaded.module, path, {})
    return loaded, path


def _llama_pair(tmp_path, folder):
    loaded = load_model(str(folder))
    path = tmp_path / "llama.onnx"
    TorchSource(loaded).write(loaded.module, path, {})
    return loaded, path


@pytest.fixture(params=["cnn", "llama"])
def pair(request, tmp_path, tiny_llama_folder):
    if request.param == "cnn":
        return _cnn_pair(tmp_path)
    return _llama_pair(tmp_path, tiny_llama_folder)


def _compress(spec, out, **extra):
    return pipeline.compress(spec, out, quiet=True, eval_windows=2, eval_seq_len=32, **PLAN_OPTIONS, **extra)


@pytest.mark.slow
def test_same_plan_report_fields_and_exit_code(pair, tmp_path):
    loaded, onnx_path = pair
    reports = [_compress(loaded, tmp_path / "from-torch.onnx"), _compress(str(onnx_path), tmp_path / "from-onnx.onnx")]
    torch_r, onnx_r = reports
    assert [(f.keep, f.absorb) for f in torch_r.plan.fusions] == [(f.keep, f.absorb) for f in onnx_r.plan.fusions]
    assert torch_r.blocks == onnx_r.blocks and torch_r.blocks[1] < torch_r.blocks[0]
    assert set(torch_r.to_dict()) == set(onnx_r.to_dict())
    assert [r[0] for r in torch_r.rows()[:4]] == [r[0] for r in onnx_r.rows()[:4]]
    assert torch_r.exit_code == onnx_r.exit_code == 0
    assert torch_r.quality is not None and onnx_r.quality is not None
    # the merged models compute the same function through either path
    feed = OnnxSource(onnx_path).verification_feed()
    from lfgraph.onnx_io import runner

    a = runner(tmp_path / "from-torch.onnx").run(feed)
    b = runner(tmp_path / "from-onnx.onnx").run(feed)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["wrong values", "missing output"])
def test_a_failed_export_check_is_exit_1_on_both_paths(pair, tmp_path, monkeypatch, capsys, damage):
    loaded, onnx_path = pair
    for cls in (TorchSource, OnnxSource):
        original = cls.reference_outputs

        def damaged(self, compressed, feed, _original=original):
            ref = dict(_original(self, compressed, feed))
            if damage == "wrong values":
                return {k: v + 1.0 for k, v in ref.items()}
            return {**ref, "extra_output": next(iter(ref.values()))}

        monkeypatch.setattr(cls, "reference_outputs", damaged)
    torch_r = _compress(loaded, tmp_path / "a.onnx")
    onnx_r = _compress(str(onnx_path), tmp_path / "b.onnx")
    assert not torch_r.parity.ok and not onnx_r.parity.ok
    assert torch_r.exit_code == onnx_r.exit_code == 1
    args = ["--target", "0.34", "--select", "similarity", "--fuse", "remove", "--quiet", "--eval-windows", "0"]
    assert main(["compress", str(onnx_path), "-o", str(tmp_path / "c.onnx"), *args]) == 1
    assert "✗ FAILED" in capsys.readouterr().out


def test_compare_outputs_fails_on_a_missing_or_extra_output():
    ref = {"logits": np.ones((2, 3)), "hidden": np.zeros((2, 4))}
    assert compare_outputs(ref, dict(ref), "cpu").ok
    missing = compare_outputs(ref, {"logits": ref["logits"]}, "cpu")
    assert not missing.ok and any(o.name == "hidden" and not o.ok for o in missing.outputs)
    extra = compare_outputs(ref, {**ref, "other": ref["logits"]}, "cpu")
    assert not extra.ok and any(o.name == "other" for o in extra.outputs)
    assert not compare_outputs(ref, {}, "cpu").ok
    assert not compare_outputs({}, {}, "cpu").ok  # nothing compared is no pass


def test_sources_share_one_interface():
    for cls in (TorchSource, OnnxSource):
        assert issubclass(cls, Source)
        for method in ("graph", "rewrite", "write", "verification_feed", "reference_outputs", "original_file", "latency_feed", "parameter_count"):
            assert getattr(cls, method) is not getattr(Source, method), f"{cls.__name__} lacks {method}"


@pytest.mark.slow
def test_verify_re_checks_a_file_against_either_source(pair, tmp_path, capsys):
    loaded, onnx_path = pair
    out = tmp_path / "from-onnx.onnx"
    plan_args = ["--target", "0.34", "--select", "similarity", "--fuse", "remove", "--quiet", "--eval-windows", "0"]
    assert main(["compress", str(onnx_path), "-o", str(out), *plan_args]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), str(onnx_path)]) == 0
    assert "✓" in capsys.readouterr().out
    # the same file checked against another model's graph is refused, not compared
    other = tmp_path / "other.onnx"
    import onnx
    from onnx_builders import residual_mlp

    onnx.save(residual_mlp(), other)
    assert main(["verify", str(out), str(other)]) == 2
