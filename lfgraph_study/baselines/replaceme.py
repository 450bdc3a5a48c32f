"""ReplaceMe (Shopkhoev et al., NeurIPS 2025): delete the contiguous block of ``n`` layers
chosen by angular distance (as Gromov et al.) and fold a ``d x d`` linear map ``T`` into the
MLP down projection of the last layer kept before the cut: ``W <- Tᵀ W`` (and ``b <- Tᵀ b``).

With, on every calibration token, ``A`` = that layer's MLP output, ``X`` = its output hidden
state and ``Y`` = the output hidden state of the last removed layer, the layer's output
becomes ``X − A + A T``, which should equal ``Y``:

- ``replaceme-lstsq``: ``T = argmin ‖A T − B‖²`` with ``B = Y − X + A`` (closed form,
  float64 normal equations; ``ridge`` > 0 adds ``ridge x trace(AᵀA)/d`` to the diagonal);
- ``replaceme-cosine``: ``T`` (from the identity) minimising the mean cosine distance
  ``1 − cos(X − A + A T, Y)`` with Adam.

The layer keeps its parameter count (``T`` is folded), so the model loses exactly the
deleted layers. The cut must leave a layer below it (the search starts at block 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lfgraph.calibration import batches
from lfgraph.calibration import stack_hidden_states
from lfgraph.passes.block_stack import remove_blocks
from lfgraph.passes.calibrated_fusion import MLP_OUT_NAMES, _find, _proj_matrix, _set_proj_matrix
from ._hidden import tokens
from .gromov import angular_block
from .interface import Method, find_block_stack, n_blocks_for, register


@dataclass
class CutActivations:
    """Per-token activations at a cut (rows are tokens): ``A`` the MLP output of the last
    kept layer, ``X`` its output hidden state, ``Y`` the last removed layer's output."""

    A: torch.Tensor
    X: torch.Tensor
    Y: torch.Tensor

    @property
    def B(self) -> torch.Tensor:
        """The least-squares target ``Y − X + A``."""
        return self.Y - self.X + self.A


@torch.no_grad()
def cut_activations(model: nn.Module, cpath: str, start: int, n: int, calibration: torch.Tensor, batch_size: int = 4, mlp_proj: str | None = None) -> CutActivations:
    """Collect :class:`CutActivations` for deleting blocks ``start .. start+n-1``."""
    stack = list(model.get_submodule(cpath))
    kept = stack[start - 1]
    _, proj = _find(kept, MLP_OUT_NAMES, "MLP output projection", mlp_proj)
    got: list[torch.Tensor] = []
    handle = proj.register_forward_hook(lambda _m, _a, out: got.append(out.detach()))
    A, X, Y = [], [], []
    try:
        for b in batches(calibration, batch_size):
            got.clear()
            states, _ = stack_hidden_states(model, stack[: start + n], b)
            A.append(tokens(got[-1]).float())
            X.append(tokens(states[start]).float())
            Y.append(tokens(states[start + n]).float())
    finally:
        handle.remove()
    return CutActivations(torch.cat(A), torch.cat(X), torch.cat(Y))


def lstsq_map(A: torch.Tensor, B: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``T = argmin_T ‖A T − B‖²`` in float64, ``(d, d)``: ``torch.linalg.lstsq`` (the
    minimum-norm solution when ``A`` has fewer independent rows than columns). With ``ridge``
    > 0, ``+ lam ‖T‖²`` with ``lam = ridge x trace(AᵀA)/d`` (normal equations)."""
    A, B = A.double(), B.double()
    if ridge > 0:
        G = A.T @ A
        G = G + ridge * float(torch.diagonal(G).mean()) * torch.eye(G.shape[0], dtype=G.dtype)
        return torch.linalg.solve(G, A.T @ B)
    return torch.linalg.lstsq(A, B, driver="gelsd").solution


def cosine_map(act: CutActivations, steps: int = 200, lr: float = 1e-4, batch_tokens: int = 1024, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """``T`` minimising the mean ``1 − cos(X − A + A T, Y)`` with Adam from the identity
    (mini-batches of ``batch_tokens`` tokens); returns ``T`` and the loss per step."""
    d = act.A.shape[1]
    T = torch.eye(d, requires_grad=True)
    opt = torch.optim.Adam([T], lr=lr)
    g = torch.Generator().manual_seed(seed)
    rest = act.X - act.A
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, act.A.shape[0], (min(batch_tokens, act.A.shape[0]),), generator=g)
            pred = rest[idx] + act.A[idx] @ T
            loss = (1.0 - torch.nn.functional.cosine_similarity(pred, act.Y[idx], dim=-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return T.detach().double(), losses


@torch.no_grad()
def fold_map(proj: nn.Module, T: torch.Tensor) -> None:
    """``W <- Tᵀ W`` (bias ``b <- Tᵀ b``): the projection's output ``o`` becomes ``o T``."""
    _set_proj_matrix(proj, T.double().T @ _proj_matrix(proj))


def _replaceme(objective: str):
    def compress(
        model: nn.Module, target: float, calibration: torch.Tensor, *, batch_size: int = 4, ridge: float = 0.0, steps: int = 200,
        lr: float = 1e-4, mlp_proj: str | None = None,
    ) -> tuple[nn.Module, list[str], dict[str, Any]]:
        cpath = find_block_stack(model)
        n = n_blocks_for(model, target, cpath)
        start, dist = angular_block(model, calibration, n, batch_size, min_start=1)
        act = cut_activations(model, cpath, start, n, calibration, batch_size, mlp_proj)
        details: dict[str, Any] = {"start": start, "angular_distance": round(dist[start], 6), "tokens": act.A.shape[0]}
        if objective == "lstsq":
            T = lstsq_map(act.A, act.B, ridge)
        else:
            T, losses = cosine_map(act, steps=steps, lr=lr)
            details["cosine_loss"] = [round(losses[0], 6), round(losses[-1], 6)]
        _, proj = _find(model.get_submodule(cpath)[start - 1], MLP_OUT_NAMES, "MLP output projection", mlp_proj)
        fold_map(proj, T)
        names = [f"{cpath}.{i}" for i in range(start, start + n)]
        remove_blocks(model, names)
        return model, names, details

    compress.__name__ = f"replaceme_{objective}"
    return compress


replaceme_lstsq = _replaceme("lstsq")
replaceme_cosine = _replaceme("cosine")
register(Method("replaceme-lstsq", "depth", "ReplaceMe: delete the angular block, fold a least-squares d x d map into the layer before", replaceme_lstsq))
register(Method("replaceme-cosine", "depth", "ReplaceMe: delete the angular block, fold a d x d map fitted by Adam on cosine distance", replaceme_cosine))
