"""ONNX frontend: weighted nodes, groups and blocks from the graph alone; bad input files.

Graphs come from three places: built by hand with ``onnx.helper`` (opset 9, the newest
ONNX Runtime runs, and the newest ONNX defines; weights as initializers, as ``Constant``
nodes and behind a ``Transpose``), exported from the project's models with
``torch.onnx.export`` (checked against the PyTorch frontend, the trusted second way), and
the ResNet-50 that the onnx package ships (a foreign exporter, opset 9).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lfgraph.errors import LfgraphError, NoCompatibleGroupsError, UnsupportedModelError
from lfgraph.frontends import torch_fx
from lfgraph.frontends.onnx_graph import analyze_onnx, build_layer_graph, check_fusable, load_onnx, node_keys
from lfgraph.models import CausalLMLogits, EncoderHidden

# tests/ is on sys.path through its conftest.py (pytest's default "prepend" import mode)
import tiny_models as zoo
from onnx_builders import export_torch, NEWEST_OPSET, ORT_OPSET, failing_checker, plain_mlp, residual_cnn, residual_mlp, single_layer, with_custom_op

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Project models exported once per module: name -> (module, example input, onnx path)."""
    d = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 8))
    cnn = zoo.randomize_batchnorm(zoo.ResNetCNN())
    # both exporters and both optimisation settings, with the fast ones where they work:
    # the dynamo exporter takes seconds per model on a busy machine
    out = {
        # the TorchScript exporter without constant folding keeps BatchNorm and parameter names
        "cnn": (cnn, torch.randn(1, 3, 32, 32), "x", dict(dynamo=False, do_constant_folding=False)),
        # with folding (its default) BatchNorm goes into the convolutions, names into node scopes
        "cnn-folded": (cnn, torch.randn(1, 3, 32, 32), "x", dict(dynamo=False)),
        # the default exporter (dynamo, optimised): W.T folded into anonymous initializers
        "llama": (CausalLMLogits(zoo.tiny_llama()), ids, "input_ids", {}),
        "gpt2": (CausalLMLogits(zoo.tiny_gpt2()), ids, "input_ids", dict(optimize=False)),
        "bert": (EncoderHidden(zoo.tiny_bert()), ids, "input_ids", dict(dynamo=False)),
    }
    return {k: (m, x, export_torch(m, x, name, d / f"{k}.onnx", **kw)) for k, (m, x, name, kw) in out.items()}


# --------------------------------------------------------------------------------------
# hand-built graphs


@pytest.mark.parametrize("opset", [9, ORT_OPSET, NEWEST_OPSET])
@pytest.mark.parametrize("weights", ["init", "constant", "transpose"])
def test_handbuilt_mlp_layers_groups_blocks(opset, weights):
    m = residual_mlp(opset, weights)
    g = build_layer_graph(m)
    assert [n.name for n in g.nodes] == [f"layers.{k}.fc{j}" for k in range(3) for j in (1, 2)] + ["head"]
    assert [(b.name, b.skip) for b in g.blocks] == [(f"layers.{k}", "identity") for k in range(3)]
    assert {k: [n.name for n in v] for k, v in g.groups().items()} == {
        "linear:fc1:16x8": ["layers.0.fc1", "layers.1.fc1", "layers.2.fc1"],
        "linear:fc2:8x16": ["layers.0.fc2", "layers.1.fc2", "layers.2.fc2"],
    }
    assert len({b.kind for b in g.blocks}) == 1
    # the same weights in every style: canonical (out, in) layout, biases from the Add
    reference = build_layer_graph(residual_mlp(opset, "init"))
    assert g.fingerprint() == reference.fingerprint()
    w = onnx.numpy_helper.to_array(next(t for t in residual_mlp(opset, "init").graph.initializer if t.name == "layers.0.fc1.weight"))
    np.testing.assert_array_equal(g.node("layers.0.fc1").weight, w.T)
    assert g.node("layers.0.fc1").bias.shape == (16,)
    # the hidden units between fc1 and fc2 can be permuted: fc2 columns, fc1 rows and bias
    assert [(h.size, sorted(a for _, a in h.tensors)) for h in g.blocks[0].hidden] == [(16, [0, 0, 1])]


def test_model_is_not_modified():
    m = residual_mlp(9, "transpose")
    before = m.SerializeToString()
    build_layer_graph(m)
    assert m.SerializeToString() == before


def test_structural_names_without_exporter_names():
    g = build_layer_graph(residual_mlp(ORT_OPSET, "init", names=False))
    assert [b.name for b in g.blocks] == ["block0", "block1", "block2"]
    assert [g.node(m).role for m in g.blocks[1].members] == ["matmul0", "matmul1"]
    assert sorted(len(v) for v in g.groups().values()) == [3, 3]
    # refs are node keys: unnamed nodes are keyed by op type and index
    keys = node_keys(residual_mlp(ORT_OPSET, "init", names=False).graph)
    assert all(n.ref in keys and "#" in n.ref for n in g.nodes)


def test_ir3_initializers_listed_as_inputs():
    m = residual_mlp(9, "init", ir_version=3)
    assert len(m.graph.input) > 1
    g = build_layer_graph(m)
    assert [b.name for b in g.blocks] == ["layers.0", "layers.1", "layers.2"]


@pytest.mark.parametrize("opset", [9, NEWEST_OPSET])
def test_handbuilt_cnn_projection_block(opset):
    g = build_layer_graph(residual_cnn(opset))
    assert [(b.name, b.skip, len(b.members)) for b in g.blocks] == [
        ("block0", "identity", 2), ("block1", "identity", 2), ("block2", "projection", 3), ("block3", "identity", 2),
    ]
    assert g.blocks[0].kind == g.blocks[1].kind != g.blocks[3].kind
    conv = g.node(g.blocks[2].members[0])
    assert conv.op == "conv" and conv.attrs == {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    # conv1 -> BN -> Relu -> conv2: conv1 rows, BN's four vectors, conv2 input channels
    assert [(h.size, len(h.tensors)) for h in g.blocks[0].hidden] == [(8, 6)]
    assert [b.name for b in g.removable_blocks()] == ["block0", "block1", "block3"]


def test_no_weighted_nodes_is_refused():
    m = plain_mlp()
    for n in m.graph.node:
        if n.op_type == "MatMul":
            n.op_type = "Add"  # x + W: no weighted node left
    with pytest.raises(UnsupportedModelError, match="no Conv, Gemm or MatMul"):
        build_layer_graph(m)


# --------------------------------------------------------------------------------------
# graphs exported from the project's models


def _same_as_torch(exported, key):
    module, x, path = exported[key]
    go = build_layer_graph(load_onnx(path))
    gt = torch_fx.build_layer_graph(module, (x,))
    return go, gt


def test_exported_cnn_matches_torch_frontend(exported):
    go, gt = _same_as_torch(exported, "cnn")
    assert [(n.name, n.role, n.attrs) for n in go.nodes] == [(n.name, n.role, n.attrs) for n in gt.nodes]
    assert [(b.name, b.skip, b.members) for b in go.blocks] == [(b.name, b.skip, b.members) for b in gt.blocks]
    assert go.fingerprint() == gt.fingerprint()  # identical weights, bit for bit
    assert go.total_params == gt.total_params
    assert [[t for t in h.tensors] for h in go.blocks[0].hidden] == [[t for t in h.tensors] for h in gt.blocks[0].hidden]


def test_exported_cnn_with_folded_batchnorm(exported):
    go, gt = _same_as_torch(exported, "cnn-folded")
    assert [n.name for n in go.nodes] == [n.name for n in gt.nodes]
    assert [(b.name, b.skip) for b in go.blocks] == [(b.name, b.skip) for b in gt.blocks]
    assert go.node("blocks.0.conv1").bias is not None  # the folded BatchNorm became a bias


@pytest.mark.slow
def test_exported_cnn_dynamo_default(tmp_path):
    cnn = zoo.randomize_batchnorm(zoo.ResNetCNN())
    x = torch.randn(1, 3, 32, 32)
    go = build_layer_graph(load_onnx(export_torch(cnn, x, "x", tmp_path / "cnn.onnx")))
    gt = torch_fx.build_layer_graph(cnn, (x,))
    assert [n.name for n in go.nodes] == [n.name for n in gt.nodes]
    assert [(b.name, b.skip, b.members) for b in go.blocks] == [(b.name, b.skip, b.members) for b in gt.blocks]


def test_exported_llama_matches_torch_frontend(exported):
    go, gt = _same_as_torch(exported, "llama")
    # the dynamo exporter folds W.T into anonymous initializers: names come from its module scopes
    assert [(n.name, n.role) for n in go.nodes] == [(n.name, n.role) for n in gt.nodes]
    assert [(b.name, b.skip, b.members) for b in go.blocks] == [(b.name, b.skip, b.members) for b in gt.blocks]
    assert sorted(go.groups()) == sorted(gt.groups())
    assert go.fingerprint() == gt.fingerprint()
    assert len({b.kind for b in go.blocks}) == 1
    assert [(h.size, len(h.tensors)) for h in go.blocks[0].hidden] == [(128, 3)]  # gate/up -> down


def test_exported_gpt2_blocks_and_gemm_layout(exported):
    go, gt = _same_as_torch(exported, "gpt2")
    assert [b.name for b in go.blocks] == [f"model.transformer.h.{k}" for k in range(4)]
    assert all(b.skip == "identity" for b in go.blocks)
    for name in ("model.transformer.h.0.attn.c_attn", "model.transformer.h.3.mlp.c_proj"):
        np.testing.assert_array_equal(go.node(name).weight, gt.node(name).weight)
    # the MLP's hidden units pass through Reshapes that keep the feature axis
    assert [h.size for h in go.blocks[0].hidden] == [256]


def test_exported_bert_post_norm_blocks(exported):
    go, gt = _same_as_torch(exported, "bert")
    assert [(b.name, b.members) for b in go.blocks] == [(b.name, b.members) for b in gt.blocks]
    assert all(b.skip == "identity" for b in go.blocks)
    st = analyze_onnx(load_onnx(exported["bert"][2]))
    # post-norm: the LayerNorm after each residual Add belongs to the block, the last one too
    for b in st.blocks:
        assert st.nodes[st.producer[b.output]].op_type == "LayerNormalization"


def test_foreign_exporter_resnet50():
    m = load_onnx(LIGHT / "light_resnet50.onnx")
    g = build_layer_graph(m, "resnet50")
    assert len(g.nodes) == 54  # 53 convolutions and the classifier
    assert len(g.blocks) == 16
    assert [b.index for b in g.blocks if b.skip == "projection"] == [0, 3, 7, 13]
    assert [len(b.members) for b in g.blocks] == [4 if b.skip == "projection" else 3 for b in g.blocks]
    # identity blocks of one stage share a kind and can merge; stages differ in width
    kinds = [b.kind for b in g.blocks]
    assert kinds[1] == kinds[2] and kinds[4] == kinds[5] == kinds[6] and kinds[1] != kinds[4]
    assert g.total_params == 25_557_032
    check_fusable(g, "merge")


def test_foreign_plain_stack_groups_by_op_and_shape():
    """SqueezeNet's fire modules join branches with Concat: no residual blocks, but its
    anonymous convolutions of one shape and stride form groups (op kind, shape, attributes)."""
    g = build_layer_graph(load_onnx(LIGHT / "light_squeezenet.onnx"))
    assert not g.blocks
    groups = g.groups()
    assert groups and all(k.startswith("conv:conv:") for k in groups)
    assert all(len({n.attrs["stride"] for n in members}) == 1 for members in groups.values())
    check_fusable(g, "tie")
    with pytest.raises(LfgraphError, match="no residual blocks"):
        check_fusable(g, "merge")


# --------------------------------------------------------------------------------------
# bad input: one clear LfgraphError, the file untouched


def _save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(m, str(path))
    return path


def _refused(path: Path, match: str, error: type = LfgraphError) -> None:
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(error, match=match) as info:
        load_onnx(path)
    assert "\n" not in str(info.value)
    if before is not None:
        assert path.read_bytes() == before


def test_missing_file(tmp_path):
    _refused(tmp_path / "nope.onnx", "does not exist")


def test_corrupt_bytes(tmp_path):
    p = tmp_path / "corrupt.onnx"
    p.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0f garbage" * 10)
    _refused(p, "not a readable ONNX model|holds no ONNX graph")


def test_truncated_file(tmp_path):
    data = residual_mlp().SerializeToString()
    p = tmp_path / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    _refused(p, "truncated")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    _refused(p, "holds no ONNX graph")


def test_checker_failure(tmp_path):
    _refused(_save(failing_checker(), tmp_path / "bad.onnx"), "fails onnx.checker")


def test_unknown_custom_domain(tmp_path):
    _refused(_save(with_custom_op(), tmp_path / "custom.onnx"), "custom domain 'com.example.ops'", UnsupportedModelError)


def test_external_data_loads(tmp_path):
    m = residual_mlp(ORT_OPSET)
    p = tmp_path / "ext.onnx"
    onnx.save_model(m, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    g = build_layer_graph(load_onnx(p))
    assert g.fingerprint() == build_layer_graph(residual_mlp(ORT_OPSET)).fingerprint()


def test_missing_external_data(tmp_path):
    p = tmp_path / "ext.onnx"
    onnx.save_model(residual_mlp(), str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    _refused(p, "external data file 'ext.onnx.data'.*missing")


def test_truncated_external_data(tmp_path):
    p = tmp_path / "ext.onnx"
    onnx.save_model(residual_mlp(), str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    _refused(p, "truncated")


def test_no_compatible_groups():
    g = build_layer_graph(single_layer())
    with pytest.raises(NoCompatibleGroupsError, match="no two layers"):
        check_fusable(g, "tie")


def test_no_residual_blocks():
    g = build_layer_graph(plain_mlp())
    assert g.groups() and not g.blocks
    check_fusable(g, "tie")
    with pytest.raises(LfgraphError, match="no residual blocks"):
        check_fusable(g, "merge")
