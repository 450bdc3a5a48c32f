"""Helpers for the stack of blocks inside a PyTorch model (decoder layers, ResNet blocks).

A block name from the :class:`~lfgraph.graph.LayerGraph` is a module path such as
``m.model.layers.7``; its container is ``m.model.layers`` (an ``nn.ModuleList`` or
``nn.Sequential``). Removing blocks rebuilds the container and keeps a Hugging Face model
self-consistent (``config.num_hidden_layers``, ``config.layer_types``, each attention's
``layer_idx`` used by the KV cache).
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from ..errors import LfgraphError


def split_block_name(name: str) -> tuple[str, int]:
    """``"m.model.layers.7"`` → ``("m.model.layers", 7)``."""
    container, _, idx = name.rpartition(".")
    if not idx.isdigit():
        raise LfgraphError(f"block {name!r} is not an element of a ModuleList/Sequential; cannot remove it")
    return container, int(idx)


def get_block(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def remove_blocks(root: nn.Module, names: Iterable[str]) -> list[str]:
    """Remove the named blocks from ``root`` in place; return the names of the kept blocks'
    new paths in order (so callers can map old → new positions).

    All names must live in one container. Hugging Face bookkeeping (layer counts, per-layer
    attention indices) is updated so that generation with a KV cache stays correct.
    """
    names = list(names)
    if not names:
        return []
    containers = {split_block_name(n)[0] for n in names}
    if len(containers) != 1:
        raise LfgraphError(f"blocks to remove live in several containers {sorted(containers)}: remove them one stack at a time")
    cpath = containers.pop()
    container = root.get_submodule(cpath)
    drop = {split_block_name(n)[1] for n in names}
    kept = [m for i, m in enumerate(container) if i not in drop]
    if not kept:
        raise LfgraphError("the plan removes every block of the stack: lower the target")
    new_container = type(container)(kept) if isinstance(container, nn.ModuleList) else nn.Sequential(*kept)
    parent_path, _, attr = cpath.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new_container)
    _fix_hf_bookkeeping(root, [i for i in range(len(container)) if i not in drop])
    return [f"{cpath}.{i}" for i in range(len(kept))]


def _fix_hf_bookkeeping(root: nn.Module, kept_old_indices: list[int]) -> None:
    """Keep ``config`` and ``layer_idx`` attributes consistent after dropping layers: the
    family's architecture config slices its depth and every per-layer list."""
    from ..architectures import hf_config, of_model

    arch = of_model(root)
    if arch is not None:
        cfg = hf_config(root)
        if arch.depth(cfg) != len(kept_old_indices):
            arch.slice_config(cfg, kept_old_indices)
    # layer_idx indexes the KV cache: it must be 0..n-1 in the new order
    stacks: dict[int, list[nn.Module]] = {}
    for module in root.modules():
        if isinstance(module, nn.ModuleList):
            stacks[id(module)] = list(module)
    for stack in stacks.values():
        for new_idx, block in enumerate(stack):
            for sub in block.modules():
                if hasattr(sub, "layer_idx") and isinstance(getattr(sub, "layer_idx"), int):
                    sub.layer_idx = new_idx
