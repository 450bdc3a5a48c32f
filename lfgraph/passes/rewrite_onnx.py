"""ONNX rewrite passes: apply a :class:`FusionPlan` to an ``onnx.ModelProto``.

- ``tie``: every fused node reads ONE shared initializer holding the mean of the members'
  weights (and of their biases when all have one), in the layout the node consumes (a
  member that consumes the other layout reads it through one shared ``Transpose``).
  Weights behind a constant subgraph (``Transpose``, ``Cast``, ``Constant``…) are
  replaced at the node's input, and the orphaned subgraphs and initializers are removed.
- ``merge``: for each fused set of blocks the kept block's constants become new
  initializers (``fuse="mean"``: the mean over the blocks of every floating-point constant
  the block's nodes read — weights, biases, norm parameters, BatchNorm statistics — after
  neuron alignment when ``Fusion.align``; ``fuse="remove"``: unchanged), and the absorbed
  blocks are deleted: their consumers read the block's input instead. This is valid only
  across an identity skip; a block with a projection skip is refused.
- ``fuse="calibrated"`` refits blocks on activations and is only available on the
  PyTorch path.

Neuron alignment (as in ``rewrite_torch``): a block's hidden space is the output units of
weighted producers that only reach a weighted consumer through elementwise ops (the
frontend's ``PermSpace``). Each unit is described by every constant indexed by it
(producer rows and biases, per-channel constants, consumer columns); the absorbed block's
units are permuted onto the kept block's by optimal assignment on squared distances.

Expects the ``LayerGraph`` built from the same model by
:func:`lfgraph.frontends.onnx_graph.build_layer_graph` (its fingerprint must match the
plan's). Guarantees: the input model is never modified; the result passes
``onnx.checker`` (full check, with shape inference) and keeps the input's opset, IR
version, inputs and outputs; node metadata (the exporter's module names) is kept, which is
why edits are made on the protobuf and not through onnx-graphsurgeon, whose export drops it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LfgraphError
from ..onnx_io import check_model
from ..frontends.onnx_graph import (
    CONV,
    BlockInfo,
    OnnxStructure,
    PermSpace,
    analyze_onnx,
    match_blocks,
    outer_names,
)
from ..graph import LayerGraph
from ..plan import Fusion, FusionPlan
from .base import PassResult, RewriteLog
from .metrics import row_assignment

def apply_plan(model: onnx.ModelProto, graph: LayerGraph, plan: FusionPlan) -> PassResult:
    """Rewrite a copy of ``model`` as ``plan`` says; see the module docstring.

    Raises ``LfgraphError`` when the plan does not fit the model (unknown names, a
    projection block to remove, a calibrated fuse rule) and ``RewriteCheckError`` when the
    result fails ``onnx.checker``.
    """
    if plan.fuse == "calibrated":
        raise LfgraphError(
            "fuse rule 'calibrated' refits blocks on calibration activations and needs the PyTorch path: "
            "compress the PyTorch model, or use --fuse mean or --fuse remove on the ONNX file"
        )
    if plan.mode not in ("tie", "merge"):
        raise LfgraphError(f"unknown plan mode {plan.mode!r}: expected 'tie' or 'merge'")
    plan.check_matches(graph)
    st = analyze_onnx(model)
    _check_same_graph(st, graph)
    log = RewriteLog()
    if not plan.fusions:
        unchanged = onnx.ModelProto()
        unchanged.CopyFrom(model)
        return PassResult(unchanged, modified=False, log=log)
    editor = _Editor(model)
    if plan.mode == "tie":
        _tie(st, editor, graph, plan.fusions, log)
    else:
        _merge(st, editor, graph, plan, log)
    return PassResult(editor.finish(), modified=True, log=log)


def exact_expected(graph: LayerGraph, plan: FusionPlan) -> bool:
    """Whether ``plan`` must leave the model's outputs bit-identical: a ``tie`` whose fused
    layers already hold identical weights (and biases). ``compress`` then requires
    ``verify_against_onnx(...).max_abs == 0``; otherwise it reports the error it measures."""
    if plan.mode != "tie" or not plan.fusions:
        return plan.mode == "tie"
    for f in _layer_fusions(graph, plan.fusions):
        nodes = [graph.node(n) for n in [f.keep, *f.absorb]]
        first = nodes[0]
        for n in nodes[1:]:
            if n.weight.shape != first.weight.shape or not np.array_equal(n.weight, first.weight):
                return False
            if (n.bias is None) != (first.bias is None) or (n.bias is not None and not np.array_equal(n.bias, first.bias)):
                return False
    return True


def _check_same_graph(st: OnnxStructure, graph: LayerGraph) -> None:
    for node in graph.nodes:
        i = st.key_index.get(node.ref)
        if i is None or i not in st.weighted or st.layer_names[i] != node.name:
            raise LfgraphError(
                f"layer {node.name!r} (node {node.ref!r}) is not in this ONNX model: build the layer graph and the plan from the same file"
            )


def _layer_index(st: OnnxStructure, graph: LayerGraph, name: str) -> int:
    try:
        return st.key_index[graph.node(name).ref]
    except KeyError:
        raise LfgraphError(f"plan names layer {name!r} that this model does not have: make a new plan") from None


# --------------------------------------------------------------------------------------
# tie


def _tie(st: OnnxStructure, ed: "_Editor", graph: LayerGraph, fusions: list[Fusion], log: RewriteLog) -> None:
    seen: set[str] = set()
    for f in _layer_fusions(graph, fusions):
        names = [f.keep, *f.absorb]
        for n in names:
            if n in seen:
                raise LfgraphError(f"layer {n!r} appears in two fusions of the plan: make a new plan")
            seen.add(n)
        idx = [_layer_index(st, graph, n) for n in names]
        weights = [st.canonical_weight(i) for i in idx]
        shapes = {w.shape for w in weights}
        if len(shapes) != 1:
            raise LfgraphError(f"fusion of {names} mixes weight shapes {sorted(shapes)}: make a new plan")
        mean = _mean(weights)
        keep = st.weighted[idx[0]]
        dtype = st.value(st.nodes[idx[0]].input[keep.weight_slot]).dtype
        stored = mean if keep.op == CONV or keep.out_axis == 0 else mean.T
        wname = ed.add_initializer(np.ascontiguousarray(stored).astype(dtype), f"{f.keep}.weight")
        transposed: str | None = None
        for i in idx:
            w = st.weighted[i]
            name = wname
            if w.op != CONV and w.out_axis != keep.out_axis:
                if transposed is None:
                    transposed = ed.add_prologue_transpose(wname)
                name = transposed
            ed.set_input(i, w.weight_slot, name)
            if w.scale != 1.0:
                ed.set_float_attr(i, "alpha", 1.0)
        biases = [st.bias(i) for i in idx]
        if all(b is not None for b in biases):
            j0, s0 = st.weighted[idx[0]].bias  # type: ignore[misc]
            bname = ed.add_initializer(_mean(biases).astype(st.value(st.nodes[j0].input[s0]).dtype), f"{f.keep}.bias")
            for i in idx:
                w = st.weighted[i]
                j, slot = w.bias  # type: ignore[misc]
                ed.set_input(j, slot, bname)
                if w.bias_scale != 1.0:
                    ed.set_float_attr(j, "beta", 1.0)
        for a in f.absorb:
            log.add("tie", "tie", a, [f.keep], params_saved=graph.node(a).num_params)


def _layer_fusions(graph: LayerGraph, fusions: list[Fusion]) -> list[Fusion]:
    """Layer fusions as given; a block fusion under ``tie`` ties its layers role by role."""
    out = []
    blocks = {b.name: b for b in graph.blocks}
    for f in fusions:
        if f.unit == "layer":
            out.append(f)
            continue
        for name in [f.keep, *f.absorb]:
            if name not in blocks:
                raise LfgraphError(f"plan names block {name!r} that this model does not have: make a new plan")
        kept = graph.block_members(blocks[f.keep])
        for role, node in sorted(kept.items()):
            others = [graph.block_members(blocks[a]).get(role) for a in f.absorb]
            out.append(Fusion(keep=node.name, absorb=[o.name for o in others if o is not None], unit="layer", score=f.score, align=False))
    return [f for f in out if f.absorb]


def _mean(arrays: list[np.ndarray]) -> np.ndarray:
    """Mean in float64, returned as float32: equal inputs give back exactly the input."""
    return np.mean(np.stack([a.astype(np.float64) for a in arrays]), axis=0).astype(np.float32)


# --------------------------------------------------------------------------------------
# merge


def _merge(st: OnnxStructure, ed: "_Editor", graph: LayerGraph, plan: FusionPlan, log: RewriteLog) -> None:
    blocks = {b.name: b for b in st.blocks}
    kinds = {b.name: b.kind for b in graph.blocks}
    for f in plan.fusions:  # names, overlaps and repeats: FusionPlan.check_matches in apply_plan
        if f.unit != "block":
            raise LfgraphError("a merge plan must fuse blocks (unit 'block'); make it with --mode merge")
        for name in [f.keep, *f.absorb]:
            if name not in blocks:
                raise LfgraphError(f"plan names block {name!r} that this model does not have: make a new plan")
        for a in f.absorb:
            if blocks[a].skip != "identity":
                raise LfgraphError(
                    f"block {a} has a projection skip path (weights on its shortcut): merging it away would drop "
                    "them and change the tensor shape it produces; only blocks with an identity skip can be removed"
                )
            if kinds.get(a) != kinds.get(f.keep):
                raise LfgraphError(f"blocks {f.keep} and {a} differ in structure and cannot be fused")
            _check_removable(st, blocks[a])
    for f in plan.fusions:
        if plan.fuse == "mean":
            _fuse_mean(st, ed, blocks[f.keep], [blocks[a] for a in f.absorb], f.align, log)
        for a in f.absorb:
            ed.remove_block(blocks[a])
            log.add("merge", "remove", a, [f.keep], fuse=plan.fuse)


def _check_removable(st: OnnxStructure, b: BlockInfo) -> None:
    for j in sorted(b.nodes):
        for o in st.nodes[j].output:
            if not o or o == b.output:
                continue
            if o in st.outputs:
                raise LfgraphError(f"block {b.name} cannot be removed: its tensor {o!r} is a graph output")
            outside = [c for c in st.act_consumers(o) if c not in b.nodes]
            if outside:
                raise LfgraphError(
                    f"block {b.name} cannot be removed: its tensor {o!r} is also read by node {st.keys[outside[0]]!r} outside the block"
                )


def _float_slots(st: OnnxStructure, b: BlockInfo) -> list[tuple[int, int]]:
    """(node, slot) of every floating-point constant a block's nodes read."""
    out = []
    for j in sorted(b.nodes):
        for s, t in enumerate(st.nodes[j].input):
            if t and t in st.const and np.issubdtype(st.value(t).dtype, np.floating):
                out.append((j, s))
    return out


def _fuse_mean(st: OnnxStructure, ed: "_Editor", keep: BlockInfo, absorb: list[BlockInfo], align: bool, log: RewriteLog) -> None:
    slots = _float_slots(st, keep)
    kept = {(j, s): st.value(st.nodes[j].input[s]) for j, s in slots}
    others: list[dict[tuple[int, int], np.ndarray]] = []
    for b in absorb:
        mapping = match_blocks(st, keep, b, st.roles)
        if mapping is None:
            raise LfgraphError(
                f"blocks {keep.name} and {b.name} have the same layers but not the same graph structure: cannot fuse them node for node"
            )
        vals = {(j, s): st.value(st.nodes[mapping[j]].input[s]) for j, s in slots}
        if align:
            for space in keep.spaces:
                perm = hidden_unit_permutation(kept, vals, space)
                if not np.array_equal(perm, np.arange(len(perm))):
                    for j, s, axis in space.params:
                        vals[(j, s)] = np.take(vals[(j, s)], perm, axis=axis)
                    log.add("merge", "permute", b.name, [keep.name], units=len(perm), moved=int((perm != np.arange(len(perm))).sum()))
        others.append(vals)
    for j, s in slots:
        arrays = [kept[(j, s)]] + [o[(j, s)] for o in others]
        if all(a.shape == arrays[0].shape and np.array_equal(a, arrays[0]) for a in arrays[1:]):
            continue  # shared or equal constants (eps, rotary tables) stay as they are
        if any(a.shape != arrays[0].shape for a in arrays[1:]):
            raise LfgraphError(f"blocks {keep.name} and {[b.name for b in absorb]} differ in the shape of {st.nodes[j].input[s]!r}")
        fused = _mean(arrays).astype(arrays[0].dtype)
        ed.set_input(j, s, ed.add_initializer(fused, _param_name(st, keep, j, s)))
    log.add("merge", "fuse", keep.name, [keep.name] + [b.name for b in absorb], rule="mean", aligned=align)


def _param_name(st: OnnxStructure, b: BlockInfo, j: int, s: int) -> str:
    w = st.weighted.get(j)
    if w is not None and s == w.weight_slot:
        return f"{st.layer_names[j]}.weight"
    for i in b.members:
        if st.weighted[i].bias == (j, s):
            return f"{st.layer_names[i]}.bias"
    return st.nodes[j].input[s]


def _features(values: Mapping[tuple[int, int], np.ndarray], space: PermSpace) -> np.ndarray:
    cols = [np.moveaxis(values[(j, s)], axis, 0).reshape(space.size, -1) for j, s, axis in space.params]
    return np.concatenate(cols, axis=1).astype(np.float64)


def hidden_unit_permutation(keep: Mapping[tuple[int, int], np.ndarray], other: Mapping[tuple[int, int], np.ndarray], space: PermSpace) -> np.ndarray:
    """``perm`` such that ``other``'s hidden unit ``perm[u]`` best matches ``keep``'s unit ``u``.

    Both dicts map the kept block's ``(node, slot)`` to a constant (the other block's
    values under the block isomorphism). The matching minimises the summed squared
    distance between unit descriptions (optimal assignment), as in ``rewrite_torch``.
    """
    return row_assignment(_features(keep, space), _features(other, space))


def permute_hidden_units(model: onnx.ModelProto, block: str, perms: list[np.ndarray] | None = None, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` whose block ``block`` has its hidden units reordered.

    ``perms`` gives one permutation per hidden space of the block (random ones from
    ``seed`` when omitted). The block computes the same function (up to float rounding of
    reordered sums); useful to test neuron alignment. The input model is not modified.
    """
    st = analyze_onnx(model)
    found = [b for b in st.blocks if b.name == block]
    if not found:
        raise LfgraphError(f"model has no block {block!r}; its blocks are {[b.name for b in st.blocks]}")
    b = found[0]
    rng = np.random.default_rng(seed)
    perms = perms if perms is not None else [rng.permutation(s.size) for s in b.spaces]
    if len(perms) != len(b.spaces):
        raise LfgraphError(f"block {block} has {len(b.spaces)} hidden spaces, {len(perms)} permutations given")
    ed = _Editor(model)
    for space, perm in zip(b.spaces, perms):
        for j, s, axis in space.params:
            arr = np.take(st.value(st.nodes[j].input[s]), np.asarray(perm), axis=axis)
            ed.set_input(j, s, ed.add_initializer(arr, _param_name(st, b, j, s)))
    return ed.finish()


# --------------------------------------------------------------------------------------
# editing


#: Tensors of at least this many elements holding one repeated value are written as
#: ``ConstantOfShape`` instead of an initializer, so a rewrite never materialises them.
UNIFORM_MIN_SIZE = 16


class _Editor:
    """Edits a copy of a model by node index (the indices of :class:`OnnxStructure`).

    New initializers get the wanted name when it is free once orphans are gone, else a
    suffixed one; ``finish`` removes orphans, rewires removed blocks and checks the model.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        _fold_initializer_shapes(self.graph)
        self.removed: set[int] = set()
        self.subst: dict[str, str] = {}
        self.prologue: list[onnx.NodeProto] = []
        self.wanted: dict[str, str] = {}
        self.created: set[str] = set()
        self.names = _tensor_names(self.graph)
        self.real_inputs = {i.name for i in self.graph.input} - {t.name for t in self.graph.initializer}

    def _fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}.lfgraph{k}"
        self.names.add(name)
        return name

    def add_initializer(self, array: np.ndarray, wanted: str) -> str:
        if array.size >= UNIFORM_MIN_SIZE and self._opset() >= 9 and np.all(array == array.flat[0]):
            return self._add_uniform(array, wanted)
        name = self._fresh(wanted)
        self.created.add(name)
        if name != wanted:
            self.wanted[name] = wanted
        # add + CopyFrom, not append: protobuf serialises what append copies, which fails
        # for a tensor over 2 GB
        self.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
        if self.model.ir_version < 4:
            # before IR 4 every initializer must also be a graph input
            self.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
        return name

    def _opset(self) -> int:
        return max((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), default=0)

    def _add_uniform(self, array: np.ndarray, wanted: str) -> str:
        """A tensor of one repeated value as ``ConstantOfShape`` (as the input graph may have
        built it): a few bytes, where an initializer would store every element."""
        name = self._fresh(wanted)
        shape = self.add_initializer(np.asarray(array.shape, dtype=np.int64), f"{wanted}.shape")
        value = numpy_helper.from_array(np.asarray([array.flat[0]], dtype=array.dtype), "")
        self.prologue.append(helper.make_node("ConstantOfShape", [shape], [name], name=self._fresh(f"lfgraph_constant_{wanted}"), value=value))
        return name

    def add_prologue_transpose(self, source: str) -> str:
        out = self._fresh(f"{source}.transposed")
        self.prologue.append(helper.make_node("Transpose", [source], [out], name=self._fresh(f"lfgraph_transpose_{source}"), perm=[1, 0]))
        return out

    def set_input(self, node: int, slot: int, name: str) -> None:
        self.graph.node[node].input[slot] = name

    def set_float_attr(self, node: int, attr: str, value: float) -> None:
        n = self.graph.node[node]
        for a in n.attribute:
            if a.name == attr:
                a.f = value
                return
        n.attribute.append(helper.make_attribute(attr, value))

    def remove_block(self, b: BlockInfo) -> None:
        self.removed |= b.nodes
        self.subst[b.output] = b.input

    def _resolve(self, t: str) -> str:
        while t in self.subst:
            t = self.subst[t]
        return t

    def finish(self) -> onnx.ModelProto:
        g = self.graph
        kept = [n for i, n in enumerate(g.node) if i not in self.removed]
        epilogue = []
        for out in g.output:
            if out.name in self.subst:
                # a removed block produced a graph output: keep the name, read the input
                epilogue.append(helper.make_node("Identity", [self._resolve(out.name)], [out.name], name=self._fresh(f"lfgraph_identity_{out.name}")))
        for n in kept:
            _rename(n, self._resolve)
        nodes = _live_nodes(self.prologue + kept + epilogue, {o.name for o in g.output})
        del g.node[:]
        g.node.extend(nodes)
        used = {o.name for o in g.output}
        for n in nodes:
            used |= {x for x in n.input if x} | outer_names(n)
        for k in reversed(range(len(g.initializer))):
            if g.initializer[k].name not in used:
                del g.initializer[k]  # deleted in place: rebuilding the list would re-serialise each tensor
        init_names = {t.name for t in g.initializer}
        inputs = [i for i in g.input if i.name in self.real_inputs or i.name in init_names]
        del g.input[:]
        g.input.extend(inputs)
        # shapes recorded for tensors that are gone; dropped before renaming, so that a new
        # initializer taking an old name does not inherit the old tensor's shape
        produced = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
        vis = [v for v in g.value_info if v.name in produced and v.name not in self.created]
        del g.value_info[:]
        g.value_info.extend(vis)
        self._rename_wanted()
        produced = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
        missing = sorted({x for n in g.node for x in n.input if x and x not in produced})
        if missing:
            raise LfgraphError(
                f"the rewrite leaves tensor {missing[0]!r} without a producer (a removed block computed it for nodes outside): "
                "this graph cannot be rewritten this way"
            )
        check_model(self.model)
        return self.model

    def _rename_wanted(self) -> None:
        g = self.graph
        taken = _tensor_names(g)
        rename = {}
        for name, want in self.wanted.items():
            if want not in taken and name in taken:
                rename[name] = want
                taken.add(want)
        if not rename:
            return
        for t in g.initializer:
            if t.name in rename:
                t.name = rename[t.name]
        for i in g.input:
            if i.name in rename:
                i.name = rename[i.name]
        for n in g.node:
            _rename(n, lambda x: rename.get(x, x))


def _fold_initializer_shapes(g: onnx.GraphProto) -> None:
    """Turn ``Shape(initializer)`` into a ``Constant`` in place (same index, same output).

    Exporters emit such nodes for convolution shape arithmetic; left alone they keep a
    replaced weight alive as an orphan (stored twice) just to read its shape.
    """
    dims = {t.name: list(t.dims) for t in g.initializer}
    for node in g.node:
        if node.op_type != "Shape" or not node.input or node.input[0] not in dims:
            continue
        shape = dims[node.input[0]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        value = numpy_helper.from_array(np.array(shape[slice(start, end)], dtype=np.int64))
        node.op_type = "Constant"
        del node.input[:]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", value))


def _tensor_names(g: onnx.GraphProto) -> set[str]:
    names = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    for n in g.node:
        names |= {x for x in n.input if x} | {o for o in n.output if o}
    return names


def _rename(node: onnx.NodeProto, fn: Any) -> None:
    """Apply ``fn`` to every tensor name a node reads, subgraph references included."""
    for k, x in enumerate(node.input):
        if x:
            node.input[k] = fn(x)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
        for sub in graphs:
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
            for n in sub.node:
                _rename(n, lambda x: x if x in local else fn(x))
            for o in sub.output:
                if o.name not in local:
                    o.name = fn(o.name)


def _live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Nodes that contribute to a graph output (topological order kept)."""
    needed = set(outputs)
    live = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output if o):
            live.append(n)
            needed |= {x for x in n.input if x} | outer_names(n)
    return live[::-1]


# --------------------------------------------------------------------------------------
# example inputs


def make_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = 1, seq_len: int = 8) -> dict[str, np.ndarray]:
    """Deterministic example inputs for a model's graph inputs.

    Unknown dimensions are ``batch`` on axis 0 and ``seq_len`` elsewhere. Integer inputs
    that index a ``Gather`` table (token ids) are drawn below the table's size, masks
    (names containing ``mask``) are ones, other integers are 0/1; floats are N(0, 1).
    """
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    vocab: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in inits and inits[n.input[0]].dims:
            vocab.setdefault(n.input[1], int(inits[n.input[0]].dims[0]))
    feed = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (batch if k == 0 else seq_len) for k, d in enumerate(tt.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            if "mask" in vi.name:
                arr = np.ones(shape, dtype=dtype)
            else:
                arr = rng.integers(0, _vocab_for(model, vi.name, vocab), size=shape).astype(dtype)
        elif dtype == np.bool_:
            arr = np.ones(shape, dtype=dtype)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feed[vi.name] = arr
    return feed


def _vocab_for(model: onnx.ModelProto, name: str, vocab: dict[str, int]) -> int:
    """Size of the embedding table an id input indexes, through a Reshape/Cast if needed."""
    if name in vocab:
        return vocab[name]
    for n in model.graph.node:
        if n.op_type in ("Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten") and n.input and n.input[0] == name:
            if n.output[0] in vocab:
                return vocab[n.output[0]]
    return 2
