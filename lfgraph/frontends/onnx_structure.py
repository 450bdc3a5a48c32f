"""The structure of an ONNX graph, found from the graph alone (never from names): weighted
layers, constants folded, residual units and repeated blocks (subgraph isomorphism with
networkx), layer names and roles, and hidden spaces for neuron alignment. See
:mod:`lfgraph.frontends.onnx_graph` for the whole picture."""

from __future__ import annotations

import ast
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import numpy as np
import onnx
from networkx.algorithms.isomorphism import DiGraphMatcher
from onnx import helper, numpy_helper

from ..graph import CONV, LINEAR

#: Ops that pass a tensor through unchanged in value: a skip path made only of these is
#: still the identity.
NOOP_OPS = frozenset({"Identity", "Dropout", "Cast"})
#: Ops never folded even when their inputs are constant (results differ per run).
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})
#: Elementwise ops through which a hidden unit keeps its identity (neuron alignment).
_UNARY_ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Swish", "Tanh", "Erf",
    "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Cast", "Neg", "Abs", "Exp", "Clip",
})
_BINARY_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum"})
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_TORCH_SCOPES = "pkg.torch.onnx.name_scopes"


# --------------------------------------------------------------------------------------
# Structure


def node_keys(graph: onnx.GraphProto) -> list[str]:
    """A stable key per node of ``graph``: its name when unique and non-empty, else
    ``"{op_type}#{index}"``. The same model always gives the same keys."""
    counts = Counter(n.name for n in graph.node)
    return [n.name if n.name and counts[n.name] == 1 else f"{n.op_type}#{i}" for i, n in enumerate(graph.node)]


@dataclass
class WeightedOp:
    """A ``Conv``/``Gemm``/``MatMul`` node with a constant weight.

    ``out_axis``/``in_axis`` say where the output and input units lie in the weight *as
    the node consumes it*; ``scale`` is Gemm's ``alpha`` (effective weight = stored ×
    scale); ``bias`` is ``(node index, input slot)`` of the bias constant (the node itself
    for Conv/Gemm, the following ``Add`` for MatMul) with Gemm's ``beta`` in
    ``bias_scale``.
    """

    index: int
    op: str
    weight_slot: int
    out_axis: int
    in_axis: int
    scale: float = 1.0
    bias: tuple[int, int] | None = None
    bias_scale: float = 1.0
    attrs: dict[str, Any] = field(default_factory=dict)
    groups: int = 1


@dataclass
class PermSpace:
    """A permutable hidden space of a block, in ONNX terms (see ``HiddenSpace``).

    ``params`` lists ``(node index, input slot, axis)`` of every constant indexed by the
    hidden units: producers' weights (output axis) and biases, per-channel constants met
    on the way (bias ``Add``, ``BatchNormalization`` parameters), the consumer's weight
    (input axis). Scalars met on the way need no permuting and are not listed.
    """

    size: int
    producers: list[int]
    consumer: int
    params: list[tuple[int, int, int]]


@dataclass
class ResidualUnit:
    add: int
    input: str
    output: str
    nodes: set[int]
    skip: str
    tail: list[int] = field(default_factory=list)
    walk: list[int] = field(default_factory=list)
    next: "ResidualUnit | None" = None


@dataclass
class BlockInfo:
    """A block in ONNX terms: its nodes, the tensor it reads and the tensor it produces."""

    name: str
    input: str
    output: str
    nodes: set[int]
    skip: str
    members: list[int]
    hash: str
    spaces: list[PermSpace] = field(default_factory=list)


class OnnxStructure:
    """The analysed graph: constants, the activation graph, weighted nodes and blocks.

    Built by :func:`analyze_onnx`; read by :func:`build_layer_graph` and by
    ``lfgraph.passes.rewrite_onnx``. The model is never modified.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.keys = node_keys(self.graph)
        self.key_index = {k: i for i, k in enumerate(self.keys)}
        self.inits = {t.name: t for t in self.graph.initializer}
        self.inputs = [i.name for i in self.graph.input if i.name not in self.inits]
        self.outputs = {o.name for o in self.graph.output}
        self.const: set[str] = set(self.inits)
        self.const_producer: dict[str, int] = {}
        self.producer: dict[str, int | str] = {n: f"input:{n}" for n in self.inputs}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.act = nx.MultiDiGraph()
        self.weighted: dict[int, WeightedOp] = {}
        self.blocks: list[BlockInfo] = []
        self.layer_names: dict[int, str] = {}
        self.roles: dict[int, str] = {}
        self.module_named: set[int] = set()
        self._values: dict[str, np.ndarray] = {}
        self._dtypes = _declared_types(model)
        self._shapes: dict[str, list[int | None]] | None = None
        self._labels: dict[int, str] = {}

    # constants ---------------------------------------------------------------------

    def is_const(self, name: str) -> bool:
        return name in self.const

    def value(self, name: str) -> np.ndarray:
        """The value of a constant tensor (an initializer, or folded from its subgraph)."""
        if name in self._values:
            return self._values[name]
        if name in self.inits:
            val = numpy_helper.to_array(self.inits[name])
        else:
            val = self._fold(name)
        self._values[name] = val
        return val

    def _fold(self, name: str) -> np.ndarray:
        from onnx.reference import ReferenceEvaluator

        needed: set[int] = set()
        feeds: dict[str, np.ndarray] = {}
        inits: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            if t in self.inits:
                inits.add(t)
                continue
            j = self.const_producer.get(t)
            if j is None:
                # a CastLike's "like" input: only its element type matters
                feeds[t] = np.zeros((0,), dtype=helper.tensor_dtype_to_np_dtype(self._dtypes.get(t, onnx.TensorProto.FLOAT)))
                continue
            if j in needed:
                continue
            needed.add(j)
            stack.extend(x for x in self.nodes[j].input if x)
        g = helper.make_graph(
            [self.nodes[j] for j in sorted(needed)], "fold",
            [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(v.dtype), None) for t, v in feeds.items()],
            [onnx.ValueInfoProto(name=name)],
        )
        for t in sorted(inits):
            # add + CopyFrom, not extend: protobuf serialises what extend copies, which
            # fails for a tensor over 2 GB
            g.initializer.add().CopyFrom(self.inits[t])
        m = helper.make_model(g, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        m.functions.extend(self.model.functions)
        return np.asarray(ReferenceEvaluator(m).run(None, feeds)[0])

    def const_sources(self, name: str) -> list[str]:
        """Initializers and ``Constant`` outputs a constant tensor is computed from."""
        out, seen, stack = [], set(), [name]
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            j = self.const_producer.get(t)
            if t in self.inits or (j is not None and self.nodes[j].op_type == "Constant"):
                out.append(t)
            elif j is not None:
                stack.extend(x for x in self.nodes[j].input if x and x in self.const)
        return out

    def shapes(self) -> dict[str, list[int | None]]:
        """Static tensor shapes from ONNX shape inference (empty for models over 2 GB)."""
        if self._shapes is None:
            self._shapes = {}
            try:
                # in-memory inference serialises the model: impossible over 2 GB
                small = sum(int(np.prod(t.dims)) * 8 for t in self.graph.initializer) < 2**31 - 2**26
                inferred = onnx.shape_inference.infer_shapes(self.model) if small else self.model
            except Exception:
                inferred = self.model
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                tt = vi.type.tensor_type
                if tt.HasField("shape"):
                    self._shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        return self._shapes

    # activations --------------------------------------------------------------------

    def act_inputs(self, i: int) -> list[tuple[int, str]]:
        """(slot, tensor) of node ``i``'s non-constant inputs."""
        return [(s, t) for s, t in enumerate(self.nodes[i].input) if t and t not in self.const]

    def act_consumers(self, t: str) -> list[int]:
        return sorted({i for i, _ in self.consumers.get(t, [])})

    def reach(self, t: str) -> set[int]:
        """Nodes downstream of tensor ``t`` in the activation graph."""
        out: set[int] = set()
        for c in self.act_consumers(t):
            if c not in out:
                out.add(c)
                out |= nx.descendants(self.act, c)
        return out

    def canonical_weight(self, i: int) -> np.ndarray:
        w = self.weighted[i]
        arr = self.value(self.nodes[i].input[w.weight_slot]).astype(np.float32)
        if w.op == LINEAR and w.out_axis == 1:
            arr = arr.T
        return np.ascontiguousarray(arr * np.float32(w.scale) if w.scale != 1.0 else arr)

    def bias(self, i: int) -> np.ndarray | None:
        w = self.weighted[i]
        if w.bias is None:
            return None
        j, slot = w.bias
        b = self.value(self.nodes[j].input[slot]).astype(np.float32).reshape(-1)
        return b * np.float32(w.bias_scale) if w.bias_scale != 1.0 else b

    def label(self, i: int) -> str:
        """What a node must share with its counterpart in an isomorphic block."""
        if i not in self._labels:
            self._labels[i] = self._label(i)
        return self._labels[i]

    def _label(self, i: int) -> str:
        n = self.nodes[i]
        parts = [n.domain, n.op_type]
        for a in sorted(n.attribute, key=lambda a: a.name):
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                parts.append(f"{a.name}=<graph>")
            elif a.type == onnx.AttributeProto.TENSOR:
                parts.append(f"{a.name}=tensor{list(a.t.dims)}")
            else:
                parts.append(f"{a.name}={helper.get_attribute_value(a)!r}")
        for s, t in enumerate(n.input):
            if t and t in self.const:
                parts.append(f"c{s}:{self._const_shape(t)}")
        if i in self.weighted:
            w = self.weighted[i]
            shape = self.value(n.input[w.weight_slot]).shape
            parts.append(f"w{shape if w.op == CONV or w.out_axis == 0 else shape[::-1]}")
        return "|".join(parts)

    def _const_shape(self, t: str) -> str:
        # read, never evaluated: a label must not depend on what was folded before
        if t in self.inits:
            return str(list(self.inits[t].dims))
        j = self.const_producer.get(t)
        if j is not None and self.nodes[j].op_type == "Constant":
            for a in self.nodes[j].attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    return str(list(a.t.dims))
        shape = self.shapes().get(t)
        return str(shape) if shape is not None else "?"

    def subgraph(self, nodes: Iterable[int], roles: dict[int, str] | None = None) -> nx.DiGraph:
        """The induced activation subgraph with node ``label`` and edge ``slot`` attributes."""
        nodes = set(nodes)
        h = nx.DiGraph()
        for i in sorted(nodes):
            extra = f"|role={roles[i]}" if roles and i in roles else ""
            h.add_node(i, label=self.label(i) + extra)
        for u, v, d in self.act.edges(data=True):
            if u in nodes and v in nodes:
                slots = h.edges[u, v]["slot"] + "," if h.has_edge(u, v) else ""
                h.add_edge(u, v, slot=slots + str(d["slot"]))
        return h


def _declared_types(model: onnx.ModelProto) -> dict[str, int]:
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def analyze_onnx(model: onnx.ModelProto) -> OnnxStructure:
    """Find constants, weighted nodes, residual blocks and their hidden spaces.

    Expects a model that passed :func:`load_onnx` (or ``onnx.checker``): nodes in
    topological order. Deterministic: the same model always gives the same structure.
    The model is not modified.
    """
    st = OnnxStructure(model)
    _find_constants(st)
    _build_activation_graph(st)
    _find_weighted(st)
    units = _residual_units(st)
    _link_units(st, units)
    st.blocks = _blocks_from_units(st, units)
    _name_layers(st)
    st.roles = block_roles(st)
    for b in st.blocks:
        b.spaces = _hidden_spaces(st, b)
    return st


def _sub_attrs(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _find_constants(st: OnnxStructure) -> None:
    for j, n in enumerate(st.nodes):
        std = n.domain in ("", "ai.onnx")
        if n.op_type == "Constant" and std:
            is_const = True
        elif not std or n.op_type in _NONDETERMINISTIC or _sub_attrs(n) or not any(n.input):
            is_const = False
        else:
            data = [n.input[0]] if n.op_type == "CastLike" else [x for x in n.input if x]
            is_const = all(x in st.const for x in data)
        if is_const:
            for o in n.output:
                if o:
                    st.const.add(o)
                    st.const_producer[o] = j


def outer_names(node: onnx.NodeProto) -> set[str]:
    """Tensors a node's subgraphs read from the enclosing scope (implicit inputs)."""
    used: set[str] = set()
    defined: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            defined |= {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                used |= {x for x in n.input if x}
                used |= outer_names(n)
                defined |= {o for o in n.output if o}
    return used - defined


def _build_activation_graph(st: OnnxStructure) -> None:
    for name in st.inputs:
        st.act.add_node(st.producer[name])
    for i, n in enumerate(st.nodes):
        if all(o in st.const for o in n.output if o) and any(n.output):
            continue
        st.act.add_node(i)
        slots = [(s, t) for s, t in enumerate(n.input) if t] + [(-1, t) for t in sorted(outer_names(n))]
        for s, t in slots:
            if t in st.const or t not in st.producer:
                continue
            st.act.add_edge(st.producer[t], i, slot=s)
            st.consumers[t].append((i, s))
        for o in n.output:
            if o:
                st.producer[o] = i


def _find_weighted(st: OnnxStructure) -> None:
    for i in (x for x in st.act.nodes if isinstance(x, int)):
        n = st.nodes[i]
        if n.domain not in ("", "ai.onnx") or n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        x, w = n.input[0], n.input[1]
        if x in st.const or w not in st.const:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        try:
            value = st.value(w)
        except Exception:
            continue  # a constant the reference evaluator cannot fold: not a layer
        if not np.issubdtype(value.dtype, np.floating):
            continue
        if n.op_type == "Conv" and value.ndim >= 3:
            k = value.ndim - 2
            op = WeightedOp(i, CONV, 1, 0, 1, groups=int(attrs.get("group", 1)))
            pads = list(attrs.get("pads", [0] * (2 * k)))
            auto_pad = attrs.get("auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                padding: Any = auto_pad.lower()
            elif auto_pad == "VALID":
                padding = (0,) * k
            else:
                padding = tuple(pads[:k]) if pads[:k] == pads[k:] else tuple(pads)
            op.attrs = {
                "stride": tuple(int(s) for s in attrs.get("strides", [1] * k)),
                "padding": padding,
                "dilation": tuple(int(d) for d in attrs.get("dilations", [1] * k)),
                "groups": op.groups,
            }
            if len(n.input) > 2 and n.input[2] and n.input[2] in st.const:
                op.bias = (i, 2)
        elif n.op_type == "Gemm" and value.ndim == 2 and not attrs.get("transA", 0):
            trans_b = int(attrs.get("transB", 0))
            op = WeightedOp(i, LINEAR, 1, 0 if trans_b else 1, 1 if trans_b else 0, scale=float(attrs.get("alpha", 1.0)))
            if len(n.input) > 2 and n.input[2] and n.input[2] in st.const:
                op.bias, op.bias_scale = (i, 2), float(attrs.get("beta", 1.0))
        elif n.op_type == "MatMul" and value.ndim == 2:
            op = WeightedOp(i, LINEAR, 1, 1, 0)
            op.bias = _matmul_bias(st, i, value.shape[1])
        else:
            continue
        if op.bias is not None:
            j, slot = op.bias
            b = st.value(st.nodes[j].input[slot])
            if b.size != value.shape[op.out_axis] or not np.any(b):
                op.bias = None  # an all-zero bias is no bias (exporters write zeros for none)
        st.weighted[i] = op


def _matmul_bias(st: OnnxStructure, i: int, out: int) -> tuple[int, int] | None:
    """``(Add node, slot)`` when MatMul's only consumer adds a constant vector of size ``out``."""
    y = st.nodes[i].output[0]
    cons = st.act_consumers(y)
    if len(cons) != 1 or y in st.outputs:
        return None
    c = st.nodes[cons[0]]
    if c.op_type != "Add" or len(c.input) != 2:
        return None
    slot = 1 if c.input[0] == y else 0
    other = c.input[slot]
    if other not in st.const:
        return None
    try:
        shape = st.value(other).shape
    except Exception:
        return None
    if int(np.prod(shape)) != out or (shape and shape[-1] != out):
        return None
    return cons[0], slot


def _residual_units(st: OnnxStructure) -> list[ResidualUnit]:
    units = []
    for v in (x for x in st.act.nodes if isinstance(x, int)):
        n = st.nodes[v]
        if n.op_type not in ("Add", "Sum") or n.domain not in ("", "ai.onnx"):
            continue
        acts = st.act_inputs(v)
        if len(acts) != 2 or len(n.input) != 2 or acts[0][1] == acts[1][1]:
            continue
        unit = _unit_at(st, v, acts[0][1], acts[1][1])
        if unit is not None:
            units.append(unit)
    # a residual inside another unit (an inner skip) is part of that unit, not a block
    units.sort(key=lambda u: (-len(u.nodes), u.add))
    kept: list[ResidualUnit] = []
    for u in units:
        if not any(u.nodes & k.nodes for k in kept):
            kept.append(u)
    kept.sort(key=lambda u: u.add)
    return kept


def _unit_at(st: OnnxStructure, v: int, ta: str, tb: str) -> ResidualUnit | None:
    pa, pb = st.producer[ta], st.producer[tb]
    anc_a = nx.ancestors(st.act, pa) | {pa}
    anc_b = nx.ancestors(st.act, pb) | {pb}
    if pa in anc_b and pa != pb:
        x, skip_branch = ta, set()
    elif pb in anc_a and pa != pb:
        x, skip_branch = tb, set()
    else:
        common = [c for c in anc_a & anc_b if isinstance(c, int) or c.startswith("input:")]
        if not common:
            return None
        c = max(common, key=_pos)
        outs = [o for o in st.nodes[c].output if o] if isinstance(c, int) else [c[len("input:"):]]
        if len(outs) != 1:
            return None
        x = outs[0]
        down = st.reach(x)
        branch_a, branch_b = down & anc_a, down & anc_b
        wa, wb = branch_a & st.weighted.keys(), branch_b & st.weighted.keys()
        skip_branch = branch_b if (len(wa), len(branch_a)) >= (len(wb), len(branch_b)) else branch_a
    body = (st.reach(x) & nx.ancestors(st.act, v)) | {v}
    body = _closed(st, body, v)
    main = body - skip_branch
    if not (main & st.weighted.keys()):
        return None
    if not skip_branch:
        skip = "identity"
    elif skip_branch & st.weighted.keys():
        skip = "projection"
    elif all(st.nodes[j].op_type in NOOP_OPS for j in skip_branch):
        skip = "identity"
    else:
        return None  # the skip branch computes something without weights (e.g. rotary)
    if not skip_branch <= body:
        return None
    return ResidualUnit(add=v, input=x, output=st.nodes[v].output[0], nodes=body, skip=skip)


def _pos(node: int | str) -> int:
    return node if isinstance(node, int) else -1


def _closed(st: OnnxStructure, body: set[int], v: int) -> set[int]:
    """Drop nodes whose results are also used outside: they are shared side computations."""
    body = set(body)
    changed = True
    while changed:
        changed = False
        for j in sorted(body, reverse=True):
            if j == v:
                continue
            outs = [o for o in st.nodes[j].output if o]
            if any(o in st.outputs for o in outs) or any(s not in body for s in st.act.successors(j)):
                body.discard(j)
                changed = True
    return body


def _single_input_step(st: OnnxStructure, t: str, taken: set[int]) -> int | None:
    """The one node that consumes ``t``, when it has one activation input and one output."""
    if t in st.outputs:
        return None
    cons = st.act_consumers(t)
    if len(cons) != 1 or cons[0] in taken:
        return None
    c = cons[0]
    n = st.nodes[c]
    if len(st.act_inputs(c)) != 1 or len([o for o in n.output if o]) != 1:
        return None
    return c


def _link_units(st: OnnxStructure, units: list[ResidualUnit]) -> None:
    """Chain units along the residual stream; nodes between two units are the first's tail."""
    by_input: dict[str, ResidualUnit] = {}
    for u in units:
        by_input.setdefault(u.input, u)
    taken = set().union(*(u.nodes for u in units)) if units else set()
    for u in units:
        t, walk = u.output, []
        while True:
            nxt = by_input.get(t)
            if nxt is not None and nxt is not u and nxt.add > u.add:
                u.next = nxt
                break
            c = _single_input_step(st, t, taken)
            if c is None:
                break
            walk.append(c)
            t = st.nodes[c].output[0]
        u.walk = walk
        if u.next is not None:
            u.tail = walk
    # a unit that ends the stream keeps the tail its repeated siblings have
    body_hash = {id(u): _wl_hash(st, u.nodes) for u in units}
    for u in units:
        if u.next is not None:
            continue
        tails = Counter(
            tuple(st.nodes[j].op_type for j in p.tail) for p in units
            if p.next is not None and body_hash[id(p)] == body_hash[id(u)]
        )
        if tails:
            ops = tails.most_common(1)[0][0]
            if tuple(st.nodes[j].op_type for j in u.walk[: len(ops)]) == ops:
                u.tail = u.walk[: len(ops)]


def _wl_hash(st: OnnxStructure, nodes: set[int]) -> str:
    with warnings.catch_warnings():
        # networkx 3.5 warns that directed hashes changed; hashes are only compared within one run
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(st.subgraph(nodes), node_attr="label", edge_attr="slot")


def _blocks_from_units(st: OnnxStructure, units: list[ResidualUnit]) -> list[BlockInfo]:
    firsts = [u for u in units if not any(p.next is u for p in units)]
    blocks: list[BlockInfo] = []
    for first in firsts:
        chain = [first]
        while chain[-1].next is not None:
            chain.append(chain[-1].next)
        sigs = [_wl_hash(st, u.nodes | set(u.tail)) for u in chain]
        period = _period(sigs)
        for k in range(0, len(chain), period):
            group = chain[k : k + period]
            nodes = set().union(*(u.nodes | set(u.tail) for u in group))
            last = group[-1]
            output = st.nodes[last.tail[-1]].output[0] if last.tail else last.output
            members = sorted(nodes & st.weighted.keys())
            skip = "projection" if any(u.skip == "projection" for u in group) else "identity"
            blocks.append(BlockInfo("", group[0].input, output, nodes, skip, members, _wl_hash(st, nodes)))
    blocks.sort(key=lambda b: min(b.members))
    return blocks


def _period(sigs: list[str]) -> int:
    """Smallest p > 1 with which the unit sequence repeats exactly (at least twice), else 1."""
    n = len(sigs)
    if len(set(sigs)) == 1:
        return 1
    for p in range(2, n // 2 + 1):
        if n % p == 0 and all(sigs[i] == sigs[i % p] for i in range(n)):
            return p
    return 1


# --------------------------------------------------------------------------------------
# Names and roles


def node_scopes(node: onnx.NodeProto) -> list[str] | None:
    """The module scopes the torch exporter recorded on ``node`` (outermost first), or
    ``None`` when it recorded none (other exporters) or they cannot be read."""
    for prop in node.metadata_props:
        if prop.key == _TORCH_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return [str(x) for x in scopes] if isinstance(scopes, list) else None
    return None


def _torch_scope(node: onnx.NodeProto) -> str | None:
    scopes = node_scopes(node)
    return scopes[-2] if scopes and len(scopes) >= 2 and scopes[-2] else None


def _legacy_scope(node: onnx.NodeProto) -> str | None:
    """The module path in a name the TorchScript exporter writes (``/encoder/layer.0/fc/MatMul``)."""
    parts = node.name.split("/")
    if len(parts) < 3 or parts[0] or not parts[-1].startswith(node.op_type) or not all(parts[1:-1]):
        return None
    path: list[str] = []
    for comp in parts[1:-1]:
        # a container's child is written "blocks/blocks.0": the second refines the first
        if path and comp.startswith(path[-1] + "."):
            path[-1] = comp
        else:
            path.append(comp)
    return ".".join(path)


def _name_layers(st: OnnxStructure) -> None:
    uses: Counter[str] = Counter()
    sources: dict[int, str | None] = {}
    for i, w in st.weighted.items():
        t = st.nodes[i].input[w.weight_slot]
        size = st.value(t).size
        cands = [s for s in st.const_sources(t) if _size_of(st, s) == size]
        sources[i] = cands[0] if len(cands) == 1 else None
        if sources[i]:
            uses[sources[i]] += 1
    used: set[str] = set()
    for i in sorted(st.weighted):
        n = st.nodes[i]
        src = sources[i]
        module_paths = [src[: -len(".weight")] if src and src.endswith(".weight") and uses[src] == 1 else None, _torch_scope(n), _legacy_scope(n)]
        others = [n.name, src if src and uses[src] == 1 else None, st.keys[i]]
        name = next((c for c in module_paths + others if c and c not in used), f"{st.keys[i]}@{i}")
        used.add(name)
        st.layer_names[i] = name
        if name in module_paths:
            st.module_named.add(i)


def _size_of(st: OnnxStructure, t: str) -> int:
    if t in st.inits:
        return int(np.prod(st.inits[t].dims)) if st.inits[t].dims else 1
    try:
        return int(st.value(t).size)
    except Exception:
        return -1


def _block_prefix(names: list[str], others: list[str]) -> str | None:
    parts = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for comps in zip(*parts):
        if len(set(comps)) != 1:
            break
        prefix.append(comps[0])
    if not prefix or not prefix[-1].isdigit():
        return None
    p = ".".join(prefix)
    if any(o.startswith(p + ".") for o in others):
        return None
    return p


# --------------------------------------------------------------------------------------
# Hidden spaces (neuron alignment)


def _hidden_spaces(st: OnnxStructure, block: BlockInfo) -> list[PermSpace]:
    spaces: list[PermSpace] = []
    claimed: set[int] = set()
    for c in block.members:
        space = _space_into(st, block, c)
        if space is None or claimed & set(space.producers):
            continue
        claimed |= set(space.producers)
        spaces.append(space)
    return spaces


def _space_into(st: OnnxStructure, block: BlockInfo, c: int) -> PermSpace | None:
    """The hidden space read by weighted node ``c``, or ``None`` when its input units are
    visible elsewhere (a residual, attention heads, a reshape that mixes features)."""
    wc = st.weighted[c]
    if wc.groups != 1:
        return None
    size = st.canonical_weight(c).shape[1]
    params = [(c, wc.weight_slot, wc.in_axis)]
    producers: list[int] = []
    path: set[int] = set()
    stack, seen = [st.nodes[c].input[0]], set()
    shapes = None
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        p = st.producer.get(t)
        if not isinstance(p, int) or p not in block.nodes:
            return None
        n = st.nodes[p]
        if p in st.weighted and t == n.output[0]:
            wp = st.weighted[p]
            if wp.op != wc.op or wp.groups != 1 or p == c or st.canonical_weight(p).shape[0] != size:
                return None
            producers.append(p)
            params.append((p, wp.weight_slot, wp.out_axis))
            if wp.bias is not None and wp.bias[0] == p:
                # Conv's bias is 1-D; Gemm's C broadcasts along its last axis
                params.append((p, wp.bias[1], 0 if wp.op == CONV else st.value(n.input[wp.bias[1]]).ndim - 1))
            continue
        op = n.op_type
        if op in _UNARY_ELEMENTWISE:
            stack.append(n.input[0])
            scalar_slots = range(1, len(n.input))
        elif op in _BINARY_ELEMENTWISE:
            scalar_slots = []
            for s, x in enumerate(n.input):
                if not x:
                    continue
                if x in st.const:
                    axis = _channel_axis(st.value(x).shape, size, wc)
                    if axis is None:
                        return None
                    if axis >= 0:
                        params.append((p, s, axis))
                else:
                    stack.append(x)
        elif op == "BatchNormalization" and wc.op == CONV and len([o for o in n.output if o]) == 1:
            stack.append(n.input[0])
            params.extend((p, s, 0) for s in range(1, 5))
            scalar_slots = []
        elif op in _RESHAPES and wc.op == LINEAR:
            shapes = shapes if shapes is not None else st.shapes()
            before, after = shapes.get(n.input[0]), shapes.get(n.output[0])
            if not before or not after or before[-1] != size or after[-1] != size:
                return None
            stack.append(n.input[0])
            scalar_slots = []
        else:
            return None
        for s in scalar_slots:
            x = n.input[s]
            if x and (x not in st.const or st.value(x).size != 1):
                return None
        path.add(p)
    if not producers:
        return None
    inside = path | set(producers)
    for j in inside:
        for o in st.nodes[j].output:
            if o in st.outputs:
                return None
        if any(s not in inside and s != c for s in st.act.successors(j)):
            return None
    if any(s != 0 for s in (d["slot"] for _, _, d in st.act.in_edges(c, data=True))):
        return None
    return PermSpace(size=int(size), producers=sorted(producers), consumer=c, params=params)


def _channel_axis(shape: tuple[int, ...], size: int, wc: WeightedOp) -> int | None:
    """Axis of a broadcast constant that runs along the hidden units: ``-1`` for a scalar,
    ``None`` when the constant varies along another axis (then units cannot move)."""
    total = int(np.prod(shape)) if shape else 1
    if total == 1:
        return -1
    if total != size:
        return None
    if wc.op == LINEAR:
        return len(shape) - 1 if shape[-1] == size else None
    # activations are (N, C, spatial...): the channel axis is 1 once right-aligned
    rank = 2 + (len(wc.attrs.get("stride", ())) or 2)
    axis = 1 - (rank - len(shape))
    return axis if 0 <= axis < len(shape) and shape[axis] == size else None


def outside_role(st: OnnxStructure, i: int) -> str:
    """Role of a layer outside blocks.

    A module path (from a PyTorch exporter) gets the PyTorch frontend's role: the path with
    numeric components wildcarded (``features.3`` → ``features.*``). Any other name says
    nothing about what the layer does, so the role is the op kind alone: layers of one op,
    weight shape and attributes are then compatible, as in a plain stack.
    """
    if i in st.module_named:
        return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", st.layer_names[i])
    return st.nodes[i].op_type.lower()


def block_roles(st: OnnxStructure) -> dict[int, str]:
    """Role of every weighted node inside a block; also sets ``BlockInfo.name``.

    Corresponding layers of isomorphic blocks get equal roles: by name when the blocks are
    named after a common prefix, else through the isomorphism to the first block of the
    same structure.
    """
    roles: dict[int, str] = {}
    all_names = {i: st.layer_names[i] for i in st.weighted}
    prefixes = []
    for b in st.blocks:
        others = [all_names[i] for i in st.weighted if i not in b.members]
        prefixes.append(_block_prefix([all_names[i] for i in b.members], others))
    named = [p for p in prefixes if p]
    unique = len(named) == len(set(named))
    reps: dict[str, BlockInfo] = {}
    for k, (b, p) in enumerate(zip(st.blocks, prefixes)):
        if p and unique:
            b.name = p
            for i in b.members:
                roles[i] = all_names[i][len(p) + 1 :]
            continue
        b.name = f"block{k}"
        structural = {i: f"{st.nodes[i].op_type.lower()}{n}" for n, i in enumerate(b.members)}
        rep = reps.setdefault(b.hash, b)
        mapping = match_blocks(st, rep, b) if rep is not b else None
        for i in b.members:
            roles[i] = structural[i]
        if mapping:
            for i in rep.members:
                if mapping.get(i) in structural:
                    roles[mapping[i]] = roles[i]
    return roles


def match_blocks(st: OnnxStructure, a: BlockInfo, b: BlockInfo, roles: dict[int, str] | None = None) -> dict[int, int] | None:
    """Node-for-node isomorphism from block ``a`` to block ``b`` (labels and input slots
    equal; with ``roles``, weighted nodes only match nodes of the same role), or ``None``."""
    ga, gb = st.subgraph(a.nodes, roles), st.subgraph(b.nodes, roles)
    if ga.number_of_nodes() != gb.number_of_nodes():
        return None
    gm = DiGraphMatcher(ga, gb, node_match=lambda x, y: x["label"] == y["label"], edge_match=lambda x, y: x["slot"] == y["slot"])
    for mapping in gm.isomorphisms_iter():
        return dict(mapping)
    return None
