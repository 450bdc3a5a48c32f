"""Metric registry: each closed form against a slow, trusted reference, plus the invariances
and distance properties the registry claims (``Metric.invariances``)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import pytest
import scipy.linalg

from lfgraph.errors import LfgraphError
from lfgraph.passes.metrics import KL_RIDGE, METRICS, Metric, get_metric, pairwise_distances, row_assignment

# wide (n_out < fan_in: singular covariance, low-rank code paths), square, tall (dense paths)
SHAPES = [(6, 11), (9, 9), (13, 7)]
COVARIANCE_METRICS = ["ca", "kl", "jeffreys", "bures"]


def rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def related_pair(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated matrices, like two layers of one trained stack."""
    a = rand(shape, seed)
    return a, 0.7 * a + 0.5 * rand(shape, seed + 100)


def orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(rand((n, n), seed))
    return q * np.sign(np.diag(r))


def rel_err(x: float, ref: float) -> float:
    return abs(x - ref) / abs(ref)


# --------------------------------------------------------------------------- references


def covariance(a: np.ndarray) -> np.ndarray:
    return a.T @ a / a.shape[0]


def ridged(a: np.ndarray) -> np.ndarray:
    """OAS shrinkage written out from its definition (Chen et al. 2010; scikit-learn's
    ``oas``): dense d x d arithmetic, no shared code with the metric."""
    sigma = covariance(a)
    n, d = a.shape
    mu = np.trace(sigma) / d
    alpha = np.mean(sigma**2)
    den = (n + 1.0) * (alpha - mu**2 / d)
    rho = 1.0 if den <= 0 else min((alpha + mu**2) / den, 1.0)
    rho = max(rho, KL_RIDGE)
    return (1.0 - rho) * sigma + rho * mu * np.eye(d)


def kl_reference(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = ridged(a), ridged(b)
    d = sa.shape[0]
    return 0.5 * (np.trace(np.linalg.inv(sb) @ sa) - d + np.linalg.slogdet(sb)[1] - np.linalg.slogdet(sa)[1])


def ca_reference(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = covariance(a), covariance(b)
    return 1.0 - np.trace(sa @ sb) / (np.linalg.norm(sa) * np.linalg.norm(sb))


def bures_reference(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = covariance(a), covariance(b)
    root = scipy.linalg.sqrtm(sa)
    fidelity = np.trace(scipy.linalg.sqrtm(root @ sb @ root)).real
    return float(np.sqrt(max(0.0, np.trace(sa) + np.trace(sb) - 2.0 * fidelity)))


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def wasserstein_brute_force(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = softmax(a), softmax(b)
    n = len(pa)
    best = min(np.sum((pa - pb[list(p)]) ** 2) for p in itertools.permutations(range(n)))
    return float(np.sqrt(best / n))


# --------------------------------------------------------------------------- registry


def test_registry_keys_and_fields():
    assert list(METRICS) == ["euclidean", "ca", "kl", "jeffreys", "bures", "wasserstein"]
    for name, m in METRICS.items():
        assert isinstance(m, Metric) and m.name == name and get_metric(name) is m
        assert m.description and "\n" not in m.description
    assert [n for n, m in METRICS.items() if not m.symmetric] == ["kl"]


def test_unknown_metric_names_the_choices():
    with pytest.raises(LfgraphError, match=r"unknown metric 'cosine': choose one of euclidean, ca, kl"):
        get_metric("cosine")
    with pytest.raises(LfgraphError, match="unknown metric"):
        pairwise_distances("cosine", [rand((3, 4), 0)] * 2)


# --------------------------------------------------------------------------- against references


@pytest.mark.parametrize("shape", SHAPES + [(3, 20), (20, 3)])
def test_bures_closed_form_matches_sqrtm(shape):
    a, b = related_pair(shape, 1)
    assert rel_err(METRICS["bures"].distance(a, b), bures_reference(a, b)) <= 1e-6
    c = rand(shape, 2)  # an unrelated layer too
    assert rel_err(METRICS["bures"].distance(a, c), bures_reference(a, c)) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_and_jeffreys_match_direct_formula(shape):
    a, b = related_pair(shape, 3)
    kl, jeffreys = METRICS["kl"].distance, METRICS["jeffreys"].distance
    assert rel_err(kl(a, b), kl_reference(a, b)) <= 1e-8
    assert rel_err(kl(b, a), kl_reference(b, a)) <= 1e-8
    assert abs(kl(a, b) - kl(b, a)) > 1e-3 * kl(a, b)  # genuinely asymmetric
    assert rel_err(jeffreys(a, b), kl(a, b) + kl(b, a)) <= 1e-9


def test_kl_ridge_keeps_singular_covariances_finite():
    a, b = related_pair((4, 30), 4)  # rank-4 covariances in 30 dimensions
    value = METRICS["kl"].distance(a, b)
    assert np.isfinite(value) and rel_err(value, kl_reference(a, b)) <= 1e-8


@pytest.mark.parametrize("shape", SHAPES)
def test_ca_matches_trace_formula(shape):
    a, b = related_pair(shape, 5)
    assert rel_err(METRICS["ca"].distance(a, b), ca_reference(a, b)) <= 1e-10


@pytest.mark.parametrize("shape", [(4, 3), (5, 8), (6, 2)])
def test_wasserstein_matches_brute_force_over_permutations(shape):
    a, b = related_pair(shape, 6)
    a, b = 3 * a, 3 * b  # sharper softmax rows, so the best permutation matters
    assert rel_err(METRICS["wasserstein"].distance(a, b), wasserstein_brute_force(a, b)) <= 1e-10


def test_row_assignment_recovers_a_known_permutation():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((40, 12))
    perm_true = rng.permutation(40)
    b = a[perm_true] + 1e-3 * rng.standard_normal((40, 12))
    perm = row_assignment(a, b)
    assert sorted(perm) == list(range(40))
    np.testing.assert_array_equal(perm_true[perm], np.arange(40))  # b[perm] lines up with a
    np.testing.assert_allclose(b[perm], a, atol=1e-2)


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_row_assignment_minimises_squared_row_distance(seed):
    a, b = rand((6, 3), seed), rand((6, 3), seed + 1)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)
    best = min(cost[np.arange(6), list(p)].sum() for p in itertools.permutations(range(6)))
    assert cost[np.arange(6), row_assignment(a, b)].sum() == pytest.approx(best, rel=1e-12)


def test_wasserstein_uses_row_assignment_on_softmax_rows():
    a, b = related_pair((8, 5), 8)
    perm = row_assignment(softmax(a), softmax(b))
    expected = np.sqrt(np.mean(np.sum((softmax(a) - softmax(b)[perm]) ** 2, axis=1)))
    assert rel_err(METRICS["wasserstein"].distance(a, b), expected) <= 1e-12


# --------------------------------------------------------------------------- invariances


def transformed(a: np.ndarray, tag: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = a.shape[0]
    if tag == "row-permutation":
        return a[rng.permutation(n)]
    if tag == "row-orthogonal":
        return orthogonal(n, seed) @ a
    if tag == "row-shift":
        return a + rng.standard_normal((n, 1))
    raise AssertionError(tag)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(METRICS))
def test_declared_invariances_hold(name, shape):
    m = METRICS[name]
    a, b = related_pair(shape, 9)
    ref = m.distance(a, b)
    for tag in m.invariances:
        if tag == "scale":
            got = m.distance(3.0 * a, 0.2 * b)
        elif tag == "joint-scale":
            got = m.distance(3.0 * a, 3.0 * b)
        else:
            got = m.distance(transformed(a, tag, 10), transformed(b, tag, 11))
        assert rel_err(got, ref) <= 1e-6, (name, tag)


def test_covariance_metrics_declare_the_paper_invariances():
    for name in COVARIANCE_METRICS:
        assert {"row-permutation", "row-orthogonal"} <= set(METRICS[name].invariances)
    assert "row-permutation" in METRICS["wasserstein"].invariances
    assert METRICS["euclidean"].invariances == ()


@pytest.mark.parametrize("tag", ["row-permutation", "row-orthogonal"])
def test_undeclared_invariances_do_not_hold(tag):
    a, b = related_pair((9, 9), 12)
    euclidean = METRICS["euclidean"].distance
    assert rel_err(euclidean(transformed(a, tag, 13), b), euclidean(a, b)) > 0.1
    if tag == "row-orthogonal":  # softmax rows are not preserved by rotating the neurons
        w = METRICS["wasserstein"].distance
        assert rel_err(w(transformed(a, tag, 13), b), w(a, b)) > 0.01


# --------------------------------------------------------------------------- distance properties


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(METRICS))
def test_zero_on_identical_and_growing_with_noise(name, shape):
    distance = METRICS[name].distance
    a = rand(shape, 14)
    noise = rand(shape, 15)
    near, far = distance(a, a + 0.1 * noise), distance(a, a + 1.0 * noise)
    assert abs(distance(a, a)) <= 1e-7 * far
    assert distance(a, a.astype(np.float32)) <= 1e-6 * far  # float32 input, same answer
    assert 0.0 < near < far
    assert distance(a + noise, a) >= 0.0


def test_inputs_are_not_modified():
    a, b = related_pair((5, 7), 16)
    a0, b0 = a.copy(), b.copy()
    for m in METRICS.values():
        m.distance(a, b)
    pairwise_distances("bures", [a, b])
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


def test_bad_inputs_raise_lfgraph_error():
    with pytest.raises(LfgraphError, match="same shape|compatible group"):
        METRICS["ca"].distance(rand((3, 4), 0), rand((4, 3), 1))
    with pytest.raises(LfgraphError, match="2-D"):
        METRICS["ca"].distance(rand((2, 3, 4), 0), rand((2, 3, 4), 1))
    bad = rand((3, 4), 0)
    bad[1, 2] = np.nan
    with pytest.raises(LfgraphError, match="NaN"):
        METRICS["bures"].distance(bad, rand((3, 4), 1))
    with pytest.raises(LfgraphError, match="all-zero"):
        METRICS["kl"].distance(np.zeros((3, 4)), rand((3, 4), 1))


# --------------------------------------------------------------------------- pairwise_distances


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])
@pytest.mark.parametrize("name", list(METRICS))
def test_pairwise_matches_per_pair_calls(name, shape):
    base = rand(shape, 17)
    mats = [(base + 0.5 * k * rand(shape, 18 + k)).astype(np.float32) for k in range(4)]
    m = METRICS[name]
    dist = pairwise_distances(name, mats)
    assert dist.shape == (4, 4) and dist.dtype == np.float64
    np.testing.assert_array_equal(np.diag(dist), 0.0)
    for i, j in itertools.permutations(range(4), 2):
        assert dist[i, j] == pytest.approx(m.distance(mats[i], mats[j]), rel=1e-9)
    if m.symmetric:
        np.testing.assert_array_equal(dist, dist.T)
    else:
        assert not np.allclose(dist, dist.T)


def test_pairwise_only_fills_requested_pairs():
    mats = [rand((4, 6), k) for k in range(5)]
    dist = pairwise_distances("kl", mats, pairs=[(0, 2), (3, 1), (0, 2)])
    filled = {(0, 2), (2, 0), (1, 3), (3, 1)}
    for i, j in itertools.product(range(5), repeat=2):
        if i == j:
            assert dist[i, j] == 0.0
        elif (i, j) in filled:
            assert dist[i, j] == pytest.approx(METRICS["kl"].distance(mats[i], mats[j]), rel=1e-9)
        else:
            assert np.isnan(dist[i, j])


def test_pairwise_prepares_each_matrix_once_and_only_when_used():
    calls: list[int] = []
    base = METRICS["bures"]

    def counting_prepare(a: np.ndarray):
        calls.append(id(a))
        return base.prepare(a)

    counting = Metric("counting", "test", (), True, counting_prepare, base.compare)
    mats = [rand((4, 6), k) for k in range(6)]
    pairwise_distances(counting, mats)
    assert sorted(calls) == sorted(id(m) for m in mats)
    calls.clear()
    pairwise_distances(counting, mats, pairs=[(0, 1), (1, 2)])
    assert len(calls) == 3


def test_pairwise_rejects_bad_requests():
    mats = [rand((3, 4), k) for k in range(3)]
    with pytest.raises(LfgraphError, match="same shape|compatible group"):
        pairwise_distances("ca", mats + [rand((4, 3), 9)])
    for pair in [(0, 0), (1, 3), (-1, 2)]:
        with pytest.raises(LfgraphError, match="pair"):
            pairwise_distances("ca", mats, pairs=[pair])
    assert pairwise_distances("ca", []).shape == (0, 0)


def test_pairwise_progress_bar(capsys):
    mats = [rand((3, 4), k) for k in range(3)]
    dist = pairwise_distances(METRICS["euclidean"], mats, progress=True)
    assert "euclidean distances" in capsys.readouterr().err
    assert np.isfinite(dist).all()


# --------------------------------------------------------------------------- the KL fix


def _sample(n: int, d: int, spectrum: np.ndarray, seed: int) -> np.ndarray:
    """``n`` rows drawn from ``N(0, Q diag(spectrum) Qᵀ)`` with a fixed rotation ``Q``."""
    q = orthogonal(d, 99)
    z = np.random.default_rng(seed).standard_normal((n, d))
    return (z * np.sqrt(spectrum)) @ q.T


def _old_kl(a: np.ndarray, b: np.ndarray, ridge: float = KL_RIDGE) -> float:
    """KL with the former fixed ridge (1e-3 of the mean eigenvalue), dense reference."""
    def r(x: np.ndarray) -> np.ndarray:
        s = covariance(x)
        return s + ridge * np.trace(s) / s.shape[0] * np.eye(s.shape[0])

    sa, sb = r(a), r(b)
    d = sa.shape[0]
    return 0.5 * (np.trace(np.linalg.inv(sb) @ sa) - d + np.linalg.slogdet(sb)[1] - np.linalg.slogdet(sa)[1])


def test_kl_no_longer_ranks_by_its_ridge_on_wide_layers():
    """A wide layer (8 rows, 48 inputs, like a k/v or down projection). ``b`` is a fresh
    draw from the same distribution as ``a``; ``c`` keeps ``a``'s rows' subspace but has a
    very different spectrum (its rows' directions spread equally, a different layer). The
    former fixed ridge ranked ``c`` closer to ``a`` than ``b`` is (the mass of ``a`` outside
    ``b``'s 8-dimensional row space, divided by a tiny ridge, decided everything); with OAS
    shrinkage ``b`` is the closer one, as it should be."""
    d, n = 48, 8
    spectrum = np.geomspace(10.0, 0.1, d)
    a, b = _sample(n, d, spectrum, 1), _sample(n, d, spectrum, 2)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    c = u @ np.diag(s[::-1] ** 2 / s.max()) @ vt  # same row space, reversed/stretched spectrum
    assert _old_kl(a, c) < _old_kl(a, b)  # the former metric ranked wrongly
    kl = METRICS["kl"].distance
    assert kl(a, b) < kl(a, c)
    assert METRICS["jeffreys"].distance(a, b) < METRICS["jeffreys"].distance(a, c)


def test_kl_shrinkage_vanishes_with_many_rows():
    """With far more rows than inputs the shrinkage intensity is small, so ``kl`` tends to
    the unregularised Gaussian KL."""
    from lfgraph.passes.metrics import oas_shrinkage

    a = rand((4000, 6), 5) * np.array([0.2, 0.5, 1.0, 2.0, 4.0, 8.0])  # far from isotropic
    s = covariance(a)
    assert oas_shrinkage(4000, 6, float(np.trace(s)), float(np.vdot(s, s))) < 1e-2
    b = a * np.array([1.0, 1.2, 0.9, 1.1, 1.0, 1.3])
    sa, sb = covariance(a), covariance(b)
    exact = 0.5 * (np.trace(np.linalg.inv(sb) @ sa) - 6 + np.linalg.slogdet(sb)[1] - np.linalg.slogdet(sa)[1])
    assert rel_err(METRICS["kl"].distance(a, b), exact) < 0.05


class _Wide(torch.nn.Module):
    """Three residual 16 -> 512 layers (each output averaged back to 16): tall layers, so
    that the shrinkage is small and the divergences are those of the constructed spectra."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 512) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x).reshape(*x.shape[:-1], 32, 16).mean(-2)
        return x


def test_kl_ranking_keeps_the_asymmetry_so_kl_and_jeffreys_plan_differently():
    """Layer 0 is layer 1 with half its input directions shrunk 100x in variance: KL(0‖1)
    is small (the broader layer 1 stands in for layer 0) while KL(1‖0) is large. Layer 2 is
    layer 1 with half the directions stretched 12x and half shrunk 12x: moderate in both
    directions. ``kl`` ranks a pair by its smaller direction and ties (0, 1) first;
    ``jeffreys`` (the sum) ties (1, 2) first. Before the fix both averaged the directions and
    gave byte-identical plans."""
    from lfgraph.frontends.torch_fx import build_layer_graph
    from lfgraph.passes.analysis import analyze
    from lfgraph.passes.planner import make_plan

    rng = np.random.default_rng(0)
    base = rng.standard_normal((512, 16)) * np.geomspace(0.3, 3, 16)
    model = _Wide().eval()
    with torch.no_grad():
        for layer, scale in zip(model.layers, (np.r_[np.ones(8), np.full(8, 0.01)], np.ones(16), np.r_[np.full(8, 12.0), np.full(8, 1 / 12)])):
            layer.weight.copy_(torch.tensor(base * np.sqrt(scale), dtype=torch.float32))
    graph = build_layer_graph(model, (torch.randn(2, 16),))
    first_kl = analyze(graph, "kl").ranked_layer_pairs("adjacent")[0]
    first_jeff = analyze(graph, "jeffreys").ranked_layer_pairs("adjacent")[0]
    assert (first_kl[1], first_kl[2]) == ("layers.0", "layers.1")
    assert (first_jeff[1], first_jeff[2]) == ("layers.1", "layers.2")
    kw = dict(target=0.3, target_kind="params", scope="adjacent", mode="tie")
    plan_kl, plan_jeff = make_plan(graph, metric="kl", **kw), make_plan(graph, metric="jeffreys", **kw)
    assert [sorted([f.keep, *f.absorb]) for f in plan_kl.fusions] == [["layers.0", "layers.1"]]
    assert [sorted([f.keep, *f.absorb]) for f in plan_jeff.fusions] == [["layers.1", "layers.2"]]
