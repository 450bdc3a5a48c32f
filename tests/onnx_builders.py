"""ONNX graphs built by hand with ``onnx.helper`` for the ONNX frontend and rewrite tests.

Every builder returns a model that passes ``onnx.checker``. ``weights`` says how the
weighted nodes get their weights: ``"init"`` (an initializer), ``"constant"`` (a
``Constant`` node) or ``"transpose"`` (an ``(out, in)`` initializer behind a
``Transpose``, as the dynamo exporter writes ``nn.Linear``). Opset 9 models use IR 4 (or
3, where initializers are also graph inputs); newer opsets the IR version that opset needs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lfgraph.onnx_io import ort_max_opset

NEWEST_OPSET = onnx.defs.onnx_opset_version()
#: The newest opset the installed ONNX Runtime runs, asked of ORT itself.
ORT_OPSET = ort_max_opset()


def ir_for(opset: int) -> int:
    if opset <= 9:
        return 4
    return 13 if opset <= ORT_OPSET else onnx.IR_VERSION


class _Builder:
    """Collects nodes and initializers; names every node (or not) on request."""

    def __init__(self, opset: int, weights: str, seed: int, name_nodes: bool = True) -> None:
        self.opset, self.weights, self.name_nodes = opset, weights, name_nodes
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        self.count += 1
        outputs = outputs or [f"t{self.count}"]
        name = f"{op.lower()}_{self.count}" if self.name_nodes else ""
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def weight(self, name: str, w_in_out: np.ndarray) -> str:
        """A MatMul weight ``(in, out)`` in the builder's style."""
        w = w_in_out.astype(np.float32)
        if self.weights == "init":
            return self.const(name, w)
        if self.weights == "constant":
            return self.node("Constant", [], [name], value=numpy_helper.from_array(w, name + "_value"))
        if self.weights == "transpose":
            src = self.const(name, np.ascontiguousarray(w.T))
            return self.node("Transpose", [src], [name + "_t"], perm=[1, 0])
        raise ValueError(self.weights)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], ir_version: int | None = None) -> onnx.ModelProto:
        ir = ir_version or ir_for(self.opset)
        graph_inputs = list(inputs)
        if ir < 4:
            graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        g = helper.make_graph(self.nodes, "handmade", graph_inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=ir)
        onnx.checker.check_model(m, full_check=True)
        return m


def residual_mlp(
    opset: int = ORT_OPSET, weights: str = "init", blocks: int = 3, d: int = 8, hidden: int = 16, seed: int = 0,
    identical: bool = False, names: bool = True, ir_version: int | None = None, head: bool = True,
) -> onnx.ModelProto:
    """``x (2, d) → [x + W2·relu(W1·x + b1) + b2] × blocks → head Gemm``.

    With ``names`` the weights are ``layers.{k}.fc1.weight``-style initializers (as a
    PyTorch export names them); without, they are anonymous ``w{n}``. ``identical`` gives
    every block the same weights.
    """
    b = _Builder(opset, weights, seed, name_nodes=names)
    x = "x"
    base = None
    for k in range(blocks):
        if base is None or not identical:
            base = (
                b.rng.standard_normal((d, hidden)) * 0.3, b.rng.standard_normal(hidden) * 0.1,
                b.rng.standard_normal((hidden, d)) * 0.3, b.rng.standard_normal(d) * 0.1,
            )
        w1, b1, w2, b2 = base
        p = f"layers.{k}." if names else f"w{k}_"
        h = b.node("MatMul", [x, b.weight(p + ("fc1.weight" if names else "a"), w1)])
        h = b.node("Add", [h, b.const(p + ("fc1.bias" if names else "ab"), b1)])
        h = b.node("Relu", [h])
        h = b.node("MatMul", [h, b.weight(p + ("fc2.weight" if names else "b"), w2)])
        h = b.node("Add", [h, b.const(p + ("fc2.bias" if names else "bb"), b2)])
        x = b.node("Add", [x, h])
    if head:
        hw = b.const("head.weight" if names else "hw", b.rng.standard_normal((3, d)) * 0.3)
        hb = b.const("head.bias" if names else "hb", b.rng.standard_normal(3) * 0.1)
        b.node("Gemm", [x, hw, hb], ["y"], transB=1)
    else:
        b.node("Identity", [x], ["y"])
    out_dim = 3 if head else d
    return b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, out_dim])],
        ir_version,
    )


def residual_cnn(opset: int = ORT_OPSET, seed: int = 0, ir_version: int | None = None, names: bool = False) -> onnx.ModelProto:
    """A small ResNet: stem conv, two identity basic blocks (8 ch), one projection block
    (16 ch, stride 2, 1x1 shortcut), one identity block (16 ch), global pool, Gemm head.
    Conv-BN-Relu-Conv-BN, Add, Relu, as exporters write a basic block."""
    b = _Builder(opset, "init", seed, name_nodes=not names)
    n = [0]

    def param(tag: str, value: np.ndarray) -> str:
        n[0] += 1
        return b.const(f"{tag}{n[0]}", value)

    def conv(x: str, cin: int, cout: int, k: int, stride: int) -> str:
        w = param("w", b.rng.standard_normal((cout, cin, k, k)) * 0.2)
        return b.node("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)

    def bn(x: str, c: int) -> str:
        scale = param("bn_s", b.rng.random(c) + 0.5)
        bias = param("bn_b", b.rng.standard_normal(c) * 0.1)
        mean = param("bn_m", b.rng.standard_normal(c) * 0.1)
        var = param("bn_v", b.rng.random(c) + 0.5)
        return b.node("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5)

    def block(x: str, cin: int, cout: int, stride: int) -> str:
        h = b.node("Relu", [bn(conv(x, cin, cout, 3, stride), cout)])
        h = bn(conv(h, cout, cout, 3, 1), cout)
        skip = x if stride == 1 and cin == cout else bn(conv(x, cin, cout, 1, stride), cout)
        return b.node("Relu", [b.node("Add", [h, skip])])

    x = b.node("Relu", [bn(conv("x", 3, 8, 3, 1), 8)])
    x = block(x, 8, 8, 1)
    x = block(x, 8, 8, 1)
    x = block(x, 8, 16, 2)
    x = block(x, 16, 16, 1)
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x])
    b.node("Gemm", [x, param("fc_w", b.rng.standard_normal((4, 16)) * 0.3), param("fc_b", np.zeros(4))], ["y"], transB=1)
    return b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        ir_version,
    )


def plain_mlp(opset: int = ORT_OPSET, depth: int = 3, d: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Equal-width MatMul-Tanh layers with no skip connection: groups, but no blocks."""
    b = _Builder(opset, "init", seed)
    x = "x"
    for k in range(depth):
        x = b.node("Tanh", [b.node("MatMul", [x, b.weight(f"net.{k}.weight", b.rng.standard_normal((d, d)) * 0.3)])])
    b.node("Identity", [x], ["y"])
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, d])])


def single_layer(opset: int = ORT_OPSET) -> onnx.ModelProto:
    """One Gemm: nothing to compare it with."""
    b = _Builder(opset, "init", 0)
    b.node("Gemm", ["x", b.const("fc.weight", np.ones((3, 4))), b.const("fc.bias", np.zeros(3))], ["y"], transB=1)
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])


def with_custom_op(opset: int = ORT_OPSET) -> onnx.ModelProto:
    """A residual MLP whose head goes through an op from an unknown domain."""
    m = residual_mlp(opset)
    out = m.graph.output[0].name
    m.graph.node[-1].output[0] = "pre_custom"
    m.graph.node.append(helper.make_node("FancyActivation", ["pre_custom"], [out], name="fancy", domain="com.example.ops"))
    m.opset_import.append(helper.make_opsetid("com.example.ops", 1))
    return m


def failing_checker(opset: int = ORT_OPSET) -> onnx.ModelProto:
    """Parses, but a node reads a tensor nothing produces: ``onnx.checker`` refuses it."""
    m = residual_mlp(opset)
    m.graph.node[0].input[0] = "nowhere"
    return m


def export_torch(module, x, input_name: str, path: Path, **kwargs) -> Path:
    """``torch.onnx.export`` of ``module`` on ``x`` to ``path`` (exporter options in kwargs)."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=[input_name], output_names=["out"], verbose=False, **kwargs)
    return path
