"""Weight-similarity metrics: the registry that the analysis pass, the planner and the CLI read.

Every metric compares two weight matrices of one compatible group and returns a *distance*:
lower means more alike, ``0`` for identical inputs, never negative. Inputs are 2-D
``(n_out, fan_in)`` matrices whose **rows are output neurons** (an ``nn.Linear`` weight; a
convolution flattened by ``LayerNode.matrix`` to ``(out_ch, in_ch*kh*kw)``). All arithmetic
is done in float64 whatever the input dtype, because several metrics subtract nearly equal
quantities (``tr Σa + tr Σb - 2·fidelity`` for Bures).

Covariance convention (``ca``, ``kl``, ``jeffreys``, ``bures``): following the paper
(E[W] = 0), the ``n_out`` rows of ``W`` are taken as zero-mean samples of a
``fan_in``-dimensional Gaussian, so ``Σ = Wᵀ W / n_out`` (``fan_in × fan_in``). Output neurons
are the samples because they are the interchangeable units of a layer: permuting them (or
applying any orthogonal ``U`` with ``W → U W``) changes nothing the next layer cannot undo,
and ``(U W)ᵀ (U W) = Wᵀ W`` makes these metrics exactly invariant to it. The mean is *not*
subtracted, as in the paper; a layer whose neurons share an offset is therefore seen as
having that direction in its covariance.

The metrics (``n = n_out``, ``d = fan_in``):

- ``euclidean``: ``‖a - b‖_F`` (the paper's ED). Compares neuron ``i`` with neuron ``i``, so it
  is **not** invariant to permuting (or rotating) output neurons: two layers computing the
  same function with reordered neurons can be far apart.
- ``ca`` (eq. 2): ``1 - cos(Σa, Σb) = 1 - tr(Σa Σb) / (‖Σa‖_F ‖Σb‖_F)``, in ``[0, 1]``. For
  ``n < d``, ``tr(Σa Σb) = ‖a bᵀ‖_F² / n²`` (an ``n × n`` product). Invariant to scaling either
  input, since the cosine ignores magnitude.
- ``kl`` (eq. 3): ``KL(N(0, Σa') ‖ N(0, Σb')) = ½[tr(Σb'⁻¹ Σa') - d + ln(|Σb'| / |Σa'|)]`` with
  the shrunk ``Σ' = (1-ρ) Σ + ρ μ I`` (``μ = tr Σ / d``, ``ρ`` the OAS intensity of
  :func:`oas_shrinkage`, at least ``KL_RIDGE``). Shrinkage is needed because ``Σ`` is
  singular whenever ``n < d`` (rank ``<= n``); it is chosen from the data so that it does not
  dominate the divergence, and it is relative so that scaling both layers together changes
  nothing. Asymmetric: ``D[i, j]`` is ``KL(i ‖ j)``; the analysis ranks a pair by the smaller
  direction (how well one layer's Gaussian stands in for the other's). For ``n < d`` it is computed from the thin SVD of ``a`` (Woodbury form of the
  inverse), never forming a ``d × d`` matrix.
- ``jeffreys``: ``KL(a ‖ b) + KL(b ‖ a) = ½[tr(Σb'⁻¹ Σa') + tr(Σa'⁻¹ Σb')] - d`` (the
  log-determinants cancel), the symmetrised KL the paper mentions.
- ``bures`` (eq. 5): ``B(Σa, Σb) = sqrt(max(0, tr Σa + tr Σb - 2 tr((Σa^½ Σb Σa^½)^½)))``, the
  2-Wasserstein distance between ``N(0, Σa)`` and ``N(0, Σb)``. Closed form without
  ``sqrtm``: the fidelity term equals the nuclear norm ``‖Σa^½ Σb^½‖_* = ‖a bᵀ‖_* / n``, the sum
  of singular values of a ``min(n, d)``-sized product. Returns the distance ``B``, not ``B²``.
- ``wasserstein`` (eq. 4, exact): the rows of ``softmax(a, axis=1)`` and ``softmax(b, axis=1)``
  are two empirical distributions of ``n`` points each in ``R^d``;
  ``W2 = sqrt((1/n) Σ_i ‖pa_i - pb_π(i)‖²)`` with ``π`` the optimal assignment
  (:func:`row_assignment`). Exactly invariant to row permutations; ``O(n³)`` per pair.

Invariance tags (``Metric.invariances``), each checked by ``tests/passes/test_metrics.py``:

- ``row-permutation``: ``d(P a, b) = d(a, b)`` for a permutation ``P`` of the output neurons.
- ``row-orthogonal``: ``d(U a, V b) = d(a, b)`` for orthogonal ``n_out × n_out`` ``U``, ``V``.
- ``scale``: ``d(s a, t b) = d(a, b)`` for any ``s, t > 0``.
- ``joint-scale``: ``d(s a, s b) = d(a, b)`` for any ``s > 0``.
- ``row-shift``: ``d(a + c 1ᵀ, b) = d(a, b)`` for any per-row constants ``c`` (softmax ignores
  a constant added to a whole row).

Efficiency: :func:`pairwise_distances` computes each matrix's statistics once
(``Metric.prepare``: covariance, its eigendecomposition, log-determinant, inverse, a QR
factor, a softmax) and then only the per-pair part (``Metric.compare``). Statistics never
need more memory than ``O(n_out·fan_in + min(n_out, fan_in)·fan_in)`` per matrix: when
``n_out < fan_in`` (a wide layer such as a ``576 × 1536`` down projection) the ``fan_in ×
fan_in`` covariance is never formed and the per-pair work is an ``n_out × n_out`` product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import LfgraphError

#: Smallest ridge added to each covariance for ``kl`` and ``jeffreys``, relative to its mean
#: eigenvalue: ``ε >= KL_RIDGE · tr(Σ) / fan_in``. Relative so that the metric is scale-free.
#: The ridge actually used is the OAS shrinkage (:func:`oas_shrinkage`), which is far larger
#: when a layer has fewer rows than inputs.
KL_RIDGE = 1e-3


def oas_shrinkage(n: int, d: int, trace: float, frob2: float) -> float:
    """Oracle Approximating Shrinkage intensity (Chen, Wiesel, Eldar & Hero 2010, in the
    form scikit-learn uses) of a sample covariance ``S`` of ``n`` samples in ``d``
    dimensions, from ``tr S`` and ``‖S‖_F²``: the estimate is ``(1-ρ) S + ρ (tr S / d) I``.

    Why: with ``n < d`` (k/v/down projections) ``S`` is singular, and a fixed tiny ridge makes
    ``KL`` mostly ``(mass of Σa outside the row space of b) / ridge``: the regulariser, not
    the layers, decides the ranking (two samples of one distribution look far apart, a layer
    with a different spectrum on the same subspace looks close). OAS picks the ridge from the
    data: large when ``n`` is small against ``d``, vanishing as ``n`` grows. It depends on
    ``S`` only, so the metric keeps its row-orthogonal and joint-scale invariance.
    """
    mu = trace / d
    alpha = frob2 / d**2
    num = alpha + mu**2
    den = (n + 1.0) * (alpha - mu**2 / d)
    return 1.0 if den <= 0 else min(num / den, 1.0)


@dataclass(frozen=True)
class Metric:
    """A named distance between two weight matrices of the same shape.

    Attributes:
        name: registry key (the CLI's ``--metric`` choice).
        description: one line, shown in CLI help.
        invariances: what the distance is invariant to (tags in the module docstring).
        symmetric: whether ``distance(a, b) == distance(b, a)``.
        prepare: per-matrix statistics, computed once per matrix by
            :func:`pairwise_distances`. Takes a 2-D array (any float dtype; not modified).
        compare: ``distance(a, b)`` from the statistics of ``a`` and ``b``.
        compare_both: for asymmetric metrics whose two directions share work,
            ``(distance(a, b), distance(b, a))`` from one computation; else ``None``.
    """

    name: str
    description: str
    invariances: tuple[str, ...]
    symmetric: bool
    prepare: Callable[[np.ndarray], Any] = field(repr=False, compare=False)
    compare: Callable[[Any, Any], float] = field(repr=False, compare=False)
    compare_both: Callable[[Any, Any], tuple[float, float]] | None = field(default=None, repr=False, compare=False)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Distance between two ``(n_out, fan_in)`` matrices of one shape; lower = more alike.

        ``0`` (up to rounding) for identical inputs, never negative. Inputs are not modified.
        Raises :class:`LfgraphError` for non-2-D inputs, shape mismatch or non-finite values.
        """
        _check_shapes([a, b])
        return self.compare(self.prepare(_checked(a, 0)), self.prepare(_checked(b, 1)))


# --------------------------------------------------------------------------- validation


def _check_shapes(matrices: Sequence[np.ndarray]) -> None:
    for i, m in enumerate(matrices):
        if np.ndim(m) != 2:
            raise LfgraphError(
                f"matrix {i} has {np.ndim(m)} dimensions: metrics take 2-D (n_out, fan_in) weights "
                "(flatten a convolution to (out_ch, in_ch*kh*kw), as LayerNode.matrix does)"
            )
        if np.shape(m) != np.shape(matrices[0]):
            raise LfgraphError(
                f"matrix {i} has shape {tuple(np.shape(m))} but matrix 0 has {tuple(np.shape(matrices[0]))}: "
                "only layers of one compatible group (same shape) can be compared"
            )
        if 0 in np.shape(m):
            raise LfgraphError(f"matrix {i} is empty (shape {tuple(np.shape(m))})")


def _checked(m: np.ndarray, index: int) -> np.ndarray:
    m = np.asarray(m)
    if not np.isfinite(m).all():
        raise LfgraphError(f"matrix {index} contains NaN or infinite values; cannot measure its distance")
    return m


def _f64(m: np.ndarray) -> np.ndarray:
    return np.asarray(m, dtype=np.float64)


# --------------------------------------------------------------------------- euclidean


def _euclidean_prepare(a: np.ndarray) -> np.ndarray:
    # No statistics: keep the caller's array (no float64 copy of every layer in memory).
    return a


def _euclidean_compare(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


# --------------------------------------------------------------------------- covariance alignment


class _CovStats(NamedTuple):
    factor: np.ndarray | None  # a / sqrt(n) when n_out < fan_in: Σ = factorᵀ factor
    sigma: np.ndarray | None  # Σ itself otherwise (fan_in × fan_in, no bigger than a)
    norm: float  # ‖Σ‖_F


def _ca_prepare(a: np.ndarray) -> _CovStats:
    a = _f64(a)
    n, d = a.shape
    if n < d:
        factor = a / math.sqrt(n)
        # ‖Σ‖_F = ‖factorᵀ factor‖_F = ‖factor factorᵀ‖_F: an n × n product, not d × d.
        return _CovStats(factor, None, float(np.linalg.norm(factor @ factor.T)))
    sigma = a.T @ a / n
    return _CovStats(None, sigma, float(np.linalg.norm(sigma)))


def _ca_compare(sa: _CovStats, sb: _CovStats) -> float:
    if sa.norm == 0.0 or sb.norm == 0.0:
        # An all-zero layer has no covariance direction: alike only another all-zero layer.
        return 0.0 if sa.norm == sb.norm else 1.0
    if sa.factor is not None:
        # tr(Σa Σb) = tr(aᵀa bᵀb)/n² = ‖a bᵀ‖_F²/n²: n × n instead of fan_in × fan_in.
        cross = float(np.linalg.norm(sa.factor @ sb.factor.T) ** 2)
    else:
        cross = float(np.vdot(sa.sigma, sb.sigma))  # tr(Σa Σb) for symmetric Σ
    # tr(Σa Σb) >= 0 for PSD matrices, so the distance lies in [0, 1]; clip rounding.
    return min(1.0, max(0.0, 1.0 - cross / (sa.norm * sb.norm)))


# --------------------------------------------------------------------------- Gaussian KL


class _GaussStats(NamedTuple):
    """Statistics of ``N(0, (1-ρ) Σ + εI)`` with ``Σ = aᵀa / n`` and ``ε = ρ tr(Σ)/d``.

    Dense form (``n_out >= fan_in``): ``sigma`` and ``inverse`` of the regularised covariance.
    Low-rank form (``n_out < fan_in``): ``(1-ρ) Σ = Vᵀ diag(lam) V`` from the thin SVD of
    ``a`` (``basis`` = ``V``, ``n × fan_in``), and ``weight = lam / (lam + ε)``.
    """

    dim: int
    eps: float
    logdet: float  # ln |Σ + εI|
    sigma: np.ndarray | None
    inverse: np.ndarray | None
    basis: np.ndarray | None
    lam: np.ndarray | None
    weight: np.ndarray | None


def _gauss_prepare(a: np.ndarray) -> _GaussStats:
    a = _f64(a)
    n, d = a.shape
    trace = float(np.vdot(a, a)) / n
    if trace == 0.0:
        raise LfgraphError(
            "an all-zero weight matrix has a degenerate covariance, so the KL divergence is "
            "undefined: use the 'ca', 'bures' or 'euclidean' metric for this model"
        )
    mu = trace / d
    if n >= d:
        sigma = a.T @ a / n
        rho = max(oas_shrinkage(n, d, trace, float(np.vdot(sigma, sigma))), KL_RIDGE)
        eps = rho * mu
        sigma *= 1.0 - rho
        sigma[np.diag_indices(d)] += eps
        evals, evecs = np.linalg.eigh(sigma)
        inverse = (evecs / evals) @ evecs.T
        return _GaussStats(d, eps, float(np.log(evals).sum()), sigma, inverse, None, None, None)
    # Wide layer: Σ has rank <= n < d. Its eigenvectors with non-zero eigenvalues are the
    # right singular vectors of a; all other directions have eigenvalue ε after the ridge.
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    lam = s**2 / n
    rho = max(oas_shrinkage(n, d, trace, float(np.square(lam).sum())), KL_RIDGE)
    eps = rho * mu
    lam = (1.0 - rho) * lam
    logdet = float(np.log(lam + eps).sum() + (d - n) * math.log(eps))
    return _GaussStats(d, eps, logdet, None, None, vt, lam, lam / (lam + eps))


def _gauss_traces(sa: _GaussStats, sb: _GaussStats) -> tuple[float, float]:
    """``(tr(Σb⁻¹ Σa), tr(Σa⁻¹ Σb))`` of the regularised covariances."""
    if sa.sigma is not None:
        return float(np.vdot(sb.inverse, sa.sigma)), float(np.vdot(sa.inverse, sb.sigma))
    # (Σb + εb I)⁻¹ = (I - Vbᵀ diag(wb) Vb) / εb, so with H = (Va Vbᵀ)∘²
    # tr(Σb⁻¹ Σa) = [εa (d - Σ wb) + Σ λa - λaᵀ H wb] / εb, an n × n computation.
    h = np.square(sa.basis @ sb.basis.T)
    d = sa.dim
    t_ab = (sa.eps * (d - sb.weight.sum()) + sa.lam.sum() - sa.lam @ h @ sb.weight) / sb.eps
    t_ba = (sb.eps * (d - sa.weight.sum()) + sb.lam.sum() - sb.lam @ h.T @ sa.weight) / sa.eps
    return float(t_ab), float(t_ba)


def _kl_both(sa: _GaussStats, sb: _GaussStats) -> tuple[float, float]:
    t_ab, t_ba = _gauss_traces(sa, sb)
    d = sa.dim
    kl_ab = 0.5 * (t_ab - d + sb.logdet - sa.logdet)
    kl_ba = 0.5 * (t_ba - d + sa.logdet - sb.logdet)
    return max(0.0, kl_ab), max(0.0, kl_ba)


def _kl_compare(sa: _GaussStats, sb: _GaussStats) -> float:
    return _kl_both(sa, sb)[0]


def _jeffreys_compare(sa: _GaussStats, sb: _GaussStats) -> float:
    # KL(a‖b) + KL(b‖a): the log-determinants cancel exactly, so leave them out.
    t_ab, t_ba = _gauss_traces(sa, sb)
    return max(0.0, 0.5 * (t_ab + t_ba) - sa.dim)


# --------------------------------------------------------------------------- Bures


class _BuresStats(NamedTuple):
    factor: np.ndarray  # F with Fᵀ F = aᵀ a and min(n, d) rows
    sq_norm: float  # ‖a‖_F² = n · tr Σ
    n: int


def _bures_prepare(a: np.ndarray) -> _BuresStats:
    a = _f64(a)
    n, d = a.shape
    # Any F with Fᵀ F = aᵀ a gives the same singular values of Fa Fbᵀ as of a bᵀ; for a tall
    # layer the QR factor R (d × d) keeps the per-pair product at min(n, d)² · d.
    factor = a if n <= d else np.linalg.qr(a, mode="r")
    return _BuresStats(factor, float(np.vdot(a, a)), n)


def _bures_compare(sa: _BuresStats, sb: _BuresStats) -> float:
    # tr((Σa^½ Σb Σa^½)^½) = ‖Σa^½ Σb^½‖_* = ‖a bᵀ‖_* / n: singular values, no sqrtm.
    fidelity = float(np.linalg.svd(sa.factor @ sb.factor.T, compute_uv=False).sum())
    squared = (sa.sq_norm + sb.sq_norm - 2.0 * fidelity) / sa.n
    return math.sqrt(max(0.0, squared))


# --------------------------------------------------------------------------- Wasserstein


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    z = _f64(a) - np.max(a, axis=1, keepdims=True)  # shift by the row max: exp cannot overflow
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _optimal_perm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # ‖a_i - b_j‖² = ‖a_i‖² + ‖b_j‖² - 2 a_i·b_j, and every assignment sums the same norms,
    # so minimising -a_i·b_j gives the same optimum. Leaving the norms out also makes scipy's
    # solver 5-8x faster on softmaxed weights (the per-column offsets ‖b_j‖² slow it down).
    rows, cols = linear_sum_assignment(-(a @ b.T))
    perm = np.empty(len(rows), dtype=np.intp)
    perm[rows] = cols
    return perm


def _wasserstein_prepare(a: np.ndarray) -> np.ndarray:
    return _softmax_rows(a)


def _wasserstein_compare(pa: np.ndarray, pb: np.ndarray) -> float:
    perm = _optimal_perm(pa, pb)
    diff = pa - pb[perm]
    return math.sqrt(float(np.vdot(diff, diff)) / len(perm))


def row_assignment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Optimal one-to-one matching of the rows of ``b`` to the rows of ``a``.

    Args:
        a, b: 2-D arrays of one shape ``(n, k)``; rows are the items matched (output neurons).
            Not modified.

    Returns:
        ``perm``, an int array of length ``n`` (a permutation), such that ``b[perm]`` is
        matched row by row to ``a``: it minimises ``Σ_i ‖a[i] - b[perm[i]]‖²``
        (``scipy.optimize.linear_sum_assignment`` on the squared-Euclidean cost of rows,
        solved in the equivalent form ``-a[i]·b[j]``). The ``wasserstein`` metric uses this
        matching on the softmaxed rows; neuron alignment passes the raw weights. ``O(n³)``
        worst case (SmolLM2 layers: tenths of a second for 576 rows, ~1 s for 1536).
    """
    _check_shapes([a, b])
    a, b = _f64(_checked(a, 0)), _f64(_checked(b, 1))
    return _optimal_perm(a, b)


# --------------------------------------------------------------------------- registry

_PERM_ORTH = ("row-permutation", "row-orthogonal")

#: All metrics by name, in the order the CLI lists them.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric(
            name="euclidean",
            description="Frobenius norm of a - b (the paper's ED); depends on neuron order",
            invariances=(),
            symmetric=True,
            prepare=_euclidean_prepare,
            compare=_euclidean_compare,
        ),
        Metric(
            name="ca",
            description="covariance alignment, 1 - cos(Σa, Σb) with Σ = WᵀW/n_out (paper eq. 2)",
            invariances=_PERM_ORTH + ("scale",),
            symmetric=True,
            prepare=_ca_prepare,
            compare=_ca_compare,
        ),
        Metric(
            name="kl",
            description="KL(N(0,Σa) ‖ N(0,Σb)), Σ = WᵀW/n_out + ridge (paper eq. 3); asymmetric",
            invariances=_PERM_ORTH + ("joint-scale",),
            symmetric=False,
            prepare=_gauss_prepare,
            compare=_kl_compare,
            compare_both=_kl_both,
        ),
        Metric(
            name="jeffreys",
            description="symmetrised KL, KL(a‖b) + KL(b‖a), of the ridged covariances",
            invariances=_PERM_ORTH + ("joint-scale",),
            symmetric=True,
            prepare=_gauss_prepare,
            compare=_jeffreys_compare,
        ),
        Metric(
            name="bures",
            description="Bures distance between N(0,Σa) and N(0,Σb), closed form (paper eq. 5)",
            invariances=_PERM_ORTH,
            symmetric=True,
            prepare=_bures_prepare,
            compare=_bures_compare,
        ),
        Metric(
            name="wasserstein",
            description="exact 2-Wasserstein between softmaxed rows as point sets (paper eq. 4); O(n_out³)",
            invariances=("row-permutation", "row-shift"),
            symmetric=True,
            prepare=_wasserstein_prepare,
            compare=_wasserstein_compare,
        ),
    ]
}


def get_metric(name: str) -> Metric:
    """The registered metric called ``name``; :class:`LfgraphError` naming the choices if none."""
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise LfgraphError(f"unknown metric {name!r}: choose one of {', '.join(METRICS)}") from None


def _normalise_pairs(pairs: Iterable[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out: dict[tuple[int, int], None] = {}  # ordered and without duplicates
    for pair in pairs:
        i, j = (int(k) for k in pair)
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise LfgraphError(f"pair ({i}, {j}) is not two different indices into the {n} matrices")
        out[(min(i, j), max(i, j))] = None
    return list(out)


def pairwise_distances(
    metric: str | Metric,
    matrices: list[np.ndarray],
    pairs: list[tuple[int, int]] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Distances between the matrices of one compatible group.

    Args:
        metric: a registry name or a :class:`Metric`.
        matrices: 2-D ``(n_out, fan_in)`` arrays, all of one shape. Not modified.
        pairs: index pairs to compute (in either order; duplicates ignored); all pairs if
            ``None``.
        progress: show a tqdm bar over the pairs.

    Returns:
        A float64 ``(n, n)`` matrix with ``D[i, j] = metric.distance(matrices[i],
        matrices[j])`` for every requested pair, in both directions (asymmetric metrics
        compute both; symmetric ones compute once and mirror), ``0`` on the diagonal and NaN
        elsewhere. Statistics are computed once per matrix, only for matrices in a pair.

    Raises:
        LfgraphError: unknown metric name, shape mismatch, non-finite values, bad pair.
    """
    m = get_metric(metric) if isinstance(metric, str) else metric
    _check_shapes(matrices)
    n = len(matrices)
    todo = list(combinations(range(n), 2)) if pairs is None else _normalise_pairs(pairs, n)
    out = np.full((n, n), np.nan)
    np.fill_diagonal(out, 0.0)

    stats: dict[int, Any] = {}

    def stat(i: int) -> Any:
        if i not in stats:
            stats[i] = m.prepare(_checked(matrices[i], i))
        return stats[i]

    iterator: Iterable[tuple[int, int]] = todo
    if progress:
        from tqdm import tqdm

        iterator = tqdm(todo, desc=f"{m.name} distances", unit="pair")
    for i, j in iterator:
        si, sj = stat(i), stat(j)
        if m.symmetric:
            out[i, j] = out[j, i] = m.compare(si, sj)
        elif m.compare_both is not None:
            out[i, j], out[j, i] = m.compare_both(si, sj)
        else:
            out[i, j], out[j, i] = m.compare(si, sj), m.compare(sj, si)
    return out
