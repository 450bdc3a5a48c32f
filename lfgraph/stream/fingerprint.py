"""The model fingerprint a plan records, computed from the checkpoint one tensor at a time.

:meth:`lfgraph.graph.LayerGraph.fingerprint` hashes (SHA-256) every weighted layer of the
in-memory graph in name order: its name, weight shape and float32 weight (and bias) bytes.
For the Hugging Face causal LMs the streaming path reads, the graph's weighted layers are
the model's ``nn.Linear`` modules, named by their path in lfgraph's wrapper (``model.`` +
the Hugging Face path). Hashing the same bytes in the same order gives the same
fingerprint, so a plan made by either path applies to the model loaded by the other.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn

from .skeleton import Skeleton

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


def checkpoint_fingerprint(skeleton: Skeleton, progress: Any = None) -> str:
    """The in-memory graph's fingerprint (16 hex characters) of the model in the checkpoint.

    Reads each linear weight once, one at a time, converted to float32 (as the in-memory
    path loads it). ``progress`` (a tqdm bar or None) advances once per layer."""
    h = hashlib.sha256()
    for node, weight, bias in linear_layers(skeleton):
        h.update(node.encode())
        h.update(str(skeleton.ckpt.entry(weight).shape).encode())
        _update_float32(h, skeleton, weight)
        if bias is not None:
            _update_float32(h, skeleton, bias)
        if progress is not None:
            progress.update(1)
    return h.hexdigest()[:16]


def _update_float32(h: Any, skeleton: Skeleton, name: str) -> None:
    """Feed tensor ``name``'s float32 bytes (row-major) to ``h``, a piece of rows at a time
    (the hash of the pieces in order is the hash of the whole)."""
    for piece in skeleton.ckpt.row_chunks(name):
        h.update(np.ascontiguousarray(piece.to(torch.float32).numpy()))
