"""One interface for every compression method: ``(model, target, calibration) -> result``.

Every method, the paper's width methods (pruning, k-means, SVD, DAE), the training-free
depth pruners (ShortGPT, Gromov et al., SLEB, LaCo, ReplaceMe, LinearPatch) and lfgraph's
own layer fusion, is a :class:`Method` registered by name in :data:`METHODS` and run by
:func:`run_method`, which returns a :class:`MethodResult`:

- ``model``: a compressed copy (the input model is never modified);
- ``removed``: what the method removed (block names for depth methods, a description of
  the layers for width methods);
- ``seconds``: wall-clock seconds the method took (selection + rewrite, no evaluation);
- ``depth_fraction`` and ``weight_fraction``: compression counted the same way for all
  methods: the share of the block stack removed, and the share of the weights of the
  model's fully-connected/convolution layers removed or made redundant (zeroed by pruning,
  merged into shared values by k-means, cut by a low rank, deleted with a block; weights
  added by a method, e.g. a LinearPatch matrix, count against it).

``target`` means the fraction of depth for depth methods (``kind == "depth"``) and the
fraction of layer weights for width methods (``kind == "width"``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lfgraph.errors import LfgraphError

@dataclass
class MethodResult:
    """What :func:`run_method` returns (see the module docstring)."""

    method: str
    target: float
    model: nn.Module
    removed: list[str]
    seconds: float
    depth_fraction: float
    weight_fraction: float
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The result without the model, for tables and JSON."""
        return {
            "method": self.method, "target": self.target, "removed": list(self.removed), "seconds": round(self.seconds, 3),
            "depth_fraction": self.depth_fraction, "weight_fraction": self.weight_fraction, "details": self.details,
        }


@dataclass(frozen=True)
class Method:
    """A registered method. ``fn(work, target, calibration, **options)`` compresses ``work``
    (a deep copy the method may modify) and returns ``(model, removed, details)``."""

    name: str
    kind: str  # "depth" | "width"
    description: str
    fn: Callable[..., tuple[nn.Module, list[str], dict[str, Any]]]
    needs_data: bool = True


def find_block_stack(model: nn.Module) -> str:
    """The module path of the model's main stack of blocks (:func:`lfgraph.architectures.block_stack`:
    the family's stack for Hugging Face models, the generic rule for plain modules).

    Raises ``LfgraphError`` when the model has no such stack (depth methods need one).
    """
    from lfgraph.architectures import block_stack

    return block_stack(model)[0]


def removable_blocks(model: nn.Module, container: str | None = None) -> list[str]:
    """Names of the blocks of the stack that can be deleted: all of them, except blocks
    with a projection skip (a ResNet block that changes shape has a ``downsample``)."""
    cpath = container or find_block_stack(model)
    stack = model.get_submodule(cpath)
    return [f"{cpath}.{i}" for i, b in enumerate(stack) if getattr(b, "downsample", None) is None]


def n_blocks_for(model: nn.Module, target: float, container: str | None = None) -> int:
    """Blocks to remove for a depth ``target`` (fraction of all blocks of the stack, rounded,
    at least 1). Raises ``LfgraphError`` when that leaves no removable block."""
    if not 0.0 < target < 1.0:
        raise LfgraphError(f"target {target} is out of range: give a fraction of depth strictly between 0 and 1")
    cpath = container or find_block_stack(model)
    total = len(model.get_submodule(cpath))
    n = max(1, round(target * total))
    if n >= len(removable_blocks(model, cpath)):
        raise LfgraphError(f"target {target} removes {n} of {total} blocks, but only {len(removable_blocks(model, cpath)) - 1} can go: lower the target")
    return n


def layer_weights(model: nn.Module) -> int:
    """Weights of the model's fully-connected and convolution layers (the denominator of
    ``weight_fraction``; a weight tied to an embedding is not counted)."""
    from .layers import layer_weight_count

    return layer_weight_count(model)


#: Every method by name (``lfgraph-study --methods`` takes its choices from here); filled by
#: :func:`register` as the package imports each method module (``baselines/__init__.py``).
METHODS: dict[str, Method] = {}


def run_method(name: str, model: nn.Module, target: float, calibration: Any = None, **options: Any) -> MethodResult:
    """Compress a copy of ``model`` with method ``name`` at ``target``.

    Expects ``calibration`` as token windows ``(N, seq)`` for language models (``model(ids)``
    returns logits) or an input tensor ``(N, ...)`` for vision models; methods with
    ``needs_data`` refuse ``None``. ``options`` go to the method. Guarantees: ``model`` is
    not modified; the result's model is in eval mode; ``seconds`` covers selection and
    rewrite only. Raises ``LfgraphError`` for an unknown method, a bad target or options.
    """
    if name not in METHODS:
        raise LfgraphError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    if method.needs_data and calibration is None:
        raise LfgraphError(f"method {name!r} reads activations: pass calibration data (token windows or inputs)")
    if method.kind == "width" and not 0.0 <= target < 1.0:
        raise LfgraphError(f"target {target} is out of range: give the fraction of layer weights to remove, in [0, 1)")
    before_weights = layer_weights(model)
    before_blocks = len(model.get_submodule(find_block_stack(model))) if method.kind == "depth" else 0
    work = copy.deepcopy(model).eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():  # a method that optimises (ReplaceMe cosine) enables grad itself
            out, removed, details = method.fn(work, target, calibration, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise LfgraphError(f"method {name!r} does not take {sorted(options)}: {e}") from None
        raise
    seconds = time.perf_counter() - t0
    if method.kind == "depth":
        after_blocks = len(out.get_submodule(find_block_stack(out)))
        depth_fraction = (before_blocks - after_blocks) / before_blocks
        weight_fraction = 1.0 - layer_weights(out) / before_weights
    else:
        depth_fraction = 0.0
        weight_fraction = float(details.get("achieved", 1.0 - layer_weights(out) / before_weights))
    return MethodResult(name, target, out.eval(), list(removed), seconds, depth_fraction, weight_fraction, details)


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a name registered twice is an error)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method
