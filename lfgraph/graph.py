"""The framework-neutral model graph that every frontend builds and every pass reads.

A :class:`LayerGraph` holds only what layer fusion needs: the weighted layers (fully
connected, convolution, attention projections) with their weights as NumPy arrays in one
canonical layout, their order, and the *blocks* (repeated units with an identity skip
path: transformer layers, ResNet basic blocks). Frontends (``lfgraph.frontends.torch_fx``
and ``lfgraph.frontends.onnx_graph``) build it; the analysis pass and the planner read it;
rewrite passes map names back to the framework objects through ``LayerNode.ref``.

Canonical weight layout: ``(out_features, in_features)`` for fully-connected layers (the
``nn.Linear`` layout; ONNX MatMul weights are transposed into it) and
``(out_channels, in_channels/groups, kh, kw)`` for convolutions. ``LayerNode.matrix``
flattens a convolution to ``(out_channels, in_channels/groups*kh*kw)`` so that every metric
sees a 2-D matrix whose rows are output neurons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fingerprint import combine, layer_digest

LINEAR = "linear"
CONV = "conv"

#: Roles of attention projections; nodes with these roles form the "attention" family.
ATTENTION_ROLE_PATTERN = re.compile(r"(attn|attention)", re.IGNORECASE)


@dataclass
class LayerNode:
    """One weighted layer.

    Attributes:
        name: unique name (a module path such as ``model.layers.3.mlp.down_proj`` or an
            ONNX node name).
        op: ``"linear"`` or ``"conv"``.
        role: the layer's position inside its block (``mlp.down_proj``), or a structural
            role for layers outside blocks. Layers of one role in different blocks play
            the same part and may be fused.
        weight: float32 array in the canonical layout (see module docstring). Never
            modified by passes.
        bias: float32 vector of length ``weight.shape[0]``, or ``None``.
        block: index into ``LayerGraph.blocks`` or ``None``.
        order: position in topological order of the graph (0-based).
        attrs: op attributes that must agree for two layers to be compatible
            (stride, padding, dilation, groups for convolutions).
        ref: how the frontend finds the layer again (module path, initializer name).
    """

    name: str
    op: str
    role: str
    weight: np.ndarray
    bias: np.ndarray | None
    block: int | None
    order: int
    attrs: dict[str, Any] = field(default_factory=dict)
    ref: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape in the canonical layout (without reading a lazy weight)."""
        return tuple(self.weight.shape)

    @property
    def matrix(self) -> np.ndarray:
        """The weight as a 2-D ``(out, fan_in)`` matrix: rows are output neurons."""
        return self.weight.reshape(self.weight.shape[0], -1)

    @property
    def num_params(self) -> int:
        return int(np.prod(self.shape) + (0 if self.bias is None else self.bias.size))

    @property
    def family(self) -> str:
        """``attention``, ``fully-connected`` or ``convolutional``: the paper's three kinds."""
        if self.op == CONV:
            return "convolutional"
        return "attention" if ATTENTION_ROLE_PATTERN.search(self.role) else "fully-connected"

    def digest(self) -> bytes:
        """This layer's digest for the model fingerprint (:func:`lfgraph.fingerprint.layer_digest`)."""
        return layer_digest(self.name, self.shape, [np.ascontiguousarray(self.weight, dtype=np.float32)],
                            None if self.bias is None else [np.ascontiguousarray(self.bias, dtype=np.float32)])

    @property
    def group_key(self) -> str:
        """Layers with equal keys are compatible: same op, role, weight shape, attributes."""
        attrs = ",".join(f"{k}={self.attrs[k]}" for k in sorted(self.attrs))
        shape = "x".join(str(s) for s in self.shape)
        return f"{self.op}:{self.role}:{shape}" + (f":{attrs}" if attrs else "")


@dataclass
class HiddenSpace:
    """A permutable hidden dimension inside a block (e.g. the MLP's intermediate units).

    Every tensor listed in ``tensors`` (name relative to the block, axis) is indexed by the
    same ``size`` hidden units and nothing outside the block is: permuting all of them
    together along their axis leaves the block's function unchanged. Producers' output
    rows, consumers' input columns and per-channel normalisation parameters all appear
    here. Neuron alignment permutes an absorbed block's hidden units before averaging.
    """

    size: int
    tensors: list[tuple[str, int]]


@dataclass
class Block:
    """A repeated unit with a skip path, e.g. one transformer decoder layer.

    Attributes:
        index: position of the block in the stack (0-based, input to output).
        name: module path or a structural name (``block3``).
        members: names of the ``LayerNode`` objects inside the block.
        skip: ``"identity"`` when the block computes ``x + f(x)`` (removable), or
            ``"projection"`` when its skip path has weights (not removable by merge).
        kind: a signature of the block's structure; blocks may only be merged with
            blocks of the same kind.
        hidden: the block's permutable hidden spaces (for neuron alignment).
    """

    index: int
    name: str
    members: list[str]
    skip: str = "identity"
    kind: str = ""
    hidden: list[HiddenSpace] = field(default_factory=list)


@dataclass
class LayerGraph:
    """Weighted layers and blocks of one model, in one framework-neutral form."""

    nodes: list[LayerNode]
    blocks: list[Block]
    source: str
    model_name: str = ""
    total_params: int = 0

    def __post_init__(self) -> None:
        self._fingerprint: str | None = None
        self._by_name = {n.name: n for n in self.nodes}
        if len(self._by_name) != len(self.nodes):
            raise ValueError("LayerGraph node names must be unique")

    def node(self, name: str) -> LayerNode:
        return self._by_name[name]

    def groups(self, min_size: int = 2) -> dict[str, list[LayerNode]]:
        """Compatible groups: nodes sharing a ``group_key``, in graph order.

        Only groups with at least ``min_size`` members are returned, since a group of one
        has nothing to be fused with.
        """
        out: dict[str, list[LayerNode]] = {}
        for n in sorted(self.nodes, key=lambda n: n.order):
            out.setdefault(n.group_key, []).append(n)
        return {k: v for k, v in sorted(out.items()) if len(v) >= min_size}

    def block_members(self, block: Block) -> dict[str, LayerNode]:
        """A block's layers keyed by role."""
        return {self._by_name[m].role: self._by_name[m] for m in block.members}

    def removable_blocks(self) -> list[Block]:
        """Blocks with an identity skip; only these can be dropped by a merge."""
        return [b for b in self.blocks if b.skip == "identity"]

    def fingerprint(self) -> str:
        """The model fingerprint (hex, 16 chars): SHA-256 over each layer's digest (its
        name, weight shape, float32 weight and bias bytes) in name order, by the rule of
        :mod:`lfgraph.fingerprint`; computed once (passes never modify a graph's weights).

        Two graphs with the same fingerprint have identical weighted layers, so a plan made
        for one applies to the other.
        """
        if self._fingerprint is None:
            self._fingerprint = combine({n.name: n.digest() for n in self.nodes})
        return self._fingerprint

    def set_fingerprint(self, digests: dict[str, bytes]) -> None:
        """Record the fingerprint from every layer's digest, computed elsewhere (the
        selection pass hashes a checkpoint's blocks while it reads them); ``ValueError``
        unless the digests cover the graph's layers exactly."""
        if set(digests) != {n.name for n in self.nodes}:
            missing, extra = sorted({n.name for n in self.nodes} - set(digests)), sorted(set(digests) - {n.name for n in self.nodes})
            raise ValueError(f"the digests do not cover the graph's layers (missing {missing[:3]}, unexpected {extra[:3]})")
        self._fingerprint = combine(digests)

    def summary(self) -> str:
        """A few lines for people: counts of layers, groups and blocks."""
        groups = self.groups()
        lines = [
            f"{self.model_name or 'model'} ({self.source}): {len(self.nodes)} weighted layers, "
            f"{len(groups)} compatible groups, {len(self.blocks)} blocks "
            f"({len(self.removable_blocks())} with identity skip)",
        ]
        for key, members in groups.items():
            lines.append(f"  {key:<55} {len(members):>3} layers  [{members[0].family}]")
        return "\n".join(lines)
