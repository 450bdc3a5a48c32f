"""Randomized truncated SVD (the paper's ``svd`` baseline, Halko, Martinsson & Tropp 2011).

A layer with weight matrix ``W`` (``out × fan_in``; convolutions flattened to
``out × in·kh·kw``, GPT-2 ``Conv1D`` transposed) is replaced by two dense layers computing
``W ≈ B A`` with ``A = √S Vᵀ`` (``r × fan_in``) and ``B = U √S`` (``out × r``), the
original bias on the second. The rank keeps ``(1 − fraction)`` of the layer's weights:

    r = max(1, floor((1 − fraction) · out · fan_in / (out + fan_in)))

A layer where ``r ≥ min(out, fan_in)`` would not shrink and is left as it is. The factors
come from ``torch.svd_lowrank`` (randomized range finder with 8 oversampling columns and 4
power iterations, under a fixed seed), then truncated to ``r``. Layers are processed from
the input to the output; without data the order does not change the result (the data-aware
cascade of the paper's student rollout is the ``dae`` baseline).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .pruning import progress_over
from lfgraph.errors import LfgraphError
from lfgraph.retrain.modes import is_conv1d_transposed

if TYPE_CHECKING:
    from .layers import LayerRef

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``(out, fan_in)`` matrix (a detached float view or copy)."""
    w = module.weight.detach()
    if is_conv1d_transposed(module):
        return w.t()
    return w.reshape(w.shape[0], -1)


def can_factorize(module: nn.Module) -> bool:
    """Linear, GPT-2 Conv1D, or an ungrouped convolution with zero padding."""
    if isinstance(module, _CONVS):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear) or is_conv1d_transposed(module)


def rank_for(module: nn.Module, fraction: float) -> int:
    """The rank whose two factors hold ``(1 − fraction)`` of the layer's weights (≥ 1)."""
    out, fan_in = weight_matrix(module).shape
    return max(1, int((1.0 - fraction) * out * fan_in // (out + fan_in)))


def factorized_layer(
    module: nn.Module,
    first: torch.Tensor,
    second: torch.Tensor,
    first_bias: torch.Tensor | None = None,
    second_bias: torch.Tensor | None = None,
    activation: nn.Module | None = None,
) -> nn.Sequential:
    """Two dense layers ``x ↦ second · act(first · x + first_bias) + second_bias`` in place of ``module``.

    ``first`` is ``(r, fan_in)`` and acts like ``module`` on its input (for a convolution:
    same kernel, stride, padding and dilation, ``r`` output channels); ``second`` is
    ``(out, r)`` (a 1×1 convolution for convolutions). The result takes and returns what
    ``module`` takes and returns. Nothing is modified.
    """
    r, out = first.shape[0], second.shape[0]
    dtype, device = module.weight.dtype, module.weight.device
    if isinstance(module, _CONVS):
        conv = type(module)
        w = module.weight
        a = conv(module.in_channels, r, module.kernel_size, module.stride, module.padding, module.dilation, bias=first_bias is not None)
        a.weight.data = first.reshape(r, *w.shape[1:]).to(dtype=dtype, device=device).contiguous()
        b = conv(r, out, 1, bias=second_bias is not None)
        b.weight.data = second.reshape(out, r, *([1] * (w.dim() - 2))).to(dtype=dtype, device=device).contiguous()
    else:
        a = nn.Linear(first.shape[1], r, bias=first_bias is not None)
        a.weight.data = first.to(dtype=dtype, device=device).contiguous()
        b = nn.Linear(r, out, bias=second_bias is not None)
        b.weight.data = second.to(dtype=dtype, device=device).contiguous()
    if first_bias is not None:
        a.bias.data = first_bias.to(dtype=dtype, device=device).clone()
    if second_bias is not None:
        b.bias.data = second_bias.to(dtype=dtype, device=device).clone()
    layers = [a] + ([activation] if activation is not None else []) + [b]
    return nn.Sequential(*layers)


def low_rank_layer(module: nn.Module, rank: int, seed: int = 0, niter: int = 4, oversample: int = 8) -> nn.Sequential:
    """``module`` as two dense layers of rank ``rank`` by randomized truncated SVD.

    With ``rank = min(out, fan_in)`` the result reproduces ``module`` up to float error.
    Expects ``can_factorize(module)``. Nothing is modified; the global RNG is untouched.
    """
    if not can_factorize(module):
        raise LfgraphError(f"{type(module).__name__} cannot be factorized (grouped or non-zero-padded convolution?)")
    w = weight_matrix(module).to(torch.float64)
    full = min(w.shape)
    if not 1 <= rank <= full:
        raise LfgraphError(f"rank {rank} is out of range for a {tuple(w.shape)} weight: give 1..{full}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=min(rank + oversample, full), niter=niter)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    first = root[:, None] * v.t()  # (r, fan_in)
    second = u * root[None, :]  # (out, r)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return factorized_layer(module, first, second, None, bias)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``path`` of ``root`` (in place)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def factorized_weight_count(module: nn.Module) -> int:
    """Weights of a factorized layer (both factors), or of a plain layer."""
    if isinstance(module, nn.Sequential):
        return sum(m.weight.numel() for m in module if hasattr(m, "weight"))
    return int(module.weight.numel())


@torch.no_grad()
def compress_svd(
    model: nn.Module, layers: list["LayerRef"], fraction: float, data: Any = None, progress: bool = False, seed: int = 0
) -> tuple[nn.Module, float]:
    """Replace every factorizable, untied layer by its rank-``rank_for`` factorization (in place).

    The achieved fraction is ``1 − (weights after) / (weights before)`` over all layers,
    counting skipped layers as unchanged.
    """
    it = progress_over(layers, progress, "svd")
    before = after = 0
    for ref in it:
        n = ref.weight_count
        before += n
        rank = rank_for(ref.module, fraction)
        if ref.users > 1 or not can_factorize(ref.module) or rank >= min(weight_matrix(ref.module).shape):
            after += n
            continue
        new = low_rank_layer(ref.module, rank, seed=seed)
        replace_module(model, ref.path, new)
        after += factorized_weight_count(new)
    return model, 1.0 - after / max(before, 1)
