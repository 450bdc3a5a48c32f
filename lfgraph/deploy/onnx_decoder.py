"""Removing whole decoder layers straight from a with-past ONNX decoder.

Works on the cache layout Optimum and onnxruntime-genai share (``past_key_values.{i}.key|
value`` inputs, ``present.{i}.key|value`` outputs), for graphs whose nodes say which layer
they belong to: the torch exporter's module scopes (``...layers.7``, kept by
:func:`lfgraph.deploy.decoder_onnx.export_decoder_with_past`), or node names with a
``layers.7`` path component: onnxruntime-genai's model builder (``/model/layers.7/...``) and
the TorchScript exporter that Optimum uses (``/model/model/layers.7/self_attn/...``).

Removing layer ``i``:

1. its nodes are the ones owned by ``i``; its *residual entries* are the tensors its nodes
   read that no other layer reads (the shared ones are the mask, rotary tables, ...), its
   *exits* the tensors it produces that anything outside it reads, besides its cache;
2. the exits are rewired to the entries: one entry/one exit (the residual stream of an
   unfused graph) by replacing the exit; two/two (genai's fused
   ``SkipSimplifiedLayerNormalization``: the residual sum is split into (x, skip)) by
   feeding the next fused norm the inputs of this layer's fused norm; one/two (genai's
   first layer, whose norm is unfused) by turning the next fused norm into a plain
   ``SimplifiedLayerNormalization`` of the entry;
3. its cache input and output go; a remaining shape computation that read its cache input
   reads a kept layer's instead (all layers' caches have the same length);
4. dead nodes and unused initializers are pruned, the remaining cache names renumbered 0..n-1.

Anything else (another cache naming, a boundary of another shape) is refused with one
``LfgraphError`` line naming what was found.
"""

from __future__ import annotations

import re
from pathlib import Path
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import onnx
from onnx import helper

from ..errors import LfgraphError
from ..frontends.onnx_graph import node_scopes

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_CACHE_LIKE = re.compile(r"past|present|cache|kv", re.I)
_SCOPE_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)$")
_NAME_LAYER = re.compile(r"^/(?:[^/]+/)*?(?:layers|h)\.(\d+)/")
_FUSED_NORMS = {"SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization"}


@dataclass
class CacheLayout:
    """The cache interface of a with-past decoder."""

    n_layers: int
    past: dict[int, tuple[str, str]]
    present: dict[int, tuple[str, str]]


def cache_layout(model: onnx.ModelProto) -> CacheLayout:
    """The layers' cache inputs/outputs; ``LfgraphError`` naming what was found otherwise."""
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    past: dict[int, dict[str, str]] = defaultdict(dict)
    present: dict[int, dict[str, str]] = defaultdict(dict)
    for n in ins:
        if m := _PAST.match(n):
            past[int(m.group(1))][m.group(2)] = n
    for n in outs:
        if m := _PRESENT.match(n):
            present[int(m.group(1))][m.group(2)] = n
    if not past:
        found = [n for n in ins + outs if _CACHE_LIKE.search(n)]
        if found:
            raise LfgraphError(f"unknown KV-cache layout {found[:4]}{' ...' if len(found) > 4 else ''}: lfgraph removes decoder layers "
                               "from graphs with past_key_values.N.key/value inputs and present.N.key/value outputs")
        raise LfgraphError("the graph has no KV-cache inputs (past_key_values.N.key/value): not a with-past decoder")
    n = max(past) + 1
    full = all(set(past[i]) == {"key", "value"} and set(present.get(i, {})) == {"key", "value"} for i in range(n))
    if not full or len(past) != n or len(present) != n:
        raise LfgraphError(f"incomplete KV-cache interface: past for layers {sorted(past)}, present for layers {sorted(present)} "
                           "(each layer needs past_key_values.N.key/value and present.N.key/value)")
    return CacheLayout(n, {i: (past[i]["key"], past[i]["value"]) for i in range(n)},
                       {i: (present[i]["key"], present[i]["value"]) for i in range(n)})


def is_decoder_with_past(model: onnx.ModelProto) -> bool:
    """True when the graph has cache inputs in any naming (the with-past path handles it,
    refusing layouts it does not know)."""
    return any(_CACHE_LIKE.search(i.name) for i in model.graph.input)


def node_layer(node: onnx.NodeProto) -> int | None:
    """The decoder layer that owns ``node`` (module scopes, else a ``/model/layers.N/`` name)."""
    scopes = node_scopes(node)
    if scopes is not None:
        for s in scopes:
            if m := _SCOPE_LAYER.search(s):
                return int(m.group(1))
        return None
    if m := _NAME_LAYER.match(node.name):
        return int(m.group(1))
    return None


def _owned(graph: onnx.GraphProto, n_layers: int, required: Iterable[int] = ()) -> dict[int, list[onnx.NodeProto]]:
    owned: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        i = node_layer(node)
        if i is not None and i < n_layers:  # genai names the final norm layers.N
            owned[i].append(node)
    missing = [i for i in required if not owned.get(i)]
    if missing:
        raise LfgraphError(f"cannot tell which nodes belong to decoder layers {missing[:5]}: the graph has neither the torch "
                           "exporter's module scopes nor /model/layers.N/ node names (export it with lfgraph or "
                           "onnxruntime-genai's model builder)")
    return owned


def remove_decoder_layers(model: onnx.ModelProto, layers: Iterable[int]) -> onnx.ModelProto:
    """A copy of ``model`` without decoder ``layers`` (original indices) and their cache
    inputs/outputs; the remaining cache names are renumbered 0..n-1. ``model`` is not modified."""
    drop = sorted(set(int(i) for i in layers), reverse=True)
    layout = cache_layout(model)
    if not drop:
        raise LfgraphError("no decoder layers to remove: give at least one")
    if drop[0] >= layout.n_layers or drop[-1] < 0:
        raise LfgraphError(f"layer {drop[0]} does not exist: the decoder has layers 0..{layout.n_layers - 1}")
    if len(drop) >= layout.n_layers:
        raise LfgraphError("the plan removes every decoder layer: lower the target")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    _owned(g, layout.n_layers, range(layout.n_layers))  # refuse graphs without layer ownership up front
    kept = [i for i in range(layout.n_layers) if i not in set(drop)]
    for i in drop:  # from the top, so the layer above a removed one is already rewired
        _remove_one(g, i, layout)
        _drop_cache_io(g, layout, [i], kept)
        _prune(g)  # the removed layer's nodes must not count as readers for the next one
    _renumber(g, layout, kept)
    return out


def _consumers(g: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in g.node:
        for k, t in enumerate(node.input):
            if t:
                uses[t].append((node, k))
    return uses


def _boundary(g: onnx.GraphProto, i: int, layout: CacheLayout) -> tuple[list[onnx.NodeProto], list[str], list[str], dict]:
    """(layer ``i``'s nodes, its residual entries, its exits, the graph's tensor consumers)."""
    owned = _owned(g, layout.n_layers)
    block = owned[i]
    ids = {id(n) for n in block}
    produced = {t for n in block for t in n.output if t}
    constants = {t for n in g.node if n.op_type == "Constant" for t in n.output} | {x.name for x in g.initializer}
    graph_inputs = {x.name for x in g.input}
    others_read = {t for j, nodes in owned.items() if j != i for n in nodes for t in n.input}
    # the residual stream carries hidden states: tensors computed from weight matrices.
    # Tensors the layer shares with others without a weight matrix upstream (rotary tables,
    # the mask, shapes; the exporter may compute them once inside the first layer) are not
    # part of the boundary and stay.
    hidden = _hidden_states(g)
    entries: list[str] = []
    for n in block:
        for t in n.input:
            if (t and t in hidden and t not in produced and t not in constants and t not in graph_inputs
                    and t not in others_read and t not in entries):
                entries.append(t)
    uses = _consumers(g)
    cache_out = set(layout.present[i])
    graph_out = {o.name for o in g.output}
    exits = [t for n in block for t in n.output
             if t and t in hidden and t not in cache_out and (t in graph_out or any(id(c) not in ids for c, _ in uses.get(t, [])))]
    return block, entries, exits, uses


def _remove_one(g: onnx.GraphProto, i: int, layout: CacheLayout) -> None:
    block, entries, exits, uses = _boundary(g, i, layout)
    ids = {id(n) for n in block}
    if len(entries) == 1 and len(exits) == 1:
        _replace_uses(g, exits[0], entries[0])
        return
    outside = {id(c): c for t in exits for c, _ in uses.get(t, []) if id(c) not in ids}
    if len(exits) == 2 and len(outside) == 1:
        nxt = next(iter(outside.values()))
        if nxt.op_type in _FUSED_NORMS and set(nxt.input[:2]) == set(exits):
            readers = [n for n in block if set(entries) <= set(n.input[:2])]
            if len(entries) == 2 and readers and readers[0].op_type == nxt.op_type:
                nxt.input[0], nxt.input[1] = readers[0].input[0], readers[0].input[1]
                return
            if len(entries) == 1:
                _unfuse_norm(g, nxt, entries[0])
                return
    raise LfgraphError(f"decoder layer {i} has a residual boundary lfgraph does not know ({len(entries)} entries "
                       f"{entries[:3]}, {len(exits)} exits {exits[:3]}): cannot remove it from this graph")


def _hidden_states(g: onnx.GraphProto) -> set[str]:
    """Tensors computed (transitively) from a weight matrix (an initializer of rank >= 2)."""
    heavy = {x.name for x in g.initializer if len(x.dims) >= 2}
    for node in g.node:  # ONNX graphs are topologically sorted
        if any(t in heavy for t in node.input):
            heavy.update(t for t in node.output if t)
    return heavy


def _unfuse_norm(g: onnx.GraphProto, node: onnx.NodeProto, x: str) -> None:
    """``Skip*Norm(a, b, gamma)`` whose ``a + b`` is now ``x`` → ``*Norm(x, gamma)``; readers of
    the sum output (index 3) read ``x``."""
    eps = [a for a in node.attribute if a.name == "epsilon"]
    plain = helper.make_node(_FUSED_NORMS[node.op_type], [x, node.input[2]], [node.output[0]], name=node.name + "/unfused",
                             domain="", axis=-1, stash_type=1, **({"epsilon": eps[0].f} if eps else {}))
    total = node.output[3] if len(node.output) > 3 else ""
    at = list(g.node).index(node)
    g.node.remove(node)
    g.node.insert(at, plain)
    if total:
        _replace_uses(g, total, x)


def _replace_uses(g: onnx.GraphProto, old: str, new: str) -> None:
    for node in g.node:
        for k, t in enumerate(node.input):
            if t == old:
                node.input[k] = new
    for o in g.output:
        if o.name == old:
            raise LfgraphError(f"graph output {old} is produced inside a removed decoder layer: cannot remove it")


def _drop_cache_io(g: onnx.GraphProto, layout: CacheLayout, drop: Sequence[int], kept: Sequence[int]) -> None:
    dropped_in = {n: k for i in drop for k, n in zip((0, 1), layout.past[i])}
    dropped_out = {n for i in drop for n in layout.present[i]}
    # shape computations outside the removed layers may read a removed cache input
    # (transformers' mask code reads layer 0's length): point them at a kept layer's
    for node in g.node:
        for k, t in enumerate(node.input):
            if t in dropped_in:
                node.input[k] = layout.past[kept[0]][dropped_in[t]]
    for vi in [x for x in g.input if x.name in dropped_in]:
        g.input.remove(vi)
    for vi in [x for x in g.output if x.name in dropped_out]:
        g.output.remove(vi)


def _prune(g: onnx.GraphProto) -> None:
    """Drop nodes nothing needs (backwards from the graph outputs), then unused initializers
    and value infos."""
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(g.node)):
        if any(t in needed for t in node.output):
            keep.append(node)
            needed.update(t for t in node.input if t)
            for a in node.attribute:  # subgraphs read outer tensors
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(t for n in a.g.node for t in n.input)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [x for x in g.initializer if x.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [x for x in g.value_info if x.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)


def _renumber(g: onnx.GraphProto, layout: CacheLayout, kept: Sequence[int]) -> None:
    rename: dict[str, str] = {}
    for new, old in enumerate(kept):
        for k, kind in enumerate(("key", "value")):
            rename[layout.past[old][k]] = f"past_key_values.{new}.{kind}"
            rename[layout.present[old][k]] = f"present.{new}.{kind}"
    # two passes through temporary names: past.3 -> past.2 must not collide with a live past.2
    tmp = {old: f"__lfgraph_tmp__{old}" for old in rename}
    for mapping in (tmp, {tmp[o]: n for o, n in rename.items()}):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.name in mapping:
                vi.name = mapping[vi.name]
        for node in g.node:
            for k, t in enumerate(node.input):
                if t in mapping:
                    node.input[k] = mapping[t]
            for k, t in enumerate(node.output):
                if t in mapping:
                    node.output[k] = mapping[t]


def block_influence(model: onnx.ModelProto, windows: Any, threads: int | None = None, head_dim: int | None = None) -> list[float]:
    """Block Influence (ShortGPT) of every decoder layer, measured on the ONNX graph itself:
    ``1 - cos(residual in, residual out)`` averaged over the tokens of ``windows``
    (token ids, shape (n, seq)), run as prefill with an empty cache. A fused boundary
    (genai's (x, skip) pair) is summed back into the residual stream first. ``head_dim``
    is needed when the graph leaves the cache's head size symbolic (genai's builder does;
    its genai_config.json has it as head_size)."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    layout = cache_layout(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    _owned(g, layout.n_layers, range(layout.n_layers))
    bounds = []
    for i in range(layout.n_layers):
        _, entries, exits, _ = _boundary(g, i, layout)
        if not entries or not exits or len(entries) > 2 or len(exits) > 2:
            raise LfgraphError(f"decoder layer {i} has a residual boundary lfgraph does not know "
                               f"({len(entries)} entries, {len(exits)} exits): cannot score it")
        bounds.append((entries, exits))
    wanted = {t for e, x in bounds for t in e + x}
    present = {o.name for o in g.output}
    for t in sorted(wanted - present):
        g.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        from ..onnx_io import save_onnx

        save_onnx(probe, Path(tmp) / "probe.onnx")
        sess = ort.InferenceSession(str(Path(tmp) / "probe.onnx"), opts, providers=["CPUExecutionProvider"])
    inputs = {x.name: x for x in sess.get_inputs()}
    past_shape = inputs[layout.past[0][0]].shape
    names = [o.name for o in sess.get_outputs()]
    scores = np.zeros(layout.n_layers)
    count = 0
    for ids in np.asarray(windows, np.int64):
        ids = ids[None, :]
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        head_dim = head_dim or (past_shape[3] if isinstance(past_shape[3], int) else _head_dim(model, layout))
        for pair in layout.past.values():
            for n in pair:
                feed[n] = np.zeros((1, past_shape[1], 0, head_dim), np.float32)
        outs = dict(zip(names, sess.run(None, feed)))
        for i, (entries, exits) in enumerate(bounds):
            h_in = sum(outs[t] for t in entries).reshape(-1, outs[entries[0]].shape[-1]).astype(np.float64)
            h_out = sum(outs[t] for t in exits).reshape(-1, outs[exits[0]].shape[-1]).astype(np.float64)
            cos = (h_in * h_out).sum(-1) / (np.linalg.norm(h_in, axis=-1) * np.linalg.norm(h_out, axis=-1) + 1e-12)
            scores[i] += float((1 - cos).sum())
        count += ids.shape[1]
    return [float(s / count) for s in scores]


def _head_dim(model: onnx.ModelProto, layout: CacheLayout) -> int:
    for vi in model.graph.output:
        if vi.name == layout.present[0][0]:
            d = vi.type.tensor_type.shape.dim[3]
            if d.dim_value:
                return d.dim_value
    raise LfgraphError("the cache's head size is symbolic in this graph: cannot build an empty cache to score layers")
