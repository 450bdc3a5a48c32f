"""ONNX frontend: an ``.onnx`` file → :class:`LayerGraph`, read from the graph alone.

Deployment pipelines often hold only an ONNX file exported long ago by some tool, so
nothing here relies on a framework, a node-naming scheme or a particular exporter.

Weighted layers
    ``Conv``, ``Gemm`` and ``MatMul`` nodes whose weight input is constant: an initializer,
    a ``Constant`` node, or a constant subgraph (``Transpose``/``Identity``/``Cast``/
    ``ConstantOfShape``/… of constants). Each weight's constant subgraph is evaluated on
    its own with ``onnx.reference`` (the whole-graph ``fold_constants`` of
    onnx-graphsurgeon runs ONNX Runtime, which stops at opset 26, and serialises the
    graph, which stops at 2 GB). Weights are brought to the canonical layout of
    :mod:`lfgraph.graph`: ``MatMul`` ``(in, out)`` and ``Gemm`` with ``transB=0`` are
    transposed to ``(out, in)``; ``Gemm``'s ``alpha`` is folded into the weight.

Names (so that a model exported from PyTorch gets the names the PyTorch frontend gives)
    A layer is named by its weight initializer minus ``.weight`` when it has that form
    (what ``torch.onnx.export`` keeps), else by the module path a PyTorch exporter wrote
    down (the dynamo exporter's ``pkg.torch.onnx.name_scopes`` node metadata: it folds
    transposed weights into anonymous ``val_N`` initializers; the TorchScript exporter's
    ``/blocks/blocks.0/conv1/Conv`` node names: it renames folded weights
    ``onnx::Conv_N``), else by the node name, else by the weight tensor's name.
    ``LayerNode.ref`` is the node's *key*: its name when unique and non-empty, else
    ``"{op_type}#{index}"`` (see :func:`node_keys`); rewrite passes find the node again
    with the same function. Outside blocks a module-path layer's role is its path with
    numeric components wildcarded (as in the PyTorch frontend); any other layer's role is
    its op kind, so that layers of one op, weight shape and attributes are compatible.

Blocks (found from structure, never from names)
    A *residual unit* is an ``Add``/``Sum`` of two activations where one input is the
    unit's input ``x`` itself (identity skip; ``Identity``/``Dropout``/``Cast`` on the way
    allowed) or both descend from ``x`` and the shorter branch holds weighted nodes
    (projection skip). Its body is every node between ``x`` and the ``Add`` whose results
    stay inside (side computations shared by all layers, e.g. an attention mask computed
    from the first layer's input, are left out). Units follow each other along the
    residual stream, with single-input nodes in between (a post-norm ``LayerNorm``, the
    ``Relu`` after a ResNet addition) counted as the previous unit's tail. When the
    stream's units repeat with a period ``p`` (a transformer layer is an attention unit
    and an MLP unit), each ``p`` consecutive units form one block; repeated blocks are
    recognised as equal Weisfeiler-Lehman hashes and matched node for node with
    networkx's ``DiGraphMatcher``.

    A block is named by the longest common dotted prefix of its layers' names when that
    prefix ends in a number and belongs to this block alone (``model.layers.3``), else
    ``block{i}``; a layer's role inside a block is its name minus that prefix, else
    ``{op}{k}`` (the k-th weighted node of the block in topological order, carried to
    isomorphic blocks through the isomorphism).

Refused patterns (the node is simply not a layer, or the unit not a block): ``MatMul``
with a constant of rank > 2 or with the constant on the left, ``ConvTranspose``,
quantized ops (``QLinearConv``, ``MatMulInteger``), weights computed at run time, layers
inside ``If``/``Loop``/``Scan`` bodies, an ``Add`` whose skip branch has nodes but no
weights (e.g. rotary embeddings), ``Sum`` of more than two tensors, and ``Concat``-based
dense connections (DenseNet): they have no skip path that could be removed.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from ..errors import LfgraphError, NoCompatibleGroupsError, UnsupportedModelError
from ..graph import Block, HiddenSpace, LayerGraph, LayerNode
from .onnx_load import KNOWN_DOMAINS, all_tensors, load_onnx
from .onnx_structure import (
    CONV,
    BlockInfo,
    OnnxStructure,
    PermSpace,
    _size_of,
    analyze_onnx,
    block_roles,
    match_blocks,
    node_keys,
    node_scopes,
    outer_names,
    outside_role,
)

#: The ONNX frontend's public names (loading and structure live in their own modules).
__all__ = [
    "CONV", "KNOWN_DOMAINS", "BlockInfo", "OnnxStructure", "PermSpace", "all_tensors", "analyze_onnx", "block_roles",
    "build_layer_graph", "check_fusable", "load_onnx", "match_blocks", "node_keys", "node_scopes", "outer_names", "outside_role",
]


# --------------------------------------------------------------------------------------
# LayerGraph


def build_layer_graph(model: onnx.ModelProto, model_name: str = "", structure: OnnxStructure | None = None) -> LayerGraph:
    """The :class:`LayerGraph` of an ONNX model (see the module docstring for the rules).

    Expects a model that passed :func:`load_onnx`. Guarantees: every weighted node becomes
    one ``LayerNode`` with its weight copied in the canonical layout and ``ref`` set to its
    node key (:func:`node_keys`); blocks are found from structure alone; the model is not
    modified. Raises ``UnsupportedModelError`` when no weighted node exists.
    """
    st = structure or analyze_onnx(model)
    if not st.weighted:
        raise UnsupportedModelError(
            f"{model_name or 'the model'} has no Conv, Gemm or MatMul node with a constant weight: nothing to fuse"
        )
    order = {i: k for k, i in enumerate(sorted(st.weighted))}
    nodes = [
        LayerNode(
            name=st.layer_names[i], op=st.weighted[i].op, role="", weight=st.canonical_weight(i), bias=st.bias(i),
            block=None, order=order[i], attrs=dict(st.weighted[i].attrs), ref=st.keys[i],
        )
        for i in sorted(st.weighted)
    ]
    by_index = {i: nodes[order[i]] for i in st.weighted}
    roles = st.roles
    blocks: list[Block] = []
    for bi, b in enumerate(st.blocks):
        for i in b.members:
            by_index[i].block = bi
            by_index[i].role = roles[i]
        kind = "|".join(sorted(f"{roles[i]}:{by_index[i].weight.shape}" for i in b.members)) + f"|{b.skip}|{b.hash[:12]}"
        hidden = [_public_space(st, b, s, roles) for s in b.spaces]
        blocks.append(Block(index=bi, name=b.name, members=[st.layer_names[i] for i in b.members], skip=b.skip, kind=kind, hidden=hidden))
    for i, n in by_index.items():
        if n.block is None:
            n.role = outside_role(st, i)
    return LayerGraph(nodes=nodes, blocks=blocks, source="onnx", model_name=model_name or st.graph.name, total_params=_parameter_count(st))


def _public_space(st: OnnxStructure, b: BlockInfo, s: PermSpace, roles: dict[int, str]) -> HiddenSpace:
    tensors = []
    for j, slot, axis in s.params:
        if j in st.weighted and slot == st.weighted[j].weight_slot:
            label = f"{roles.get(j, st.keys[j])}.weight"
        elif j in st.weighted and st.weighted[j].bias == (j, slot):
            label = f"{roles.get(j, st.keys[j])}.bias"
        else:
            t = st.nodes[j].input[slot]
            label = t[len(b.name) + 1 :] if t.startswith(b.name + ".") else t
        tensors.append((label, axis))
    return HiddenSpace(size=s.size, tensors=tensors)


def _parameter_count(st: OnnxStructure) -> int:
    """Elements of the floating-point constants the compute nodes read, each stored tensor
    counted once (a transposed or cast weight counts as its source initializer), without
    BatchNorm running statistics (buffers, not parameters, as ``nn.Module.parameters``
    counts them) and without scalars. Other buffers an exporter stores as constants
    (rotary tables) are counted: the graph cannot tell them from parameters."""
    stats = {n.input[s] for n in st.nodes if n.op_type == "BatchNormalization" for s in (3, 4) if len(n.input) > s}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    counted: set[str] = set()
    total = 0
    for i in (x for x in st.act.nodes if isinstance(x, int)):
        for t in st.nodes[i].input:
            if not t or t not in st.const or t in stats:
                continue
            sources = [s for s in st.const_sources(t) if _is_float_const(st, s, floats)]
            for name in sources or ([t] if _is_float_const(st, t, floats) else []):
                size = _size_of(st, name)
                if name not in counted and size > 1:  # scalars (eps, scales) are no parameters
                    counted.add(name)
                    total += size
    return total


def _is_float_const(st: OnnxStructure, t: str, floats: tuple[int, ...]) -> bool:
    if t in st.inits:
        return st.inits[t].data_type in floats
    try:
        return bool(np.issubdtype(st.value(t).dtype, np.floating))
    except Exception:
        return False


def check_fusable(graph: LayerGraph, mode: str) -> None:
    """Refuse a graph that ``mode`` cannot compress, with one clear line.

    ``tie`` needs a compatible group (two layers of one op, role and shape); ``merge``
    needs at least two blocks with an identity skip of one kind.
    """
    if not graph.groups():
        raise NoCompatibleGroupsError(
            f"{graph.model_name or 'the model'} has no two layers of the same op, role and weight shape: "
            "nothing can be fused (layer fusion needs repeated layers)"
        )
    if mode == "merge":
        kinds = Counter(b.kind for b in graph.removable_blocks())
        if not graph.blocks:
            raise LfgraphError(
                f"{graph.model_name or 'the model'} has no residual blocks (no Add joining a path with its skip connection): "
                "merge cannot remove any; share weights instead with --mode tie --target-kind params"
            )
        if not kinds or max(kinds.values()) < 2:
            raise LfgraphError(
                f"{graph.model_name or 'the model'} has no two residual blocks of one structure with an identity skip: "
                "merge cannot remove any; share weights instead with --mode tie --target-kind params"
            )
