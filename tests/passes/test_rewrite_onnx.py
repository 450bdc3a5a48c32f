"""ONNX rewrite passes: tie, merge (remove / mean / aligned mean), saving and verification.

Each rewrite is checked against a second, trusted computation: a NumPy forward pass of the
hand-built residual MLP without the removed block, a CNN whose block is zeroed into the
identity, the unrewritten graph in ONNX Runtime, and the PyTorch path (the round trip:
export → ONNX rewrite equals PyTorch rewrite → same plan, same outputs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from lfgraph.errors import LfgraphError
from lfgraph.frontends.onnx_graph import analyze_onnx, build_layer_graph, load_onnx
from lfgraph.models import CausalLMLogits, EncoderHidden
from lfgraph import onnx_io
from lfgraph.onnx_io import save_onnx
from lfgraph.passes.rewrite_onnx import apply_plan, exact_expected, make_inputs, permute_hidden_units
from lfgraph.verify import verify_against_onnx
from lfgraph.plan import Fusion, FusionPlan

# tests/ is on sys.path through its conftest.py (pytest's default "prepend" import mode)
import tiny_models as zoo
from onnx_builders import export_torch, NEWEST_OPSET, ORT_OPSET, residual_cnn, residual_mlp

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
X = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)


def _plan(mode: str, fusions: list[Fusion], fuse: str = "mean") -> FusionPlan:
    return FusionPlan(fusions=fusions, mode=mode, fuse=fuse)


def _tie_all(blocks: int = 3) -> FusionPlan:
    return _plan("tie", [
        Fusion(f"layers.0.fc{j}", [f"layers.{k}.fc{j}" for k in range(1, blocks)], unit="layer", align=False) for j in (1, 2)
    ])


def _merge(keep: str, absorb: list[str], fuse: str = "mean", align: bool = True) -> FusionPlan:
    return _plan("merge", [Fusion(keep, absorb, unit="block", align=align)], fuse=fuse)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    if model.opset_import[0].version > ORT_OPSET:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(None, feed)[0]
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _numpy_forward(model: onnx.ModelProto, x: np.ndarray, keep_blocks: list[int]) -> np.ndarray:
    """The residual MLP computed in NumPy from its layer graph, with only ``keep_blocks``."""
    g = build_layer_graph(model)
    x = x.astype(np.float64)
    for k in keep_blocks:
        fc1, fc2 = g.node(f"layers.{k}.fc1"), g.node(f"layers.{k}.fc2")
        h = np.maximum(x @ fc1.weight.T + fc1.bias, 0.0)
        x = x + h @ fc2.weight.T + fc2.bias
    head = g.node("head")
    return x @ head.weight.T + head.bias


def _unused_initializers(model: onnx.ModelProto) -> set[str]:
    used = {x for n in model.graph.node for x in n.input}
    return {t.name for t in model.graph.initializer} - used


# --------------------------------------------------------------------------------------
# tie


@pytest.mark.parametrize("opset", [9, ORT_OPSET, NEWEST_OPSET])
@pytest.mark.parametrize("weights", ["init", "constant", "transpose"])
def test_tie_of_identical_weights_is_exact(opset, weights):
    m = residual_mlp(opset, weights, identical=True)
    g = build_layer_graph(m)
    before = m.SerializeToString()
    r = apply_plan(m, g, _tie_all())
    assert m.SerializeToString() == before  # the input model is never modified
    report = verify_against_onnx(m, r.model, {"x": X})
    assert report.max_abs == 0.0, report.lines()
    assert report.provider.startswith("onnx.reference" if opset > ORT_OPSET else "CPUExecutionProvider")
    matmuls = [n for n in r.model.graph.node if n.op_type == "MatMul"]
    assert len({n.input[1] for n in matmuls}) == 2  # one shared initializer per tied role
    assert not _unused_initializers(r.model)
    assert not [n for n in r.model.graph.node if n.op_type in ("Transpose", "Constant")]  # orphans gone
    assert exact_expected(g, _tie_all())
    saved = sum(g.node(a).num_params for f in _tie_all().fusions for a in f.absorb)
    assert build_layer_graph(r.model).total_params == g.total_params - saved
    assert r.log.count("tie") == 4


def test_tie_of_different_weights_reports_the_error():
    m = residual_mlp(ORT_OPSET)
    assert not exact_expected(build_layer_graph(m), _tie_all())
    r = apply_plan(m, build_layer_graph(m), _tie_all())
    report = verify_against_onnx(m, r.model, {"x": X})
    assert np.isfinite(report.max_abs) and report.max_abs > 1e-3
    assert report.lines() and not report.ok


def test_tie_on_ir3_model_keeps_initializers_as_inputs():
    m = residual_mlp(9, "init", identical=True, ir_version=3)
    r = apply_plan(m, build_layer_graph(m), _tie_all())
    inputs = {i.name for i in r.model.graph.input}
    assert all(t.name in inputs for t in r.model.graph.initializer)
    assert verify_against_onnx(m, r.model, {"x": X}).max_abs == 0.0


# --------------------------------------------------------------------------------------
# merge


@pytest.mark.parametrize("opset", [9, ORT_OPSET, NEWEST_OPSET])
@pytest.mark.parametrize("weights", ["init", "transpose"])
def test_merge_remove_equals_graph_without_the_block(opset, weights):
    m = residual_mlp(opset, weights)
    r = apply_plan(m, build_layer_graph(m), _merge("layers.0", ["layers.1"], fuse="remove"))
    np.testing.assert_allclose(_run(r.model, {"x": X}), _numpy_forward(m, X, [0, 2]), rtol=1e-5, atol=1e-5)
    g2 = build_layer_graph(r.model)
    assert [b.name for b in g2.blocks] == ["layers.0", "layers.2"]
    assert not _unused_initializers(r.model)
    assert r.log.count("remove") == 1 and r.log.count("fuse") == 0


def test_merge_removes_consecutive_blocks_and_the_last_one():
    m = residual_mlp(ORT_OPSET, blocks=4, head=False)
    # the last block feeds the graph output directly: its Identity reads the new input
    r = apply_plan(m, build_layer_graph(m), _merge("layers.0", ["layers.2", "layers.3"], fuse="remove"))
    g = build_layer_graph(m)
    x = X.astype(np.float64)
    for k in (0, 1):
        fc1, fc2 = g.node(f"layers.{k}.fc1"), g.node(f"layers.{k}.fc2")
        x = x + np.maximum(x @ fc1.weight.T + fc1.bias, 0) @ fc2.weight.T + fc2.bias
    np.testing.assert_allclose(_run(r.model, {"x": X}), x, rtol=1e-5, atol=1e-5)


def test_merge_of_block_producing_the_graph_output():
    m = residual_mlp(ORT_OPSET, head=False)
    last_add = m.graph.node[-2]
    del m.graph.node[-1]  # drop the Identity: the last residual Add writes "y" itself
    last_add.output[0] = "y"
    onnx.checker.check_model(m, full_check=True)
    r = apply_plan(m, build_layer_graph(m), _merge("layers.1", ["layers.2"], fuse="remove"))
    assert [o.name for o in r.model.graph.output] == ["y"]
    assert r.model.graph.node[-1].op_type == "Identity"
    assert verify_against_onnx(m, r.model, {"x": X}).outputs[0].name == "y"


def test_merge_mean_of_identical_blocks_equals_removal():
    m = residual_mlp(ORT_OPSET, identical=True)
    g = build_layer_graph(m)
    mean = apply_plan(m, g, _merge("layers.0", ["layers.1", "layers.2"]))
    removed = apply_plan(m, g, _merge("layers.0", ["layers.1", "layers.2"], fuse="remove"))
    assert verify_against_onnx(removed.model, mean.model, {"x": X}).max_abs == 0.0
    assert mean.log.count("fuse") == 1 and mean.log.count("permute") == 0


def test_merge_mean_averages_weights_and_biases():
    m = residual_mlp(ORT_OPSET)
    g = build_layer_graph(m)
    r = apply_plan(m, g, _merge("layers.0", ["layers.1"], align=False))
    g2 = build_layer_graph(r.model)
    for role in ("fc1", "fc2"):
        a, b, fused = g.node(f"layers.0.{role}"), g.node(f"layers.1.{role}"), g2.node(f"layers.0.{role}")
        np.testing.assert_allclose(fused.weight, (a.weight + b.weight) / 2, rtol=1e-6)
        np.testing.assert_allclose(fused.bias, (a.bias + b.bias) / 2, rtol=1e-6)
    # the fused weights are new initializers under the layer's name
    assert "layers.0.fc1.weight" in {t.name for t in r.model.graph.initializer}
    np.testing.assert_allclose(_run(r.model, {"x": X}), _run(r.model, {"x": X}))


def test_projection_block_is_refused():
    m = residual_cnn()
    g = build_layer_graph(m)
    with pytest.raises(LfgraphError, match="projection skip"):
        apply_plan(m, g, _merge("block1", ["block2"], fuse="remove"))
    with pytest.raises(LfgraphError, match="differ in structure"):
        apply_plan(m, g, _merge("block1", ["block3"], fuse="remove"))


@pytest.mark.parametrize("opset", [9, ORT_OPSET])
def test_cnn_merge_remove_equals_zeroed_block(opset):
    """A basic block whose last BatchNorm has zero scale and shift adds nothing: after the
    final Relu it passes its (non-negative) input through, exactly as a removed block."""
    m = residual_cnn(opset)
    g = build_layer_graph(m)
    r = apply_plan(m, g, _merge("block0", ["block1"], fuse="remove"))
    st = analyze_onnx(m)
    block1 = next(b for b in st.blocks if b.name == "block1")
    last_bn = max(j for j in block1.nodes if st.nodes[j].op_type == "BatchNormalization")
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(m)
    for t in zeroed.graph.initializer:
        if t.name in st.nodes[last_bn].input[1:3]:
            t.CopyFrom(numpy_helper.from_array(np.zeros(list(t.dims), np.float32), t.name))
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(r.model, {"x": x}), _run(zeroed, {"x": x}), rtol=1e-5, atol=1e-6)


def test_cnn_merge_mean_aligned_runs():
    m = residual_cnn(ORT_OPSET)
    r = apply_plan(m, build_layer_graph(m), _merge("block0", ["block1"]))
    report = verify_against_onnx(m, r.model)
    assert np.isfinite(report.max_abs)
    assert r.log.count("permute") == 1  # conv1's channels (with BatchNorm) aligned


# --------------------------------------------------------------------------------------
# neuron alignment


@pytest.mark.parametrize("builder,block", [(residual_mlp, "layers.1"), (residual_cnn, "block1")])
def test_permuted_hidden_units_compute_the_same_function(builder, block):
    m = builder()
    p = permute_hidden_units(m, block, seed=3)
    assert build_layer_graph(p).fingerprint() != build_layer_graph(m).fingerprint()
    report = verify_against_onnx(m, p)
    assert report.max_rel < 1e-5, report.lines()


def test_aligned_merge_of_a_permuted_copy_gives_back_the_block():
    m = permute_hidden_units(residual_mlp(ORT_OPSET, identical=True), "layers.1", seed=3)
    g = build_layer_graph(m)
    assert not np.array_equal(g.node("layers.0.fc1").weight, g.node("layers.1.fc1").weight)
    r = apply_plan(m, g, _merge("layers.0", ["layers.1"]))
    g2 = build_layer_graph(r.model)
    for role in ("fc1", "fc2"):
        np.testing.assert_array_equal(g2.node(f"layers.0.{role}").weight, g.node(f"layers.0.{role}").weight)
        np.testing.assert_array_equal(g2.node(f"layers.0.{role}").bias, g.node(f"layers.0.{role}").bias)
    assert r.log.count("permute") == 1
    removed = apply_plan(m, g, _merge("layers.0", ["layers.1"], fuse="remove"))
    assert verify_against_onnx(removed.model, r.model, {"x": X}).max_abs == 0.0
    # without alignment the mean mixes unrelated units
    unaligned = build_layer_graph(apply_plan(m, g, _merge("layers.0", ["layers.1"], align=False)).model)
    assert not np.array_equal(unaligned.node("layers.0.fc1").weight, g.node("layers.0.fc1").weight)


# --------------------------------------------------------------------------------------
# plans that do not fit


def test_calibrated_fusion_needs_the_pytorch_path():
    m = residual_mlp()
    with pytest.raises(LfgraphError, match="PyTorch path"):
        apply_plan(m, build_layer_graph(m), _merge("layers.0", ["layers.1"], fuse="calibrated"))


def test_unknown_names_and_foreign_plans_are_refused():
    m = residual_mlp()
    g = build_layer_graph(m)
    with pytest.raises(LfgraphError, match="does not have"):
        apply_plan(m, g, _merge("layers.0", ["layers.9"]))
    with pytest.raises(LfgraphError, match="does not have"):
        apply_plan(m, g, _plan("tie", [Fusion("layers.0.fc1", ["nope"], unit="layer")]))
    with pytest.raises(LfgraphError, match="fusions.1. names block layers.1, which fusions.0. already names"):
        apply_plan(m, g, _plan("merge", [Fusion("layers.0", ["layers.1"]), Fusion("layers.1", ["layers.2"])]))
    plan = _merge("layers.0", ["layers.1"])
    plan.provenance["model_fingerprint"] = "0" * 16
    with pytest.raises(LfgraphError, match="fingerprint"):
        apply_plan(m, g, plan)
    with pytest.raises(LfgraphError, match="not in this ONNX model"):
        apply_plan(m, build_layer_graph(residual_mlp(names=False)), _merge("block0", ["block1"]))


# --------------------------------------------------------------------------------------
# graphs exported from the project's models; the round trip with the PyTorch path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 8))
    models = {
        "cnn": (zoo.randomize_batchnorm(zoo.ResNetCNN()), torch.randn(2, 3, 32, 32), "x", dict(dynamo=False, do_constant_folding=False)),
        # unoptimised dynamo exports (weights behind Transpose nodes) take a third of the
        # time of optimised ones, which the frontend tests cover
        "llama": (CausalLMLogits(zoo.tiny_llama()), ids, "input_ids", dict(optimize=False)),
        # three layers: two stay after a merge, enough to see that units repeat in pairs
        "gpt2": (CausalLMLogits(zoo.tiny_gpt2(layers=3)), ids, "input_ids", dict(optimize=False)),
        "bert": (EncoderHidden(zoo.tiny_bert()), ids, "input_ids", dict(dynamo=False)),
    }
    return {k: (m, x, name, export_torch(m, x, name, d / f"{k}.onnx", **kw)) for k, (m, x, name, kw) in models.items()}


@pytest.fixture(scope="module")
def graphs(exported):
    """ONNX model and layer graph per exported model, built once."""
    out = {}
    for key, (module, x, name, path) in exported.items():
        m = load_onnx(path)
        out[key] = (m, build_layer_graph(m))
    return out


@pytest.fixture(scope="module")
def torch_graphs(exported):
    from lfgraph.frontends import torch_fx

    cache: dict = {}

    def get(key: str):
        if key not in cache:
            module, x, _, _ = exported[key]
            cache[key] = torch_fx.build_layer_graph(module, (x,))
        return cache[key]

    return get


@pytest.mark.parametrize("key", ["cnn", "llama", "gpt2", "bert"])
def test_exported_models_rewrite_and_run(exported, graphs, key):
    from lfgraph.passes.planner import make_plan

    _, x, name, _ = exported[key]
    m, g = graphs[key]
    feed = {name: x.numpy()}
    for mode in ("merge", "tie"):
        plan = make_plan(g, metric="euclidean", target=0.25, mode=mode, fuse="mean")
        r = apply_plan(m, g, plan)  # checked with onnx.checker inside
        report = verify_against_onnx(m, r.model, feed)
        assert report.outputs and all(np.isfinite(o.max_abs) for o in report.outputs)
        after = build_layer_graph(r.model)
        if mode == "merge":
            assert len(after.blocks) == len(g.blocks) - len(plan.absorbed)
        else:
            assert after.total_params == g.total_params - plan.provenance["params_saved"]


@pytest.mark.parametrize("key", ["cnn", "llama"])
@pytest.mark.parametrize("mode,fuse,kind", [("merge", "mean", "blocks"), ("merge", "remove", "blocks"), ("tie", "mean", "blocks"), ("tie", "mean", "params")])
def test_round_trip_matches_the_pytorch_path(exported, graphs, torch_graphs, key, mode, fuse, kind):
    """Item 4: exported from PyTorch and compressed as ONNX = compressed in PyTorch."""
    rewrite_torch = pytest.importorskip("lfgraph.passes.rewrite_torch", reason="the PyTorch rewrite is not available")
    planner = pytest.importorskip("lfgraph.passes.planner", reason="the planner is not available")
    module, x, name, _ = exported[key]
    m, go = graphs[key]
    gt = torch_graphs(key)
    assert go.fingerprint() == gt.fingerprint()
    # a parameter target reads total_params: the ONNX count adds buffers the exporter stored
    # as constants (Llama's 8 rotary frequencies), too few to move this target
    po = planner.make_plan(go, metric="bures", target=0.34, target_kind=kind, mode=mode, fuse=fuse)
    pt = planner.make_plan(gt, metric="bures", target=0.34, target_kind=kind, mode=mode, fuse=fuse)
    assert po.fusions == pt.fusions
    torch_out = rewrite_torch.apply_plan(module, gt, pt).model
    with torch.no_grad():
        want = torch_out(x).numpy()
    got = _run(apply_plan(m, go, po).model, {name: x.numpy()})
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_foreign_resnet50_merge_runs():
    m = load_onnx(LIGHT / "light_resnet50.onnx")
    g = build_layer_graph(m)
    r = apply_plan(m, g, _merge("block1", ["block2"], fuse="remove"))
    report = verify_against_onnx(m, r.model)
    assert [o.name for o in report.outputs] == [o.name for o in m.graph.output]
    assert len(r.model.graph.node) < len(m.graph.node)


# --------------------------------------------------------------------------------------
# saving and verification


def test_save_and_reload(tmp_path):
    m = residual_mlp()
    r = apply_plan(m, build_layer_graph(m), _merge("layers.0", ["layers.1"]))
    files = save_onnx(r.model, tmp_path / "out.onnx")
    assert files == [tmp_path / "out.onnx"]
    assert build_layer_graph(load_onnx(tmp_path / "out.onnx")).fingerprint() == build_layer_graph(r.model).fingerprint()


def test_save_with_external_data(tmp_path, monkeypatch):
    m = residual_mlp(d=32, hidden=64)  # tensors over 1 kB go to the data file
    before = m.SerializeToString()
    files = save_onnx(m, tmp_path / "ext.onnx", external_data=True)
    assert files == [tmp_path / "ext.onnx", tmp_path / "ext.onnx.data"]
    assert m.SerializeToString() == before  # the caller's model keeps its data
    assert build_layer_graph(load_onnx(tmp_path / "ext.onnx")).fingerprint() == build_layer_graph(m).fingerprint()
    # above the protobuf limit (made small here) external data is chosen by itself
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    assert save_onnx(m, tmp_path / "big.onnx")[1].name == "big.onnx.data"
    r = apply_plan(m, build_layer_graph(m), _tie_all())  # checker and ORT read the big model from files
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    assert verify_against_onnx(m, r.model, {"x": x}).max_abs > 0
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data", "ext.onnx", "ext.onnx.data"]


def test_failed_save_leaves_the_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken)
    for external in (False, True):
        with pytest.raises(OSError):
            save_onnx(residual_mlp(), target, external_data=external)
        assert target.read_bytes() == b"previous"
        assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
    with pytest.raises(LfgraphError, match="does not exist"):
        save_onnx(residual_mlp(), tmp_path / "missing" / "m.onnx")


def test_make_inputs_respects_embedding_tables(graphs):
    m = graphs["llama"][0]
    feed = make_inputs(m)
    assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].max() < 128
    assert verify_against_onnx(m, m, feed).max_abs == 0.0


def _two_layer_model(alpha: float) -> onnx.ModelProto:
    """``x → MatMul(W) → Tanh → Gemm(alpha · x·W, transB=0)`` with one ``(in, out)`` weight
    used twice: MatMul and Gemm consume the same layout, the Gemm scales it."""
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "net.0.weight"], ["h"], name="net.0"),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("Gemm", ["t", "net.1.weight"], ["y"], name="net.1", alpha=alpha),
    ]
    inits = [numpy_helper.from_array(w, "net.0.weight"), numpy_helper.from_array(w / np.float32(alpha), "net.1.weight")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_tie_across_layouts_and_gemm_alpha_is_exact():
    m = _two_layer_model(alpha=0.5)
    g = build_layer_graph(m)
    np.testing.assert_array_equal(g.node("net.0").weight, g.node("net.1").weight)  # alpha folded in
    r = apply_plan(m, g, _plan("tie", [Fusion("net.0", ["net.1"], unit="layer", align=False)]))
    assert verify_against_onnx(m, r.model, {"x": X}).max_abs == 0.0
    assert len(r.model.graph.initializer) == 1
    gemm = next(n for n in r.model.graph.node if n.op_type == "Gemm")
    assert onnx.helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "alpha")) == 1.0


def test_tie_of_transposed_layouts_shares_through_one_transpose():
    m = _two_layer_model(alpha=1.0)
    gemm = m.graph.node[2]
    gemm.attribute.append(onnx.helper.make_attribute("transB", 1))  # Gemm now reads W as (out, in)
    w = numpy_helper.to_array(m.graph.initializer[1])
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), "net.1.weight"))
    g = build_layer_graph(m)
    r = apply_plan(m, g, _plan("tie", [Fusion("net.0", ["net.1"], unit="layer", align=False)]))
    assert verify_against_onnx(m, r.model, {"x": X}).max_abs == 0.0
    assert len(r.model.graph.initializer) == 1
    assert [n.op_type for n in r.model.graph.node].count("Transpose") == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LFGRAPH_BIG_TESTS"), reason="needs ~9 GB of memory, 5 GB of disk, 2 minutes: set LFGRAPH_BIG_TESTS=1")
def test_model_over_the_protobuf_limit(tmp_path):
    """A 2.15 GB embedding table before a residual MLP: loaded from external data, analysed,
    merged, checked, saved (with external data, by itself) and run, never serialised whole."""
    from onnx import TensorProto, helper

    rows, d = 8_400_000, 64  # 2.15 GB, just over 2**31 bytes
    big = residual_mlp(ORT_OPSET, d=d, hidden=32)
    g = big.graph
    g.node.insert(0, helper.make_node("Gather", ["embed.weight", "ids"], ["x"], name="embed"))
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2]))
    # filled in place: protobuf cannot copy a tensor over 2 GB into a list
    table = g.initializer.add()
    table.name, table.data_type = "embed.weight", TensorProto.FLOAT
    table.dims.extend([rows, d])
    table.raw_data = bytes(rows * d * 4)
    src = tmp_path / "big.onnx"
    assert len(save_onnx(big, src)) == 2  # over the limit: a .data file by itself
    del big, g, table
    m = load_onnx(src)
    graph = build_layer_graph(m)
    assert [b.name for b in graph.blocks] == ["layers.0", "layers.1", "layers.2"]
    r = apply_plan(m, graph, _merge("layers.0", ["layers.1"]))
    report = verify_against_onnx(m, r.model, {"ids": np.array([1, rows - 1], dtype=np.int64)})
    assert np.isfinite(report.max_abs)
    out = tmp_path / "merged.onnx"
    assert save_onnx(r.model, out) == [out, tmp_path / "merged.onnx.data"]
    del m, r
    assert len(build_layer_graph(load_onnx(out)).blocks) == 2
