"""The model fingerprint a plan records, computed on the streaming path.

The rule is :mod:`lfgraph.fingerprint`'s (one digest per weighted layer: name, weight shape,
float32 weight and bias bytes; the fingerprint hashes the digests in layer-name order), the
one :meth:`lfgraph.graph.LayerGraph.fingerprint` uses. For the Hugging Face causal LMs the
streaming path reads, the graph's weighted layers are the model's ``nn.Linear`` modules,
named by their path in lfgraph's wrapper (``model.`` + the Hugging Face path). Hashing the
same float32 values under the same names gives the same fingerprint, so a plan made by
either path applies to the model loaded by the other.

The decoder blocks' layers are hashed from the float32 block the selection pass has in
memory anyway (:class:`BlockHasher`, in a background thread while the block computes); only
the linear layers outside the blocks (``lm_head``, or the embedding it is tied to) are read
for the fingerprint (:func:`outside_block_digests`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LfgraphError
from ..fingerprint import combine, layer_digest
from .skeleton import LAYERS_PATH, Skeleton

#: The prefix lfgraph's in-memory wrapper (``CausalLMLogits``) gives Hugging Face module paths.
WRAPPER_PREFIX = "model."


def linear_layers(skeleton: Skeleton) -> list[tuple[str, str, str | None]]:
    """``(graph node name, weight tensor name, bias tensor name or None)`` of every linear
    layer, sorted by node name; tensor names are where the checkpoint stores them."""
    out = []
    for path, m in skeleton.model.named_modules():
        if isinstance(m, nn.Linear):
            bias = skeleton.stored_name(f"{path}.bias") if m.bias is not None else None
            out.append((WRAPPER_PREFIX + path, skeleton.stored_name(f"{path}.weight"), bias))
    return sorted(out)


def _in_block(node: str) -> bool:
    return node.startswith(f"{WRAPPER_PREFIX}{LAYERS_PATH}.")


def outside_block_digests(skeleton: Skeleton, progress: Any = None) -> dict[str, bytes]:
    """Digests of the linear layers outside the decoder blocks (``lm_head``), read from the
    checkpoint. ``progress`` (a tqdm bar or None) advances once per layer."""
    return _read_digests(skeleton, lambda node: not _in_block(node), progress)


def _read_digests(skeleton: Skeleton, wanted: Any, progress: Any = None) -> dict[str, bytes]:
    """Digests of the linear layers whose node name ``wanted`` accepts, each read from the
    checkpoint a piece of rows at a time and converted to float32 (as the in-memory path
    loads it)."""
    out = {}
    for node, weight, bias in linear_layers(skeleton):
        if wanted(node):
            out[node] = layer_digest(node, skeleton.ckpt.entry(weight).shape, _float32_pieces(skeleton, weight),
                                     None if bias is None else _float32_pieces(skeleton, bias))
            if progress is not None:
                progress.update(1)
    return out


def block_layers(i: int, block: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(graph node name, float32 weight, float32 bias or None)`` of block ``i``'s linear
    layers, from the block in memory (its parameters hold the stored values in float32)."""
    return [(f"{WRAPPER_PREFIX}{LAYERS_PATH}.{i}.{path}", m.weight.detach(), None if m.bias is None else m.bias.detach())
            for path, m in block.named_modules() if isinstance(m, nn.Linear)]


def _digest_tensors(layers: list[tuple[str, torch.Tensor, torch.Tensor | None]]) -> dict[str, bytes]:
    def buf(t: torch.Tensor) -> list[np.ndarray]:
        return [t.to(torch.float32).contiguous().numpy()]

    return {node: layer_digest(node, w.shape, buf(w), None if b is None else buf(b)) for node, w, b in layers}


class BlockHasher:
    """Hashes each decoder block's linear layers from the float32 block in memory, one
    block at a time in a background thread (SHA-256 releases the GIL on large buffers), while
    the block computes. Call :meth:`wait` before the next block is read: then at most one
    block's tensors are referenced here, the block being computed (no memory beyond it)."""

    def __init__(self) -> None:
        self.digests: dict[str, bytes] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfgraph-fingerprint")
        self._pending: Future | None = None

    def submit(self, i: int, block: nn.Module) -> None:
        """Start hashing block ``i`` (materialized) after the previous block's hashing."""
        self.wait()
        self._pending = self._pool.submit(_digest_tensors, block_layers(i, block))

    def wait(self) -> None:
        """Wait for the block being hashed (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.digests.update(pending.result())

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()

    def fingerprint(self, skeleton: Skeleton, outside: dict[str, bytes]) -> str:
        """The fingerprint from the blocks' digests and ``outside`` (:func:`outside_block_digests`);
        raises ``LfgraphError`` unless together they cover the model's linear layers exactly."""
        self.close()
        digests = {**self.digests, **outside}
        want = {node for node, _, _ in linear_layers(skeleton)}
        if set(digests) != want:
            missing, extra = sorted(want - set(digests)), sorted(set(digests) - want)
            raise LfgraphError(f"internal error: the fingerprint did not hash the model's linear layers (missing {missing[:3]}, unexpected {extra[:3]})")
        return combine(digests)


def checkpoint_fingerprint(skeleton: Skeleton, progress: Any = None) -> str:
    """The in-memory graph's fingerprint (16 hex characters) of the model in the checkpoint,
    every linear layer read from the checkpoint: the fingerprint without a selection pass.
    ``progress`` advances once per layer."""
    return combine(_read_digests(skeleton, lambda node: True, progress))


def _float32_pieces(skeleton: Skeleton, name: str) -> Any:
    """Tensor ``name``'s float32 values (row-major), a piece of rows at a time."""
    for piece in skeleton.ckpt.row_chunks(name):
        yield np.ascontiguousarray(piece.to(torch.float32).numpy())
