"""Checkpoint frontend: a safetensors checkpoint folder → :class:`LayerGraph`, no model held.

The graph is the one :mod:`lfgraph.frontends.torch_fx` builds for the same model loaded in
memory (same layer names, roles, order, blocks, block kinds, hidden spaces, parameter
count and fingerprint; ``tests/blocks/test_checkpoint_graph.py`` compares them family by
family), made without tracing the whole model: one decoder block is read and traced
(``torch.export``, with the call the model gives its first layer), which gives every
block's layers and permutable hidden spaces, since the blocks of a stack are alike; the
weighted layers outside the stack (the head) are the model's own ``nn.Linear`` modules.

Weights are not read: a node's ``weight`` and ``bias`` are read from the checkpoint
(float32, in the canonical layout) each time they are asked for (:class:`LazyLayerNode`),
so the weight-similarity measures stream too, one or two layers in memory at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..fingerprint import combine, layer_digest
from ..graph import LINEAR, Block, LayerGraph, LayerNode


class LazyLayerNode(LayerNode):
    """A :class:`LayerNode` whose weight and bias are read when asked for (``load()``
    returns them as float32 arrays in the canonical layout), never kept."""

    def __init__(self, *, shape: tuple[int, ...], bias_shape: tuple[int, ...] | None,
                 load: Callable[[], tuple[np.ndarray, np.ndarray | None]], **fields: Any) -> None:
        self._shape, self._bias_shape, self._load = tuple(shape), bias_shape, load
        super().__init__(weight=None, bias=None, **fields)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def weight(self) -> np.ndarray:
        return self._load()[0]

    @weight.setter
    def weight(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("a checkpoint graph's weights are read from the checkpoint")

    @property  # type: ignore[override]
    def bias(self) -> np.ndarray | None:
        return None if self._bias_shape is None else self._load()[1]

    @bias.setter
    def bias(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("a checkpoint graph's weights are read from the checkpoint")

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_params(self) -> int:
        return int(np.prod(self._shape) + (0 if self._bias_shape is None else np.prod(self._bias_shape)))

    def __repr__(self) -> str:
        return f"LazyLayerNode({self.name!r}, {self.op}, {self._shape})"


class CheckpointLayerGraph(LayerGraph):
    """A checkpoint's graph: its fingerprint is computed from each block's layers while a
    pass holds the block anyway (:meth:`hash_block`, registered as an observer of the
    source: SHA-256 in a background thread while the block computes), and only the layers
    not hashed that way are read from the checkpoint for it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.digests: dict[str, bytes] = {}
        self._pool: Any = None
        self._pending: Any = None

    def hash_block(self, i: int, block: nn.Module) -> None:
        """Hash original block ``i``'s layers from ``block`` (its float32 tensors in memory)."""
        if self._fingerprint is not None:
            return
        todo = [n for n in self.nodes if n.block == i and n.name not in self.digests]
        if not todo:
            return
        layers = []
        for n in todo:
            m = block.get_submodule(n.role)
            w = m.weight.detach().to("cpu", torch.float32)
            w = w.T.contiguous() if n.attrs.get("layout") == "in_out" else w.contiguous()
            b = getattr(m, "bias", None)
            layers.append((n.name, n.shape, w, None if b is None else b.detach().to("cpu", torch.float32).contiguous()))
        self._wait()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfgraph-fingerprint")
        self._pending = self._pool.submit(_digests, layers)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.digests.update(pending.result())

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._wait()
            self._fingerprint = combine({n.name: self.digests.get(n.name) or n.digest() for n in self.nodes})
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
        return self._fingerprint


def _digests(layers: list[tuple[str, tuple[int, ...], torch.Tensor, torch.Tensor | None]]) -> dict[str, bytes]:
    return {name: layer_digest(name, shape, [w.numpy()], None if b is None else [b.numpy()]) for name, shape, w, b in layers}


class _OneBlock(nn.Module):
    """One decoder block called as the model calls it (its recorded call)."""

    def __init__(self, block: nn.Module, call: Any) -> None:
        super().__init__()
        self.block, self.call = block, call

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.call(self.block, hidden)


def build_layer_graph(source: Any, model_name: str = "") -> LayerGraph:
    """The LayerGraph of the model in ``source`` (a :class:`~lfgraph.blocks.CheckpointBlocks`,
    original, not a view); reads one block (block 0) and a few embedding rows."""
    from .torch_fx import _hidden_spaces, block_kind, trace_layers

    if not source.is_original:
        raise ValueError("build the graph of the original checkpoint, not of a view")
    ids = torch.arange(4)[None, :] % 2
    inputs = source.stack_input([ids], batch_size=1)
    with source.open(0) as block:
        traced = trace_layers(_OneBlock(block, inputs.calls[0][0]), (inputs.hidden[0],), copy_weights=False)
        spaces = _hidden_spaces(traced.ep, "block", traced.weighted_fx, traced.params)
    local = [n for n in traced.nodes if n.name.startswith("block.")]
    if not local:
        raise UnsupportedModelError(f"{source.name}: tracing block 0 found no weighted layer in it")
    roles = [(n.name[len("block."):], n) for n in local]
    stack_module = source.stack_path
    container = source.container
    hf = source.hf_model
    # weighted layers outside the stack: the model's Linear modules (the head), in module order
    outside_before, outside_after, seen_stack = [], [], False
    weights = dict(hf.named_parameters(remove_duplicate=False))
    for path, m in hf.named_modules():
        if path == stack_module:
            seen_stack = True
        if path == stack_module or path.startswith(stack_module + "."):
            continue
        if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")):
            (outside_after if seen_stack else outside_before).append((path, m))
    nodes: list[LayerNode] = []

    def add_outside(path: str, m: nn.Module) -> None:
        in_out = not isinstance(m, nn.Linear)
        shape = tuple(m.weight.shape[::-1] if in_out else m.weight.shape)
        name = f"model.{path}"
        import re

        nodes.append(LazyLayerNode(
            name=name, op=LINEAR, role=re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name), block=None, order=len(nodes),
            attrs={"layout": "in_out"} if in_out else {}, ref=name, shape=shape,
            bias_shape=tuple(m.bias.shape) if getattr(m, "bias", None) is not None else None,
            load=_loader(source, f"{path}.weight", f"{path}.bias" if getattr(m, "bias", None) is not None else None, in_out)))

    for path, m in outside_before:
        add_outside(path, m)
    blocks: list[Block] = []
    for i in range(source.num_blocks):
        members = []
        for role, n in roles:
            name = f"{container}.{i}.{role}"
            wpath = f"{stack_module}.{i}.{role}.weight"
            bpath = f"{stack_module}.{i}.{role}.bias"
            in_out = n.attrs.get("layout") == "in_out"
            node = LazyLayerNode(name=name, op=n.op, role=role, block=i, order=len(nodes), attrs=dict(n.attrs), ref=name,
                                 shape=n.shape, bias_shape=None if n.bias is None else tuple(n.bias.shape),
                                 load=_loader(source, wpath, bpath if n.bias is not None else None, in_out))
            nodes.append(node)
            members.append(node)
        b = Block(index=i, name=f"{container}.{i}", members=[m.name for m in members], skip="identity")
        b.kind = block_kind(members, b.skip)
        b.hidden = [type(h)(size=h.size, tensors=list(h.tensors)) for h in spaces]
        blocks.append(b)
    for path, m in outside_after:
        add_outside(path, m)
    total = sum(p.numel() for p in hf.parameters())
    del weights
    return CheckpointLayerGraph(nodes=nodes, blocks=blocks, source="torch", model_name=model_name or source.name, total_params=int(total))


def _loader(source: Any, weight: str, bias: str | None, in_out: bool) -> Callable[[], tuple[np.ndarray, np.ndarray | None]]:
    """Read a layer's weight (and bias) from ``source``'s checkpoint, float32, canonical layout."""

    def load() -> tuple[np.ndarray, np.ndarray | None]:
        names = [source.stored_name(weight)] + ([source.stored_name(bias)] if bias else [])
        got = source.ckpt.load(names, torch.float32)
        w = got[names[0]].numpy()
        if in_out:
            w = np.ascontiguousarray(w.T)
        return w, (got[names[1]].numpy() if bias else None)

    return load
