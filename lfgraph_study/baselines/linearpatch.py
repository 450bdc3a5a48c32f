"""LinearPatch (Chen et al., NeurIPS 2025), training-free: delete the angular-chosen
contiguous block (as Gromov et al.) and patch the hidden state at the cut with

    P = Hᵀ diag(s) H

where ``H`` is an orthonormal Hadamard rotation (it spreads the few massive-activation
channels over all channels) and ``s`` a per-channel scale in the rotated space fitted on
calibration tokens so that ``P X ≈ Y`` (``X``: the last kept layer's output, ``Y``: the last
removed layer's output). ``scale="lstsq"`` fits each channel by least squares
(``s_c = Σ x_c y_c / Σ x_c²``), ``scale="magnitude"`` matches mean magnitudes
(``s_c = mean|y_c| / mean|x_c|``). The paper's optional distillation of ``P`` is training,
not done here.

Deviations, stated: when the width ``d`` is not a power of two (SmolLM2: 576), ``H`` is
block-diagonal with Hadamard blocks of the largest power of two dividing ``d`` (576 = 9 x 64).
``P`` acts on the whole residual stream, so it cannot be folded into one projection; it is
a ``d x d`` ``nn.Linear`` applied to the input of the first block after the cut (to the
output of the last block when the cut reaches the top), and its ``d²`` weights count
against the method's weight fraction.
"""

from __future__ import annotations

from typing import Any

import torch
from scipy.linalg import hadamard
from torch import nn

from lfgraph.calibration import block_output
from lfgraph.passes.block_stack import remove_blocks
from .gromov import angular_block
from .interface import Method, find_block_stack, n_blocks_for, register
from .replaceme import cut_activations


def hadamard_rotation(d: int) -> torch.Tensor:
    """An orthonormal ``d x d`` rotation: block-diagonal Hadamard blocks of the largest
    power of two dividing ``d``, each scaled by ``1/sqrt(block)``."""
    block = d & -d  # largest power of two dividing d
    h = torch.tensor(hadamard(block), dtype=torch.float64) / block**0.5
    return torch.block_diag(*[h] * (d // block))


class PatchedBlock(nn.Module):
    """A block with a linear patch on its input (``where="before"``) or output (``"after"``).
    Keyword arguments pass through, so it stands in for a Hugging Face decoder layer."""

    def __init__(self, block: nn.Module, patch: nn.Linear, where: str) -> None:
        super().__init__()
        self.block, self.patch, self.where = block, patch, where
        for attr in ("attention_type",):  # read by some HF models' loops over their layers
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.where == "before":
            return self.block(self.patch(hidden_states), *args, **kwargs)
        out = self.block(hidden_states, *args, **kwargs)
        if isinstance(out, (tuple, list)):
            return (self.patch(block_output(out)), *out[1:])
        return self.patch(out)


def channel_scales(Xr: torch.Tensor, Yr: torch.Tensor, scale: str) -> torch.Tensor:
    """Per-channel scale of the rotated states (rows are tokens)."""
    if scale == "lstsq":
        return (Xr * Yr).sum(0) / (Xr * Xr).sum(0).clamp_min(1e-30)
    return Yr.abs().mean(0) / Xr.abs().mean(0).clamp_min(1e-30)


def linearpatch(
    model: nn.Module, target: float, calibration: torch.Tensor, *, scale: str = "lstsq", batch_size: int = 4,
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Delete the angular block of ``round(target x blocks)`` and insert the patch ``P``."""
    if scale not in ("lstsq", "magnitude"):
        from lfgraph.errors import LfgraphError

        raise LfgraphError(f"unknown LinearPatch scale {scale!r}: choose lstsq or magnitude")
    cpath = find_block_stack(model)
    n = n_blocks_for(model, target, cpath)
    start, dist = angular_block(model, calibration, n, batch_size, min_start=1)
    act = cut_activations(model, cpath, start, n, calibration, batch_size)
    H = hadamard_rotation(act.X.shape[1])
    Xr, Yr = act.X.double() @ H.T, act.Y.double() @ H.T
    s = channel_scales(Xr, Yr, scale)
    P = H.T @ torch.diag(s) @ H
    patch = nn.Linear(P.shape[0], P.shape[0], bias=False)
    with torch.no_grad():
        patch.weight.copy_(P.float())
    stack = model.get_submodule(cpath)
    if start + n < len(stack):
        stack[start + n] = PatchedBlock(stack[start + n], patch, "before")
    else:
        stack[start - 1] = PatchedBlock(stack[start - 1], patch, "after")
    names = [f"{cpath}.{i}" for i in range(start, start + n)]
    remove_blocks(model, names)
    return model, names, {"start": start, "angular_distance": round(dist[start], 6), "scale": scale, "tokens": act.X.shape[0]}


register(Method("linearpatch", "depth", "LinearPatch: delete the angular block, Hadamard-rotated channel scaling at the cut", linearpatch))
