"""The registry of architecture configs, by ``config.model_type``.

``register`` is the only way in; lookups never guess a family from module names: a Hugging
Face model whose ``model_type`` is not registered is refused with one line that says where
to add it. Plain ``nn.Module`` models (no Hugging Face config) have no family: for them
:func:`block_stack` falls back to one generic rule.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import LfgraphError
from .base import Architecture

#: Every registered architecture, by ``config.model_type``.
ARCHITECTURES: dict[str, Architecture] = {}

#: Where a new family goes (quoted in the refusal).
WHERE_TO_ADD = "a new module in lfgraph/architectures/families/ (see docs/architectures.md, 'Adding a family')"


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: register one instance of ``cls`` under each of its ``model_types``."""
    arch = cls()
    for t in cls.model_types:
        if t in ARCHITECTURES:
            raise ValueError(f"model type {t!r} is registered twice ({ARCHITECTURES[t]!r}, {arch!r})")
        ARCHITECTURES[t] = arch
    return cls


def lookup(model_type: str | None) -> Architecture | None:
    """The architecture registered for ``model_type``, or ``None``."""
    return ARCHITECTURES.get(model_type or "")


def for_config(cfg: Any) -> Architecture:
    """The architecture of a Hugging Face config; ``LfgraphError`` (one line, exit 2) when
    its ``model_type`` is not registered."""
    model_type = getattr(cfg, "model_type", None)
    arch = lookup(model_type)
    if arch is None:
        names = ", ".join(getattr(cfg, "architectures", None) or []) or "its model class"
        raise LfgraphError(f"model type {model_type!r} ({names}) is not a family lfgraph knows "
                           f"({', '.join(sorted(ARCHITECTURES))}): add a class for it in {WHERE_TO_ADD}")
    return arch


def hf_config(model: nn.Module) -> Any:
    """The config of the outermost Hugging Face model in ``model`` (a wrapper or the model
    itself), or ``None`` for plain modules."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(getattr(cfg, "model_type", None), str) and hasattr(m, "base_model_prefix"):
            return cfg
    return None


def of_model(model: nn.Module) -> Architecture | None:
    """The architecture of a model holding a Hugging Face model; ``None`` for plain
    modules; ``LfgraphError`` for a Hugging Face model of an unregistered family."""
    cfg = hf_config(model)
    return None if cfg is None else for_config(cfg)


#: Names of attributes holding a plain module's stack of blocks, most specific first.
GENERIC_STACK_NAMES = ("layers", "h", "layer", "blocks")


def block_stack(model: nn.Module) -> tuple[str, nn.Module]:
    """``(path, container)`` of the model's stack of blocks.

    Hugging Face models: the registered family's stack. Plain modules: the longest
    ``nn.ModuleList``/``nn.Sequential`` of at least 2 named like a stack
    (:data:`GENERIC_STACK_NAMES`). Raises ``LfgraphError`` when there is none."""
    arch = of_model(model)
    if arch is not None:
        path = arch.stack_path(model)
        return path, model.get_submodule(path)
    best: tuple[int, str, nn.Module] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or path.rpartition(".")[2] not in GENERIC_STACK_NAMES:
            continue
        if len(module) >= 2 and (best is None or len(module) > best[0]):
            best = (len(module), path, module)
    if best is None:
        raise LfgraphError(f"{type(model).__name__} has no stack of blocks (a ModuleList named {'/'.join(GENERIC_STACK_NAMES)}): "
                           "depth methods cannot remove any")
    return best[1], best[2]
