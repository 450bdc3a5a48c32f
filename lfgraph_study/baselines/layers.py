"""The layers every width method compresses and the count of their weights (the
denominator of every fraction): fully-connected and convolution layers, one entry per
distinct weight, weights tied to an embedding left out."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lfgraph.retrain.modes import is_fusable_layer


@dataclass
class LayerRef:
    """A compressible layer of a model: its module path, the module, and how many modules
    use its weight (more than one when tied)."""

    path: str
    module: nn.Module
    users: int = 1

    @property
    def weight_count(self) -> int:
        return int(self.module.weight.numel())


def compressible_layers(model: nn.Module) -> list[LayerRef]:
    """The fully-connected and convolution layers that the baselines compress.

    One entry per distinct weight tensor, in ``named_modules`` order (input first for
    sequential code); weights shared with an ``nn.Embedding`` are left out.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    refs: dict[int, LayerRef] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if not is_fusable_layer(module) or id(module.weight) in embedded:
            continue
        key = id(module.weight)
        if key in refs:
            refs[key].users += 1
        else:
            refs[key] = LayerRef(path, module)
    return list(refs.values())


def layer_weight_count(model: nn.Module) -> int:
    """Number of weights in the model's compressible layers (the fraction's denominator)."""
    return sum(ref.weight_count for ref in compressible_layers(model))


__all__ = ["LayerRef", "compressible_layers", "layer_weight_count"]
