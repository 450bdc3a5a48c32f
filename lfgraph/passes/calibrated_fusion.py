"""Calibrated fusion: a run of consecutive blocks becomes one block refitted to reproduce it.

For each run (bottom-up) one block is kept and its output projection is refitted in closed
form so that the kept block alone maps the run's input to (approximately) the run's output:

    W = argmin_W  sum_t w_t ||W z_t - y_t||^2  +  lam ||W - W0||^2
      = (C + lam W0) (G + lam I)^-1,     G = sum_t w_t z_t z_t^T,  C = sum_t w_t y_t z_t^T

- Transformers (pre-LayerNorm: ``out = x + attn(x) + down(z)``): ``z_t`` is the MLP down
  projection's input at token ``t`` in the kept block and ``y_t`` the run's output minus
  everything else the kept block adds (its input and its attention update). Optionally the
  attention output projection is refitted first, so that the kept block's attention update
  matches the sum of the run's attention updates; the MLP is then fitted on the result.
- ResNet-style basic blocks (``relu(bn2(conv2(u)) + x)``): the last convolution, folded with
  its BatchNorm, is fitted on unfolded 3x3 patches of ``u`` so that the kept block's output
  matches the run's output (where the run outputs 0, the pre-activation need only be <= 0).

Every statistic is accumulated in float64 batch by batch (bounded memory: the Gram matrices
plus one hidden state per calibration token at the current depth). The ridge strength is
chosen on a held-out part of the calibration windows from a grid of strengths relative to
``trace(G) / dim`` (so the grid means the same for any amount of data), then the fit is
redone on all windows. ``lam -> infinity`` gives back ``W0``. The held-out part is kept as
rows while it has fewer tokens than the projection has inputs; the grid is searched by a
golden-section walk (4-5 of 9 factorisations; the whole grid when the losses seen are not
unimodal); each factorisation is done in place in one work buffer, so a fit holds two
``in x in`` float64 matrices (the Gram matrix and that buffer).

Each run is fitted on the hidden states of the model as already compressed below it, so
later fits see (and can absorb) the error of earlier ones. The other blocks of each run are
then deleted (:func:`~lfgraph.passes.block_stack.remove_blocks`). Optionally
(``repair_next``) the blocks just above a run are refitted too, towards the original
model's hidden states.

Before fitting a transformer block, the pass checks that the block's output really is
``rest + proj(z)`` (it shifts the projection's output and watches the block's output move
by the same amount), so that post-LayerNorm blocks (BERT) are refused with a clear error
instead of being fitted wrongly.

Which projection is refitted, and how the block adds it to the residual stream, is the
model family's (:mod:`lfgraph.architectures`); plain modules use the names in
:data:`MLP_OUT_NAMES` / :data:`ATTN_OUT_NAMES`. Two family kinds need more than a linear fit:

- **MoE** (Mixtral, Qwen3-MoE): the MoE output is ``sum_e g_e D_e h_e``; the refit is a
  square map ``M`` on that output (fitted as a projection with ``W0 = I``) and folded into
  every expert, ``D_e <- M D_e``. This is exact for any router weights (``M`` is linear
  and the experts have no bias), whether or not they sum to 1 per token.
- **Post-norm** (Gemma 2/3, OLMo 2: ``out = h + s * norm(down(z))`` with ``norm(d) =
  g * d / rms(d)``): the norm only sees the direction of ``d``, so the down projection is
  fitted to the direction of the target divided by the norm's scale (at the magnitude the
  projection already has), then the norm's scale ``g`` is refitted per channel by least
  squares on the norm's output (closed form: it is linear in ``g``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ..calibration import block_output
from ..errors import LfgraphError, UnsupportedModelError
from ..plan import FusionPlan
from .base import PassResult, RewriteLog
from .block_stack import remove_blocks, split_block_name

if TYPE_CHECKING:
    from .map_distillation import DistillSettings

PASS_NAME = "calibrated_fusion"

#: Ridge strengths tried, relative to ``trace(G) / dim`` of the Gram matrix being fitted.
DEFAULT_LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
#: Module names (inside a block) of the MLP's output projection, in the order tried.
MLP_OUT_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "feed_forward.w2", "mlp.dense_4h_to_h")
#: Module names (inside a block) of the attention output projection, in the order tried.
ATTN_OUT_NAMES = ("self_attn.o_proj", "attn.c_proj", "self_attn.out_proj", "attention.wo", "self_attention.dense")
KEEP_POLICIES = ("first", "last", "best")
TOKEN_WEIGHTINGS = ("none", "clip")
TARGETS = ("composite", "original")
#: How much a refit may move a projection: ``full`` refits every entry of ``W`` (out x in);
#: ``map`` only ``W <- M W`` with a square ``M`` (out x out) on its output, as ReplaceMe's ``T``.
REFITS = ("full", "map")


# ---------------------------------------------------------------------------------------
# ridge least squares
# ---------------------------------------------------------------------------------------


@dataclass
class RidgeStats:
    """Weighted sufficient statistics of a least-squares problem ``W z ≈ y``:
    ``G = Σ w z zᵀ`` (in×in), ``C = Σ w y zᵀ`` (out×in), ``S = Σ w ‖y‖²``, ``n`` tokens.

    Two forms: the Gram form (``G``, ``C``), or the rows themselves (``Z = √w z`` (n×in),
    ``Y = √w y`` (n×out); ``G`` and ``C`` are ``None``), which is smaller while ``n <= in``
    (a held-out set of a few hundred tokens against a down projection of thousands of inputs)
    and turns itself into the Gram form when it would no longer be. With ``ref`` (a matrix
    ``out×in``, the starting weights) ``ref_loss`` accumulates ``Σ w ‖ref z - y‖²`` batch by
    batch, which costs a product per batch instead of an ``out×in×in`` one afterwards."""

    G: torch.Tensor | None
    C: torch.Tensor | None
    S: float = 0.0
    n: int = 0
    Z: torch.Tensor | None = None
    Y: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    ref_loss: float = 0.0

    @classmethod
    def zeros(cls, d_in: int, d_out: int, rows: bool = False, ref: torch.Tensor | None = None) -> "RidgeStats":
        ref = None if ref is None else ref.double()
        if rows:
            return cls(None, None, Z=torch.zeros(0, d_in, dtype=torch.float64), Y=torch.zeros(0, d_out, dtype=torch.float64), ref=ref)
        return cls(torch.zeros(d_in, d_in, dtype=torch.float64), torch.zeros(d_out, d_in, dtype=torch.float64), ref=ref)

    @property
    def is_rows(self) -> bool:
        return self.G is None

    def add(self, z: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """Accumulate tokens ``z (n, in)``, ``y (n, out)`` with weights ``w (n,)``."""
        z, y = z.double(), y.double()
        if self.ref is not None:
            r = z @ self.ref.T - y
            self.ref_loss += float((r * r).sum(1).mul(1.0 if w is None else w.double()).sum())
        if self.is_rows:
            if w is not None:
                sw = w.double().sqrt()[:, None]
                z, y = z * sw, y * sw
            self.Z, self.Y = torch.cat([self.Z, z]), torch.cat([self.Y, y])  # type: ignore[list-item]
            self.S += float((y * y).sum())
            self.n += z.shape[0]
            self._compact()
            return
        zw = z if w is None else z * w.double()[:, None]
        self.G.addmm_(zw.T, z)  # type: ignore[union-attr]  # in place: no in×in temporary
        self.C.addmm_(y.T, zw)  # type: ignore[union-attr]
        self.S += float(((y * y).sum(1) * (1.0 if w is None else w.double())).sum())
        self.n += z.shape[0]

    def _compact(self) -> None:
        """Rows form -> Gram form once there are more rows than inputs."""
        if self.is_rows and self.Z.shape[0] > self.Z.shape[1]:  # type: ignore[union-attr]
            self.G, self.C = self.gram()
            self.Z = self.Y = None

    def gram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, C)`` (computed from the rows in the rows form)."""
        if not self.is_rows:
            return self.G, self.C  # type: ignore[return-value]
        return self.Z.T @ self.Z, self.Y.T @ self.Z  # type: ignore[union-attr]

    def absorb(self, other: "RidgeStats") -> "RidgeStats":
        """Add ``other``'s statistics into these, in place (no new in×in matrix when
        ``other`` is in the rows form); returns ``self``."""
        if self.is_rows and other.is_rows:
            self.Z, self.Y = torch.cat([self.Z, other.Z]), torch.cat([self.Y, other.Y])  # type: ignore[list-item]
        else:
            if self.is_rows:
                self.G, self.C = self.gram()
                self.Z = self.Y = None
            if other.is_rows:
                self.G.addmm_(other.Z.T, other.Z)  # type: ignore[union-attr]
                self.C.addmm_(other.Y.T, other.Z)  # type: ignore[union-attr]
            else:
                self.G += other.G  # type: ignore[operator]
                self.C += other.C  # type: ignore[operator]
        self.S += other.S
        self.n += other.n
        self.ref_loss += other.ref_loss
        self._compact()
        return self

    def copy(self) -> "RidgeStats":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return RidgeStats(c(self.G), c(self.C), self.S, self.n, c(self.Z), c(self.Y), self.ref, self.ref_loss)

    def __add__(self, other: "RidgeStats") -> "RidgeStats":
        return self.copy().absorb(other)

    def scale(self) -> float:
        """``trace(G) / dim``: the unit in which ridge strengths are given."""
        diag = (self.Z * self.Z).sum(0) if self.is_rows else torch.diagonal(self.G)  # type: ignore[operator, arg-type]
        return max(float(diag.mean()), 1e-30)

    def loss(self, W: torch.Tensor) -> float:
        """``Σ w ‖W z - y‖²`` from the statistics alone."""
        W = W.double()
        if self.is_rows:
            r = self.Z @ W.T - self.Y  # type: ignore[operator]
            return float((r * r).sum())
        return float((W @ self.G * W).sum() - 2.0 * (W * self.C).sum() + self.S)


def map_stats(stats: RidgeStats, W0: torch.Tensor) -> RidgeStats:
    """The statistics of the problem ``M a ≈ y`` with ``a = W0 z`` (a refit ``W = M W0`` that
    only mixes the projection's outputs): ``G' = W0 G W0ᵀ``, ``C' = C W0ᵀ``."""
    W0 = W0.double()
    if stats.is_rows:
        out = RidgeStats(None, None, stats.S, stats.n, stats.Z @ W0.T, stats.Y)  # type: ignore[operator]
        out._compact()
        return out
    return RidgeStats(W0 @ stats.G @ W0.T, stats.C @ W0.T, stats.S, stats.n)


def _factor_shifted(G: torch.Tensor, lam: float, work: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of ``G + lam I`` (C order), computed in ``work``
    (overwritten: the shifted matrix and then its factor share this one buffer). LAPACK's
    ``potrf`` through scipy factors it in place: the C-ordered symmetric matrix is read as the
    same matrix in Fortran order, upper triangle, and ``Uᵀ U`` in Fortran order is ``L Lᵀ``
    in C order. (``torch.linalg.cholesky_ex(out=work)`` is faster here (MKL) but measured one
    more transient ``in x in`` copy.) ``None`` when the matrix is not positive definite;
    ``work`` then holds ``G + lam I``."""
    from scipy.linalg import LinAlgError, cho_factor

    work.copy_(G)
    work.diagonal().add_(lam)
    try:
        cho_factor(work.numpy().T, lower=False, overwrite_a=True, check_finite=False)
    except LinAlgError:
        work.copy_(G)
        work.diagonal().add_(lam)
        return None
    return work


def _cho_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``A^-1 rhs`` given ``A``'s lower Cholesky factor ``L`` (C order) and ``rhs (in, k)``
    stored as the transpose of a C-ordered ``(k, in)`` matrix, solved in place (the result
    shares ``rhs``'s memory). LAPACK's ``potrs`` through scipy reads ``L``'s memory as the
    Fortran-ordered ``Lᵀ``: no copy of the factor (``torch.cholesky_solve`` makes one, a
    third ``in x in`` matrix)."""
    from scipy.linalg import cho_solve

    b = rhs.contiguous() if not rhs.T.is_contiguous() else rhs
    return torch.from_numpy(cho_solve((factor.numpy().T, False), b.numpy(), overwrite_b=True, check_finite=False))


class _Dual:
    """The ridge problem of statistics held as rows (``n`` tokens, fewer than the ``in``
    inputs) solved in its dual form: with ``R = Y - Z W0ᵀ`` (what ``W0`` leaves) and the
    ``n x n`` kernel ``K = Z Zᵀ``, ``W = W0 + Tᵀ Z`` with ``T = (K + lam I)^-1 R``, the same
    solution as the primal ``(C + lam W0)(G + lam I)^-1`` (push-through identity) at the
    cost of ``n x n`` factorisations instead of ``in x in`` ones: no ``in x in`` matrix
    exists (at 8B, a down projection has 14336 inputs and a refit sees ~1000 tokens)."""

    def __init__(self, stats: RidgeStats, W0: torch.Tensor) -> None:
        assert stats.is_rows
        self.Z: torch.Tensor = stats.Z  # type: ignore[assignment]
        self.K = self.Z @ self.Z.T
        self.R = stats.Y - self.Z @ W0.double().T  # type: ignore[operator]
        self.scale = stats.scale()

    def coef(self, strength: float) -> torch.Tensor:
        """``T = (K + lam I)^-1 R`` (``n x out``); the pseudo-inverse when ``K + lam I`` is
        singular (``strength`` 0 with more tokens than independent directions)."""
        A = self.K.clone()
        A.diagonal().add_(strength * self.scale)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_solve(self.R, L)
        return torch.linalg.lstsq(A, self.R, driver="gelsd").solution

    def solution(self, W0: torch.Tensor, strength: float) -> torch.Tensor:
        W = self.coef(strength).T @ self.Z
        return W.add_(W0)

    def heldout_losses(self, val: RidgeStats, W0: torch.Tensor) -> Any:
        """``strength -> val.loss(solution(strength))`` without forming a solution: the
        held-out predictions' error is ``Zv Zᵀ T - Rv`` (``n_val x out``)."""
        Kv = val.Z @ self.Z.T  # type: ignore[union-attr]
        Rv = val.Y - val.Z @ W0.double().T  # type: ignore[operator]

        def loss(strength: float) -> float:
            E = Kv @ self.coef(strength) - Rv
            return float((E * E).sum())
        return loss


def ridge_solve(stats: RidgeStats, W0: torch.Tensor, strength: float, work: torch.Tensor | None = None) -> torch.Tensor:
    """``argmin_W Σ w ‖W z - y‖² + lam ‖W - W0‖²`` with ``lam = strength * stats.scale()``.

    Returns float64 ``(out, in)``. ``strength -> inf`` gives ``W0``; ``strength -> 0`` the
    ordinary least-squares fit (when ``G`` is invertible). ``work`` (``in x in`` float64) is
    overwritten; without it one is allocated: the solve holds ``G``, that one buffer (the
    shifted matrix, then its factor) and one ``out x in`` matrix (``C + lam W0``, then the
    solution). Statistics held as rows (fewer tokens than inputs) are solved in the dual
    form (:class:`_Dual`): no ``in x in`` matrix, ``work`` unused.
    """
    if stats.is_rows:
        return _Dual(stats, W0).solution(W0, strength)
    lam = strength * stats.scale()
    G, C = stats.gram()
    work = torch.empty_like(G) if work is None else work
    B = torch.add(C, W0.double(), alpha=lam)
    # G + lam I is symmetric positive definite for lam > 0: Cholesky is exact and cheap
    factor = _factor_shifted(G, lam, work)
    if factor is None:
        return torch.linalg.lstsq(work, B.T).solution.T
    return _cho_solve(factor, B.T).T


def _solution_loss(stats: RidgeStats, W0: torch.Tensor, W: torch.Tensor, strength: float) -> float:
    """``stats.loss(W)`` for ``W = ridge_solve(stats, W0, strength)`` in ``O(out x in)``: the
    solution satisfies ``W G = C + lam (W0 - W)``, so ``tr(W G Wᵀ) = <C, W> + lam <W0 - W, W>``
    and the loss is ``S - <C, W> + lam <W0 - W, W>`` (no ``out x in x in`` product)."""
    if stats.is_rows:
        return stats.loss(W)
    lam = strength * stats.scale()
    W0 = W0.double()
    return max(0.0, float(stats.S - (stats.C * W).sum() + lam * ((W0 - W) * W).sum()))  # type: ignore[operator]


def _heldout_loss(fit: RidgeStats, G: torch.Tensor, C: torch.Tensor, val: RidgeStats, W0: torch.Tensor, strength: float,
                  work: torch.Tensor) -> float:
    """``val.loss(ridge_solve(fit, W0, strength))`` without forming the solution when ``val``
    holds rows: ``W Zvᵀ = (C + lam W0) (G + lam I)^-1 Zvᵀ`` costs one factorisation and a
    solve with ``n_val`` right-hand sides instead of ``out``, and no ``out x in x in``
    product for the loss."""
    if not val.is_rows:
        return val.loss(ridge_solve(fit, W0, strength, work))
    lam = strength * fit.scale()
    factor = _factor_shifted(G, lam, work)
    if factor is None:
        return val.loss(torch.linalg.lstsq(work, torch.add(C, W0.double(), alpha=lam).T).solution.T)
    X = _cho_solve(factor, val.Z.clone().T)  # type: ignore[union-attr]  # (in, n_val)
    pred = torch.add(C, W0.double(), alpha=lam) @ X  # (out, n_val) = W Zvᵀ
    r = pred.T - val.Y  # type: ignore[operator]
    return float((r * r).sum())


#: How :func:`choose_strength` searches the grid: ``golden`` a golden-section walk over the
#: sorted strengths (the full grid when the losses it sees are not unimodal), ``grid`` all.
STRENGTH_SEARCHES = ("golden", "grid")


def choose_strength(fit: RidgeStats, val: RidgeStats | None, W0: torch.Tensor, strengths: Sequence[float],
                    search: str = "golden", work: torch.Tensor | None = None) -> tuple[float, dict[float, float]]:
    """The strength of ``strengths`` with the lowest held-out loss (fit on ``fit``, scored on
    ``val``); with no held-out statistics or a single strength, the first one. Returns it
    and the held-out losses of the strengths evaluated.

    ``search="golden"``: a golden-section search over the strengths sorted by value, which
    finds the grid's minimum with about 5 of 9 factorisations when the held-out loss is
    unimodal over the grid. It checks that the losses it evaluated are unimodal (falling,
    then rising, in the order of the strengths) and evaluates the rest of the grid when
    they are not, so the answer is the full grid's whenever the curve's shape is visible in
    the points evaluated. ``grid``: every strength.
    """
    if search not in STRENGTH_SEARCHES:
        raise LfgraphError(f"unknown strength search {search!r}: choose one of {', '.join(STRENGTH_SEARCHES)}")
    if val is None or val.n == 0 or len(strengths) == 1:
        return float(strengths[0]), {}
    if fit.is_rows:  # fewer fitting tokens than inputs: the dual form, no in x in matrix
        dual = _Dual(fit, W0)
        heldout = dual.heldout_losses(val, W0) if val.is_rows else lambda s: val.loss(dual.solution(W0, s))
    else:
        G, C = fit.gram()
        work = torch.empty_like(G) if work is None else work
        heldout = lambda s: _heldout_loss(fit, G, C, val, W0, s, work)  # noqa: E731
    order = sorted({float(s) for s in strengths})
    losses: dict[float, float] = {}

    def f(i: int) -> float:
        s = order[i]
        if s not in losses:
            losses[s] = heldout(s)
        return losses[s]

    if search == "grid" or len(order) < 4:
        for i in range(len(order)):
            f(i)
    else:
        lo, hi = 0, len(order) - 1
        step = lambda a, b: max(1, round((b - a) * 0.381966))  # noqa: E731  # 1 - 1/golden ratio
        while hi - lo > 2:
            m1, m2 = lo + step(lo, hi), hi - step(lo, hi)
            if m1 >= m2:
                m1, m2 = (lo + hi) // 2, (lo + hi) // 2 + 1
            if f(m1) <= f(m2):
                hi = m2
            else:
                lo = m1
        for i in range(lo, hi + 1):
            f(i)
        seen = [losses[s] for s in order if s in losses]
        k = seen.index(min(seen))
        if any(a < b for a, b in zip(seen[:k], seen[1:k + 1])) or any(a > b for a, b in zip(seen[k:], seen[k + 1:])):
            for i in range(len(order)):  # not unimodal where it was looked at: the whole grid
                f(i)
    return min(losses, key=lambda s: (losses[s], -s)), losses


# ---------------------------------------------------------------------------------------
# projections: nn.Linear and Hugging Face Conv1D (x @ W, weight stored (in, out))
# ---------------------------------------------------------------------------------------


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _proj_matrix(m: nn.Module) -> torch.Tensor:
    """The projection's ``(out, in [+1])`` matrix; a bias becomes the last column."""
    if isinstance(m, nn.Linear):
        W = m.weight.detach()
    elif _is_conv1d(m):
        W = m.weight.detach().T
    else:
        raise UnsupportedModelError(f"cannot refit a {type(m).__name__}: only Linear and Conv1D projections are supported")
    if getattr(m, "bias", None) is not None:
        W = torch.cat([W, m.bias.detach()[:, None]], dim=1)
    return W.double()


@torch.no_grad()
def _set_proj_matrix(m: nn.Module, W: torch.Tensor) -> None:
    has_bias = getattr(m, "bias", None) is not None
    weight = W[:, :-1] if has_bias else W
    if has_bias:
        m.bias.copy_(W[:, -1].to(m.bias.dtype))
    if isinstance(m, nn.Linear):
        m.weight.copy_(weight.to(m.weight.dtype))
    else:
        m.weight.copy_(weight.T.to(m.weight.dtype))


def _features(z: torch.Tensor, with_bias: bool) -> torch.Tensor:
    z = z.reshape(-1, z.shape[-1])
    return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1) if with_bias else z


class _Projection:
    """What a transformer refit changes, as a matrix ``W (out, in[+1])`` acting on features.

    A dense projection (``nn.Linear``/``Conv1D``): its input are the features, its weight
    (and bias) the matrix. An MoE (``experts``: the stacked ``(E, out, inter)`` down
    projections): the features are the MoE's output and ``W0 = I``; setting ``W`` folds
    it into every expert (``D_e <- W D_e``)."""

    def __init__(self, block: nn.Module, name: str, experts: str | None = None) -> None:
        self.name = name
        self.module = block.get_submodule(name)
        self.experts = block.get_parameter(experts) if experts else None

    def matrix(self) -> torch.Tensor:
        if self.experts is not None:
            return torch.eye(self.experts.shape[1], dtype=torch.float64)
        return _proj_matrix(self.module)

    @torch.no_grad()
    def set(self, W: torch.Tensor) -> None:
        if self.experts is None:
            _set_proj_matrix(self.module, W)
            return
        folded = torch.einsum("ij,ejk->eik", W.double(), self.experts.double())
        self.experts.copy_(folded.to(self.experts.dtype))

    def features(self, cap: "_Capture", W0: torch.Tensor) -> torch.Tensor:
        z = _first(cap.outputs[0]) if self.experts is not None else cap.inputs[0]
        return _features(z, W0.shape[1] != z.shape[-1])


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@dataclass
class _BlockForm:
    """How a block adds the refitted projection's output to the residual stream:
    ``out = rest + scale * post(d)``; ``post`` is the post-MLP norm (``None``: identity)
    whose scale is ``offset + weight``."""

    scale: float = 1.0
    post: str | None = None
    offset: float = 0.0


def _mlp_target(block: nn.Module, arch: Any, given: str | None) -> tuple[str, str | None]:
    """(block-relative name of the MLP refit target, experts' down projections or None)."""
    if given or arch is None:
        return _find(block, MLP_OUT_NAMES, "MLP output projection", given)[0], None
    name, experts = arch.mlp_target(block)
    _find(block, [name], f"MLP output projection ({arch.name}: lfgraph/architectures/)", None)
    return name, experts


def _find(block: nn.Module, names: Sequence[str], what: str, given: str | None) -> tuple[str, nn.Module]:
    for name in ([given] if given else names):
        try:
            return name, block.get_submodule(name)
        except AttributeError:
            continue
    raise UnsupportedModelError(
        f"{type(block).__name__} has no {what} among {list([given] if given else names)}: name it with "
        f"{'mlp_proj' if what.startswith('MLP') else 'attn_proj'}=..."
    )


class _Capture:
    """Forward hooks recording a module's input and output on every call (a list per run)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.inputs.append(args[0])
        self.outputs.append(out)

    def remove(self) -> None:
        self._h.remove()


def _token_weights(update: torch.Tensor, mode: str, clip: float) -> torch.Tensor | None:
    """Per-token weights from the norms of the run's update (``(tokens, d)``): with ``clip``,
    tokens whose update is more than ``clip`` times the median norm are weighted down so
    that each counts as if its norm were ``clip`` x median. Why: a few positions (the first
    token of a sequence in many LMs) carry updates hundreds of times larger than the rest
    and would otherwise decide the fit alone."""
    if mode == "none":
        return None
    norms = update.double().norm(dim=-1)
    cap = clip * norms.median().clamp_min(1e-12)
    return (cap / norms.clamp_min(1e-12)).clamp(max=1.0) ** 2


# ---------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------


@dataclass
class _Batch:
    ids: torch.Tensor
    calls: list[Any]  # what each layer of the stack is called with (lfgraph.blocks.LayerCall)
    x: torch.Tensor  # hidden state entering the current run, in the compressed model
    xo: torch.Tensor | None  # the same in the original model (target="original")
    val: bool

    def run(self, block: nn.Module, i: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``block``'s output as layer ``i`` of the stack, on ``x`` (default: ``self.x``)."""
        return self.calls[i](block, self.x if x is None else x)


@dataclass
class _RunSpec:
    names: list[str]
    index: list[int]
    keep: int | None  # index into the container, None = decide ("best")
    repair: bool = False  # a block after a run, refitted towards the original model


def _kind(block: nn.Module) -> str:
    if isinstance(getattr(block, "conv2", None), nn.Conv2d) and isinstance(getattr(block, "bn2", None), nn.BatchNorm2d):
        if getattr(block, "downsample", None) is not None:
            raise UnsupportedModelError(f"{type(block).__name__} has a projection skip: only identity-skip blocks can be fused")
        return "conv"
    return "transformer"


def _split_validation(n: int, val_fraction: float) -> torch.Tensor:
    """Boolean mask of held-out windows, spread evenly (every k-th window)."""
    mask = torch.zeros(n, dtype=torch.bool)
    n_val = int(round(n * val_fraction))
    if n >= 2 and n_val >= 1:
        n_val = min(n_val, n - 1)
        mask[torch.linspace(n - 1, 0, n_val).round().long()] = True
    return mask


def advance(source: Any, indices: Sequence[int], state: list[_Batch], attr: str = "x") -> None:
    """Run every batch's state (``b.x``, or ``b.xo``) through ``source``'s blocks ``indices``
    in order, one block in memory at a time."""
    if not indices:
        return
    for i, block in source.blocks(list(indices)):
        for b in state:
            setattr(b, attr, b.run(block, i, getattr(b, attr)))


def run_outputs(source: Any, indices: Sequence[int], state: list[_Batch], attr: str = "x", capture: str | None = None,
                inspect: Callable[[nn.Module], Any] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The output of ``source``'s blocks ``indices`` (a run) for each batch, from its state
    ``attr``; with ``capture`` (a block-relative module path), also the sum over the run of
    that module's outputs per batch (the run's attention updates). ``inspect(block)``
    sees each block first (and may refuse it)."""
    outs = [getattr(b, attr) for b in state]
    sums: list[torch.Tensor] = []
    for i, block in source.blocks(list(indices)):
        if inspect is not None:
            inspect(block)
        cap = _Capture(block.get_submodule(capture)) if capture else None
        try:
            outs = [b.run(block, i, x) for b, x in zip(state, outs)]
        finally:
            if cap is not None:
                cap.remove()
        if cap is not None:
            got = [_first(o) for o in cap.outputs]
            sums = got if not sums else [a + g for a, g in zip(sums, got)]
    return outs, sums


def _state_of(block: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def _changed(block: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of ``block``'s tensors that differ from ``before`` (a :func:`_state_of`)."""
    return [k for k, v in block.state_dict().items() if k in before and not torch.equal(v, before[k])]


def blocks_to_train(stack: Sequence[nn.Module], keeps: Sequence[int], runs: Sequence[Sequence[int]], trainable: str) -> list[nn.Module]:
    """The blocks of ``stack`` that train with the distilled maps under ``trainable``
    (``lfgraph.passes.map_distillation.DISTILL_TRAINABLE``), before the runs' absorbed
    blocks are removed: ``maps`` none; ``neighbors`` each run's kept block (``keeps``) and
    the first surviving block after the run; ``blocks`` every surviving block. Each block
    once, in stack order."""
    gone = {i for run, keep in zip(runs, keeps) for i in run if i != keep}
    alive = [i for i in range(len(stack)) if i not in gone]
    if trainable == "maps":
        return []
    if trainable == "blocks":
        return [stack[i] for i in alive]
    picked: set[int] = set()
    for run, keep in zip(runs, keeps):
        picked |= {keep, *[j for j in alive if j > max(run)][:1]}
    return [stack[i] for i in sorted(picked)]


@torch.no_grad()
def calibrated_merge(
    module: nn.Module,
    runs: Sequence[Sequence[str]],
    calibration: torch.Tensor,
    *,
    keep: str | Sequence[str] = "first",
    fit_attention: bool = False,
    strengths: Sequence[float] = DEFAULT_LAMBDAS,
    token_weighting: str = "clip",
    clip: float = 4.0,
    target: str = "composite",
    refit: str = "full",
    repair_next: int = 0,
    distill: "DistillSettings | None" = None,
    val_fraction: float = 0.25,
    batch_size: int = 4,
    mlp_proj: str | None = None,
    attn_proj: str | None = None,
    inplace: bool = False,
    progress: bool = False,
) -> PassResult:
    """Fuse each run of consecutive blocks into one refitted block.

    Args:
        module: the model; ``module(batch)`` runs it on a slice of ``calibration``.
        runs: each a list of block names (module paths in ``module``, e.g.
            ``model.model.layers.7``) of consecutive blocks of one stack; runs must not
            overlap. A run of ``k`` blocks is replaced by one block.
        calibration: token ids ``(N, seq)`` for language models, inputs ``(N, ...)`` for
            vision; a ``val_fraction`` of the windows/samples chooses the ridge strength.
        keep: which block of each run is kept and refitted: ``"first"``, ``"last"``,
            ``"best"`` (the one whose fit leaves the lowest held-out error), or a list with
            one block name per run.
        fit_attention: also refit the attention output projection (transformers).
        strengths: ridge strengths relative to ``trace(G)/dim``; the best on held-out
            windows is used. One value = no selection.
        token_weighting: ``"clip"`` weights down tokens whose run update is more than
            ``clip`` x the median norm; ``"none"`` weights all tokens equally.
        refit: ``"full"`` refits the whole projection matrix; ``"map"`` only a square map
            on its output (``W <- M W``, ReplaceMe's ``T``), with the ridge pulling ``M``
            towards the identity.
        target: ``"composite"`` fits the run applied to the compressed model's hidden
            states; ``"original"`` fits the original model's hidden state after the run
            (also absorbing the error made below it).
        repair_next: after each run, also refit the output projection(s) of up to this
            many following (kept, unfused) blocks so that the hidden state after each of
            them matches the original model's; they stay in the model.
        distill: after every fit, train a square map on each refitted projection's output
            by logit distillation from ``module`` on the calibration windows
            (:mod:`lfgraph.passes.map_distillation`); ``None``: closed form only.
        inplace: modify ``module`` itself; by default a deep copy is rewritten.

    Returns:
        ``PassResult`` whose ``model`` has one block per run (the absorbed blocks deleted,
        Hugging Face configs updated) and whose log has a ``refit`` record per fitted
        projection, a ``remove`` record per deleted block and, with ``distill``, one
        ``distill`` record with the held-out KL before and after. ``module`` is unchanged
        unless ``inplace``.
    """
    for value, allowed, what in ((token_weighting, TOKEN_WEIGHTINGS, "token weighting"), (target, TARGETS, "target"), (refit, REFITS, "refit")):
        if value not in allowed:
            raise LfgraphError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")
    if distill is not None:  # refuse what the distillation would refuse before minutes of refitting
        from .map_distillation import check_settings

        check_settings(distill, calibration)  # type: ignore[arg-type]
    if not runs:
        return PassResult(module, False)
    # distillation needs the original model as teacher: keep a copy when rewriting in place
    teacher = (copy.deepcopy(module) if inplace else module) if distill is not None else None
    model = module if inplace else copy.deepcopy(module)
    model.eval()
    specs = _run_specs(runs, keep)
    cpath = split_block_name(specs[0].names[0])[0]
    arch, form = _architecture(model)
    if distill is not None and arch is not None and arch.experts_down is not None:
        raise LfgraphError(f"{arch.name} is a mixture of experts: the distilled maps train on dense projections only; "
                           "use --fuse calibrated or calibrated-map")
    stack = list(model.get_submodule(cpath))
    track = target == "original" or repair_next > 0
    original: list[nn.Module] | None = None
    if track:
        # the caller's blocks are the original ones unless they are rewritten in place
        original = [copy.deepcopy(b) for b in stack] if inplace else list(module.get_submodule(cpath))
    steps = _steps(specs, cpath, len(stack), target, repair_next)
    log = RewriteLog()
    t0 = time.perf_counter()

    from ..blocks import HeldBlocks

    source = HeldBlocks(model, cpath)
    state = calibration_state(source, calibration, val_fraction, batch_size, track)
    fit_runs(source, specs, state, steps, original=HeldBlocks(_OriginalStack(original), "stack") if track else None, strengths=strengths,
             log=log, cpath=cpath, fit_attention=fit_attention, token_weighting=token_weighting, clip=clip, mlp_proj=mlp_proj,
             attn_proj=attn_proj, refit=refit, arch=arch, form=form, progress=progress)

    refitted = [model.get_submodule(r.target) for r in log.records if r.action == "refit" and r.detail.get("part") != "post-norm scale"]
    gone = [i for s in specs for i in s.index if i != s.keep]
    absorbed = [f"{cpath}.{i}" for i in gone]
    # the blocks that train with the maps, held as objects: remove_blocks renumbers the stack
    trained: list[nn.Module] = []
    if distill is not None:
        trained = blocks_to_train(stack, [s.keep for s in specs], [s.index for s in specs], distill.trainable)  # type: ignore[arg-type]
    remove_blocks(model, absorbed)
    if distill is not None:
        from .map_distillation import distill_maps

        curve = distill_maps(model, teacher, refitted, calibration, distill, blocks=trained)  # type: ignore[arg-type]
        log.add(PASS_NAME, "distill", cpath, [r.target for r in log.records if r.action == "refit"],
                steps=curve["steps"], best_step=curve["best_step"], kl_start=curve.get("kl_start"), kl_best=curve.get("kl_best"),
                seconds=round(curve["seconds"], 3), trainable_params=curve["trainable_params"], sampled_windows=curve["sampled_windows"],
                trainable=distill.trainable, sampling_seconds=round(curve["sampling_seconds"], 3),
                cache_seconds=round(curve["cache_seconds"], 3), teacher_cache=curve["teacher_cache"], frozen_blocks=curve["frozen_blocks"])
        model.eval()
    log_absorbed(log, specs, cpath, t0)
    return PassResult(model, True, log)


def log_absorbed(log: RewriteLog, specs: Sequence[Any], cpath: str, t0: float) -> None:
    """The log's closing records of a calibrated merge (both sources): each absorbed block
    removed, and the whole pass's seconds on every refit record."""
    for s in specs:
        for i in s.index:
            if i != s.keep:
                log.add(PASS_NAME, "remove", f"{cpath}.{i}", [f"{cpath}.{s.keep}"], reason="absorbed by calibrated fit")
    for r in log.records:
        if r.action == "refit":
            r.detail["seconds_total"] = round(time.perf_counter() - t0, 3)


class _OriginalStack(nn.Module):
    """The original model's blocks (a list), as a stack a :class:`~lfgraph.blocks.HeldBlocks` reads."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stack = nn.ModuleList(blocks)


def calibration_state(source: Any, calibration: torch.Tensor, val_fraction: float, batch_size: int, track: bool = False,
                      start: Any = None) -> list[_Batch]:
    """The refit's batches: the calibration windows split into fitting and held-out ones
    (:func:`_split_validation`), each part cut into batches of ``batch_size``, with their
    hidden states entering block 0 of ``source`` (or, with ``start``, the states a pass
    already computed: a :class:`~lfgraph.blocks.StackInput` of the same windows in
    consecutive batches and its ``states`` at some block, regathered window by window)."""
    val_mask = _split_validation(calibration.shape[0], val_fraction)
    groups = [calibration[val_mask == v] for v in (False, True)]
    inputs = source.stack_input(groups, batch_size)
    if start is not None:
        from ..blocks import regroup

        hidden = regroup(inputs, calibration, [torch.nonzero(val_mask == v).flatten() for v in (False, True)], start, batch_size=batch_size).hidden
    else:
        hidden = inputs.hidden
    return [_Batch(ids, calls, x, x if track else None, g == 1) for ids, calls, x, g in zip(inputs.ids, inputs.calls, hidden, inputs.group)]


@torch.no_grad()
def fit_runs(
    source: Any, specs: list[_RunSpec], state: list[_Batch], steps: list[tuple[_RunSpec, bool]], *, start: int = 0,
    original: Any = None, strengths: Sequence[float] = DEFAULT_LAMBDAS, log: RewriteLog, cpath: str, fit_attention: bool = False,
    token_weighting: str = "clip", clip: float = 4.0, mlp_proj: str | None = None, attn_proj: str | None = None,
    refit: str = "full", arch: Any = None, form: _BlockForm | None = None, progress: Any = False,
    after_fit: Callable[..., None] | None = None,
) -> None:
    """Fit every step of ``steps`` (:func:`_steps`: each run, then the repaired blocks)
    bottom-up on ``source``'s blocks (a :class:`~lfgraph.blocks.BlockSource`: the blocks
    below a run, the run's blocks and its kept block are opened one or two at a time).

    ``state`` holds the batches' hidden states entering block ``start``; afterwards,
    those after the last fitted block. ``original`` (needed when a step fits towards the
    original model, or ``b.xo`` is tracked) is the uncompressed model's source. Each kept
    block's fitted tensors are kept by ``source.keep_changes``; ``after_fit(spec, block,
    state, run_out)`` runs on the kept block, still open, before the states move past it
    (the block-wise distillation trains there). Blocks are not removed here."""
    track = any(b.xo is not None for b in state)
    pos = start
    iterator: Any = steps
    if progress:
        from tqdm import tqdm

        iterator = tqdm(steps, desc="calibrated fusion", leave=False) if progress is True else steps
    for spec, use_original in iterator:
        first = spec.index[0]
        advance(source, range(pos, first), state, "x")
        if track:
            advance(original, range(pos, first), state, "xo")
        run_source, attr = (original, "xo") if use_original else (source, "x")
        candidates = [spec.keep] if spec.keep is not None else list(spec.index)
        with contextlib.ExitStack() as opened:
            blocks = {c: opened.enter_context(source.open(c)) for c in candidates}
            kind = _kind(blocks[candidates[0]])
            attn_name = None
            if fit_attention and kind == "transformer":
                attn_name = _find(blocks[candidates[0]], ATTN_OUT_NAMES, "attention output projection", attn_proj or (arch.attn_out if arch else None))[0]
            run_out, attn_sum = run_outputs(run_source, spec.index, state, attr, attn_name, inspect=_kind if kind == "conv" else None)
            before = {c: _state_of(b) for c, b in blocks.items()}
            if kind == "conv":
                _fit_conv_run(blocks, spec, state, run_out, use_original, strengths, log, cpath)
            else:
                _fit_transformer_run(blocks, spec, state, run_out, attn_sum, use_original, strengths, log, cpath, token_weighting, clip,
                                     mlp_proj, attn_proj, refit, arch, form)
            kept = blocks[spec.keep]  # type: ignore[index]
            source.keep_changes(spec.keep, kept, _changed(kept, before[spec.keep]))  # type: ignore[arg-type]
            del before  # a copy of the kept block: not held while after_fit trains it
            if after_fit is not None:
                after_fit(spec, kept, state, run_out)
            for b in state:
                b.x = b.run(kept, spec.keep)  # type: ignore[arg-type]
        if track:
            if use_original:
                for b, out in zip(state, run_out):
                    b.xo = out
            else:
                for b, out in zip(state, run_outputs(original, spec.index, state, "xo")[0]):
                    b.xo = out
        pos = spec.index[-1] + 1


def _architecture(model: nn.Module) -> tuple[Any, _BlockForm]:
    """The model's family (``None`` for plain modules) and how its blocks add the MLP
    output; ``UnsupportedModelError`` when the family's blocks cannot be refitted."""
    from ..architectures import hf_config, of_model

    return _architecture_of(of_model(model), hf_config(model))


def _architecture_of(arch: Any, cfg: Any) -> tuple[Any, _BlockForm]:
    """``_architecture`` from the family's class and the model's config."""
    if arch is None:
        return None, _BlockForm()
    refusal = arch.refit_refusal(cfg)
    if refusal:
        raise UnsupportedModelError(refusal)
    post = arch.post_mlp_norm if arch.block_kind(cfg) == "post-norm" else None
    return arch, _BlockForm(arch.residual_scale(cfg), post, arch.norm_offset)


def _steps(specs: list[_RunSpec], cpath: str, n_blocks: int, target: str, repair_next: int) -> list[tuple[_RunSpec, bool]]:
    """The fits in bottom-up order, each with whether it targets the original model: every
    run, then up to ``repair_next`` unchanged blocks after it (never into the next run)."""
    out: list[tuple[_RunSpec, bool]] = []
    for k, spec in enumerate(specs):
        out.append((spec, target == "original"))
        stop = specs[k + 1].index[0] if k + 1 < len(specs) else n_blocks
        for j in range(spec.index[-1] + 1, min(spec.index[-1] + 1 + repair_next, stop)):
            out.append((_RunSpec([f"{cpath}.{j}"], [j], j, repair=True), True))
    return out


def _run_specs(runs: Sequence[Sequence[str]], keep: str | Sequence[str]) -> list[_RunSpec]:
    specs: list[_RunSpec] = []
    containers = set()
    for k, names in enumerate(runs):
        names = list(names)
        parts = [split_block_name(n) for n in names]
        containers |= {c for c, _ in parts}
        index = [i for _, i in parts]
        if index != list(range(index[0], index[0] + len(index))):
            raise LfgraphError(f"run {names} is not a list of consecutive blocks in order")
        if isinstance(keep, str):
            if keep not in KEEP_POLICIES:
                raise LfgraphError(f"unknown keep policy {keep!r}: choose {', '.join(KEEP_POLICIES)}, or give one block name per run")
            kept = {"first": index[0], "last": index[-1], "best": None}[keep]
        else:
            if len(keep) != len(runs) or keep[k] not in names:
                raise LfgraphError(f"keep must name one block of each run; {list(keep)!r} does not fit runs {list(map(list, runs))!r}")
            kept = split_block_name(keep[k])[1]
        specs.append(_RunSpec(names, index, kept))
    if len(containers) != 1:
        raise LfgraphError(f"runs must all be in one stack of blocks, got {sorted(containers)}")
    specs.sort(key=lambda s: s.index[0])
    for a, b in zip(specs, specs[1:]):
        if a.index[-1] >= b.index[0]:
            raise LfgraphError(f"runs {a.names} and {b.names} overlap")
    return specs


def _fit_transformer_run(
    blocks: dict[int, nn.Module], spec: _RunSpec, state: list[_Batch], run_out: Sequence[torch.Tensor], attn_sum: Sequence[torch.Tensor],
    use_original: bool, strengths: Sequence[float], log: RewriteLog, cpath: str, token_weighting: str, clip: float,
    mlp_proj: str | None, attn_proj: str | None, refit: str = "full", arch: Any = None, form: _BlockForm | None = None,
) -> None:
    """Refit the kept block's attention output (when ``attn_sum``, the run's summed
    attention updates per batch, is given) and MLP down projection (through the post-MLP
    norm for post-norm families, into every expert for MoE) so that the kept block alone
    maps each batch's state to ``run_out``, the run's output. ``blocks``: the candidate
    blocks (``spec.keep``, or every block of the run for ``keep="best"``), in memory."""
    t0 = time.perf_counter()
    form = form or _BlockForm()
    candidates = [spec.keep] if spec.keep is not None else list(spec.index)
    mlp_name, experts = _mlp_target(blocks[candidates[0]], arch, mlp_proj)
    if arch is not None and not attn_proj:
        attn_proj = arch.attn_out
    attn_name = _find(blocks[candidates[0]], ATTN_OUT_NAMES, "attention output projection", attn_proj)[0] if attn_sum else None

    def weights(k: int) -> torch.Tensor | None:
        return _token_weights((run_out[k] - state[k].x).reshape(-1, run_out[k].shape[-1]), token_weighting, clip)

    for c in candidates:
        _check_additive(blocks[c], c, blocks[c].get_submodule(form.post or mlp_name), state[0], form.post or mlp_name, form.scale)
    if spec.keep is None:
        spec.keep = _best_keep(blocks, candidates, mlp_name, experts, form, state, run_out, weights, strengths)
    block, at = blocks[spec.keep], spec.keep
    goal = "original" if use_original else "composite"
    if attn_name:
        proj = block.get_submodule(attn_name)
        W0 = _proj_matrix(proj)
        fit, val = _new_stats(W0, state)
        for k, b in enumerate(state):
            cap = _Capture(proj)
            try:
                b.run(block, at)
            finally:
                cap.remove()
            z = _features(cap.inputs[0], W0.shape[1] != cap.inputs[0].shape[-1])
            y = attn_sum[k].reshape(-1, W0.shape[0])
            (val if b.val else fit).add(z, y, weights(k))
        _apply_fit(_Projection(block, attn_name), W0, fit, val, strengths, log, cpath, spec, attn_name, goal, refit=refit)

    mlp = _Projection(block, mlp_name, experts)
    W0 = mlp.matrix()
    fit, val = _new_stats(W0, state)
    state_energy = 0.0
    for k, b in enumerate(state):
        z, y = _mlp_problem(block, at, mlp, W0, b, run_out[k], form)
        (val if b.val else fit).add(z, y, weights(k))
        w = weights(k)
        e = run_out[k].double().reshape(-1, run_out[k].shape[-1]).pow(2).sum(1)
        state_energy += float(e.sum() if w is None else (e * w.double()).sum())
    _apply_fit(mlp, W0, fit, val, strengths, log, cpath, spec, mlp_name, goal, seconds=time.perf_counter() - t0, state_energy=state_energy, refit=refit)
    if form.post:
        _refit_post_norm(block, at, form, state, run_out, weights, log, cpath, spec, goal)


@torch.no_grad()
def _refit_post_norm(block: nn.Module, at: int, form: _BlockForm, state: list[_Batch], run_out: Sequence[torch.Tensor], weights: Any,
                     log: RewriteLog, cpath: str, spec: _RunSpec, goal: str) -> None:
    """Refit the post-MLP norm's per-channel scale ``g`` (``out = rest + s * g * m``, ``m``
    the normalised MLP output) by weighted least squares with a small ridge towards the
    current scale: linear in ``g``, so closed form, one value per channel."""
    norm = block.get_submodule(form.post)  # type: ignore[arg-type]
    g0 = norm.weight.detach().double() + form.offset
    num, den, before, after, energy = torch.zeros_like(g0), torch.zeros_like(g0), 0.0, 0.0, 0.0
    parts = []
    for k, b in enumerate(state):
        cap = _Capture(norm)
        try:
            out = b.run(block, at)
        finally:
            cap.remove()
        n = _first(cap.outputs[0]).double().reshape(-1, g0.shape[0])
        target = ((run_out[k] - out).double().reshape(-1, g0.shape[0]) / form.scale) + n
        m = n / torch.where(g0.abs() < 1e-12, torch.full_like(g0, 1e-12), g0)
        w = weights(k)
        w = torch.ones(m.shape[0], dtype=torch.float64) if w is None else w.double()
        num += (w[:, None] * m * target).sum(0)
        den += (w[:, None] * m * m).sum(0)
        parts.append((m, target, w))
    lam = 1e-3 * float(den.mean().clamp_min(1e-30))
    g = (num + lam * g0) / (den + lam)
    for m, target, w in parts:
        before += float((w[:, None] * (m * g0 - target) ** 2).sum())
        after += float((w[:, None] * (m * g - target) ** 2).sum())
        energy += float((w[:, None] * target ** 2).sum())
    norm.weight.copy_((g - form.offset).to(norm.weight.dtype))
    log.add(PASS_NAME, "refit", f"{cpath}.{spec.keep}.{form.post}", spec.names, part="post-norm scale",
            relative_error_before=before / max(energy, 1e-30), relative_error_after=after / max(energy, 1e-30),
            keep=f"{cpath}.{spec.keep}", fit_target=goal, repair=spec.repair)


def _check_additive(block: nn.Module, at: int, proj: nn.Module, b: _Batch, proj_name: str, scale: float = 1.0) -> None:
    """Refuse blocks whose output is not ``rest + scale * proj(z)`` (e.g. post-LayerNorm
    BERT layers), for which the closed-form fit would be wrong: shift the projection's
    output by a random amount and check that the block's output moves by ``scale`` times
    that amount."""
    delta = torch.randn(b.x.shape[-1], generator=torch.Generator().manual_seed(0))
    base = b.run(block, at)
    h = proj.register_forward_hook(lambda _m, _a, out: (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta)
    try:
        shifted = b.run(block, at)
    finally:
        h.remove()
    moved = (shifted - base) / scale
    if not torch.allclose(moved, delta.expand_as(moved), rtol=1e-3, atol=1e-3 * (1.0 + float(base.abs().max()) * 1e-3)):
        raise UnsupportedModelError(
            f"{type(block).__name__}'s output is not its input plus {proj_name}'s output (a post-LayerNorm block?): "
            "calibrated fusion cannot refit it in closed form; use --fuse remove or mean"
        )


def _mlp_problem(block: nn.Module, at: int, proj: _Projection, W0: torch.Tensor, b: _Batch, run_out: torch.Tensor,
                 form: _BlockForm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, y)`` for the kept block's MLP output projection on one batch: the block's output
    is ``rest + s * post(proj(z))``, so the target for ``post(proj(z))`` is
    ``(run_out - rest) / s``. With a post-MLP norm (``post(d) = g * d / rms(d)``) only
    the direction of ``d`` matters: the target for ``d`` is that target divided by ``g``,
    at the magnitude ``d`` has now (so the ridge towards ``W0`` keeps its meaning)."""
    cap = _Capture(proj.module)
    capn = _Capture(block.get_submodule(form.post)) if form.post else None
    try:
        out = b.run(block, at)
    finally:
        cap.remove()
        if capn is not None:
            capn.remove()
    # some blocks (OPT) run the MLP on tokens flattened to (batch * seq, hidden)
    d = _first(cap.outputs[0]).reshape(out.shape)
    if capn is None:
        y = (run_out - out) / form.scale + d
    else:
        norm = block.get_submodule(form.post)  # type: ignore[arg-type]
        g = norm.weight.detach() + form.offset
        n = _first(capn.outputs[0]).reshape(out.shape)
        u = ((run_out - out) / form.scale + n) / torch.where(g.abs() < 1e-12, torch.full_like(g, 1e-12), g)
        rms = lambda t: t.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # noqa: E731
        y = u * (rms(d) / rms(u))
    return proj.features(cap, W0), y.reshape(-1, W0.shape[0])


def _new_stats(W0: torch.Tensor, state: list[_Batch], ref: bool = True) -> tuple[RidgeStats, RidgeStats]:
    """Empty (fit, held-out) statistics for a projection ``W0 (out, in)`` on the batches of
    ``state``: the held-out tokens as rows; the fitting tokens as rows too when there are no
    more of them than inputs (then solved in the dual form, :class:`_Dual`), else as a Gram
    matrix accumulated batch by batch."""
    d_out, d_in = W0.shape
    fit_tokens = sum(b.x.numel() // b.x.shape[-1] for b in state if not b.val)
    r = W0 if ref else None
    return RidgeStats.zeros(d_in, d_out, rows=fit_tokens <= d_in, ref=r), RidgeStats.zeros(d_in, d_out, rows=True, ref=r)


def _best_keep(
    stack: dict[int, nn.Module], candidates: list[int], mlp_name: str, experts: str | None, form: _BlockForm, state: list[_Batch],
    run_out: Sequence[torch.Tensor], weights: Any, strengths: Sequence[float],
) -> int:
    """The candidate whose MLP refit leaves the smallest held-out error (relative to the
    held-out target energy; training error when nothing is held out)."""
    best, best_err = candidates[0], math.inf
    for c in candidates:
        proj = _Projection(stack[c], mlp_name, experts)
        W0 = proj.matrix()
        fit, val = _new_stats(W0, state, ref=False)
        for k, b in enumerate(state):
            z, y = _mlp_problem(stack[c], c, proj, W0, b, run_out[k], form)
            (val if b.val else fit).add(z, y, weights(k))
        s, _ = choose_strength(fit, val, W0, strengths)
        W = ridge_solve(fit, W0, s)
        score = val if val.n else fit
        err = score.loss(W) / max(score.S, 1e-30)
        if err < best_err:
            best, best_err = c, err
    return best


def _apply_fit(
    proj: _Projection, W0: torch.Tensor, fit: RidgeStats, val: RidgeStats, strengths: Sequence[float], log: RewriteLog,
    cpath: str, spec: _RunSpec, proj_name: str, goal: str, seconds: float | None = None, state_energy: float | None = None,
    refit: str = "full",
) -> None:
    # memory: the fit's Gram matrix and one work buffer of its size (the shifted matrix, then
    # its factor); the held-out statistics are added into the fit's in place for the final solve
    if refit == "map":
        # fit M (out x out) on a = W0 z, pulled towards the identity; the projection gets M W0
        eye = torch.eye(W0.shape[0], dtype=torch.float64)
        fit_m, val_m = map_stats(fit, W0), map_stats(val, W0)
        strength, losses = choose_strength(fit_m, val_m, eye, strengths)
        W = ridge_solve(fit_m.absorb(val_m), eye, strength) @ W0.double()
        del fit_m, val_m
        everything = fit.absorb(val)
        after = everything.loss(W)
    else:
        work = None if fit.is_rows else torch.empty_like(fit.G)  # type: ignore[arg-type]
        strength, losses = choose_strength(fit, val, W0, strengths, work=work)
        everything = fit.absorb(val)
        W = ridge_solve(everything, W0, strength, work if not everything.is_rows else None)
        del work
        after = _solution_loss(everything, W0, W, strength)
    before = everything.ref_loss if everything.ref is not None else everything.loss(W0)
    proj.set(W)
    rec = {
        "strength": strength,
        "tokens": everything.n,
        "relative_error_before": before / max(everything.S, 1e-30),
        "relative_error_after": after / max(everything.S, 1e-30),
        "heldout_losses": {f"{k:g}": v for k, v in losses.items()},
        "keep": f"{cpath}.{spec.keep}",
        "fit_target": goal,
        "refit": refit,
        "repair": spec.repair,
    }
    if state_energy:
        # the error left, relative to the hidden state itself (what the layers above see)
        rec["error_vs_hidden_state"] = after / state_energy
    if seconds is not None:
        rec["seconds"] = round(seconds, 3)
    log.add(PASS_NAME, "refit", f"{cpath}.{spec.keep}.{proj_name}", spec.names, **rec)


# ---------------------------------------------------------------------------------------
# ResNet-style basic blocks
# ---------------------------------------------------------------------------------------


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(u))`` as one ``(out, in*kh*kw + 1)`` matrix acting on unfolded patches."""
    s = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(s)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(s)
    W = conv.weight.detach().reshape(conv.out_channels, -1) * (gamma / s)[:, None]
    b = beta - gamma * bn.running_mean / s
    if conv.bias is not None:
        b = b + conv.bias * gamma / s
    return torch.cat([W, b[:, None]], dim=1).double()


@torch.no_grad()
def _set_folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, W: torch.Tensor) -> None:
    """Write a folded matrix back: the weight into ``conv``, the bias into ``bn``, which
    becomes an identity plus bias in eval mode (running mean 0, variance ``1 - eps``)."""
    conv.weight.copy_(W[:, :-1].reshape(conv.weight.shape).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is None:
        raise UnsupportedModelError("BatchNorm without affine bias cannot hold the refitted bias")
    bn.bias.copy_(W[:, -1].to(bn.bias.dtype))


def _patches(conv: nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
    cols = nn.functional.unfold(u, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype)], dim=1)


def _conv_forward_parts(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, pre, out)`` of a basic block: conv2's input, the pre-activation ``bn2(...) + x``
    and the block output."""
    cu, cb = _Capture(block.conv2), _Capture(block.bn2)
    try:
        out = block(x)
    finally:
        cu.remove()
        cb.remove()
    return cu.inputs[0], cb.outputs[0] + x, out


def _fit_conv_run(
    blocks: dict[int, nn.Module], spec: _RunSpec, state: list[_Batch], run_out: Sequence[torch.Tensor], use_original: bool,
    strengths: Sequence[float], log: RewriteLog, cpath: str, iterations: int = 4,
) -> None:
    """Refit the kept block's last convolution (folded with its BatchNorm) so that the kept
    block's output matches the run's output on the same input.

    With a final ReLU the problem is censored: where the run outputs 0 the pre-activation
    only has to be <= 0. The fit minimises the squared error on the other positions plus a
    squared hinge on these (convex), by a few rounds of least squares in which a censored
    target is the current prediction clipped to the boundary (majorise-minimise: the loss
    never rises). Without a final ReLU one round is exact least squares.
    """
    t0 = time.perf_counter()
    if spec.keep is None:
        spec.keep = spec.index[0]  # every block of a run sees the same input; the first is as good as any
    block = blocks[spec.keep]
    W0 = _folded_conv(block.conv2, block.bn2)
    relu_mode: bool | None = None
    cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (patch source u, goal, skip x) per batch
    for b, goal in zip(state, run_out):
        u, pre, out = _conv_forward_parts(block, b.x)
        if relu_mode is None:
            if torch.allclose(out, torch.relu(pre), atol=1e-5, rtol=1e-4):
                relu_mode = True
            elif torch.allclose(out, pre, atol=1e-5, rtol=1e-4):
                relu_mode = False
            else:
                raise UnsupportedModelError(
                    f"{type(block).__name__} does not compute relu(bn2(conv2(.)) + x) or bn2(conv2(.)) + x: cannot refit it"
                )
        cache.append((u, goal, b.x))
    W, strength, losses = W0, None, {}
    for _ in range(iterations if relu_mode else 1):
        fit, val = RidgeStats.zeros(W0.shape[1], W0.shape[0]), RidgeStats.zeros(W0.shape[1], W0.shape[0], rows=True)
        for b, (u, goal, x) in zip(state, cache):
            z = _patches(block.conv2, u)
            xt = x.permute(0, 2, 3, 1).reshape(-1, W0.shape[0])
            y = goal.permute(0, 2, 3, 1).reshape(-1, W0.shape[0]) - xt
            if relu_mode:
                censored = goal.permute(0, 2, 3, 1).reshape(-1, W0.shape[0]) <= 0
                pred = (z.double() @ W.T).to(y.dtype)
                y = torch.where(censored, torch.minimum(pred, -xt), y)
            (val if b.val else fit).add(z, y)
        if strength is None:
            strength, losses = choose_strength(fit, val, W0, strengths)
        everything = fit + val
        W = ridge_solve(everything, W0, strength)
    _set_folded_conv(block.conv2, block.bn2, W)
    log.add(
        PASS_NAME, "refit", f"{cpath}.{spec.keep}.conv2", spec.names,
        strength=strength, tokens=everything.n, keep=f"{cpath}.{spec.keep}", final_relu=relu_mode,
        fit_target="original" if use_original else "composite", repair=spec.repair,
        relative_error_before=everything.loss(W0) / max(everything.S, 1e-30),
        relative_error_after=everything.loss(W) / max(everything.S, 1e-30),
        heldout_losses={f"{k:g}": v for k, v in losses.items()}, seconds=round(time.perf_counter() - t0, 3),
    )


def options_from_provenance(provenance: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """The :func:`calibrated_merge` options a plan's provenance asks for (``refit``, and
    ``distill`` when it records ``distill_steps``, with ``distill_sampled_windows`` windows
    sampled from the original and ``distill_trainable`` (plans that predate them: none,
    ``maps``); see :func:`lfgraph.recipes.refit_provenance`)."""
    from .map_distillation import DistillSettings

    steps = int(provenance.get("distill_steps", 0))
    sampled = int(provenance.get("distill_sampled_windows", 0))
    trainable = str(provenance.get("distill_trainable", "maps"))
    return {"refit": provenance.get("refit", "full"),
            "distill": DistillSettings(steps=steps, sampled_windows=sampled, trainable=trainable, progress=progress) if steps > 0 else None}


def calibrated_merge_plan(module: nn.Module, plan: FusionPlan, calibration: torch.Tensor, **options: Any) -> PassResult:
    """Apply a merge plan with the ``calibrated`` rule: each fusion's blocks (``keep`` plus
    ``absorb``, which must be consecutive) become one run, kept at ``fusion.keep`` unless
    ``keep=`` says otherwise. Options as for :func:`calibrated_merge`; the module is not
    modified unless ``inplace=True``."""
    if plan.mode != "merge":
        raise LfgraphError(f"calibrated fusion rewrites merge plans, this plan has mode {plan.mode!r}")
    runs, keeps = [], []
    for f in plan.fusions:
        if f.unit != "block":
            raise LfgraphError(f"calibrated fusion fuses blocks; fusion of {f.keep} has unit {f.unit!r}")
        names = sorted([f.keep, *f.absorb], key=lambda n: split_block_name(n)[1])
        runs.append(names)
        keeps.append(f.keep)
    options.setdefault("keep", keeps)
    return calibrated_merge(module, runs, calibration, **options)
