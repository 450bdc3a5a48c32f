"""Time all-pairs similarity analysis on a real model, one metric at a time.

For every compatible group of the model (SmolLM2-135M: 7 groups of 30 layers, 435 pairs
each) this times ``lfgraph.passes.metrics.pairwise_distances`` over all pairs, per metric,
and prints a table. Metrics named in ``--sampled`` (by default only the exact Wasserstein,
an ``O(n_out³)`` assignment per pair) are timed on ``--max-pairs`` random pairs per group:
preparing every layer is measured, the per-pair time is extrapolated to all pairs, and the
table says which figures are extrapolated.

It also times the Bures closed form (singular values of ``a bᵀ``) against the literal
``scipy.linalg.sqrtm`` formula on the same pairs and prints the ratio from this run.

Usage::

    .venv/bin/python tools/bench_analysis.py --threads 1 --max-pairs 40
"""

from __future__ import annotations

import argparse
import os
import sys


def _pin_threads(argv: list[str]) -> None:
    """Set BLAS thread counts before NumPy is imported: OpenBLAS reads them once, at load."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=1)
    threads = str(max(1, pre.parse_known_args(argv)[0].threads))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads


if __name__ == "__main__":
    _pin_threads(sys.argv[1:])

import math  # noqa: E402  (everything below loads BLAS, so it comes after the thread pin)
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from itertools import combinations  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402

from lfgraph.passes.metrics import METRICS, pairwise_distances  # noqa: E402


@dataclass
class Timing:
    """Seconds for one metric over all groups; ``measured_pairs < pairs`` means extrapolated."""

    pairs: int = 0
    measured_pairs: int = 0
    measured_seconds: float = 0.0
    seconds: float = 0.0


def sample_pairs(n: int, k: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``k`` distinct random pairs ``(i, j)``, ``i < j``, of ``n`` items (all if ``k`` is larger)."""
    pairs = list(combinations(range(n), 2))
    if k >= len(pairs):
        return pairs
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=k, replace=False))]


def time_sampled(name: str, mats: list[np.ndarray], pairs: list[tuple[int, int]]) -> tuple[float, float]:
    """(seconds to prepare every matrix, seconds for ``pairs``): the two halves of
    ``pairwise_distances`` timed apart, so that only the per-pair half is extrapolated."""
    metric = METRICS[name]
    t0 = time.perf_counter()
    stats = [metric.prepare(m) for m in mats]
    prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, j in pairs:
        if metric.symmetric:
            metric.compare(stats[i], stats[j])
        elif metric.compare_both is not None:
            metric.compare_both(stats[i], stats[j])
        else:
            metric.compare(stats[i], stats[j])
            metric.compare(stats[j], stats[i])
    return prep, time.perf_counter() - t0


def time_metric(name: str, groups: dict[str, list[np.ndarray]], max_pairs: int | None, seed: int) -> Timing:
    """All-pairs ``pairwise_distances`` per group, end to end.

    With ``max_pairs`` (and a group with more pairs than that), the group's time is
    estimated instead as: preparing all its matrices (measured) + ``max_pairs`` random pairs
    (measured) × all pairs / ``max_pairs``.
    """
    rng = np.random.default_rng(seed)
    out = Timing()
    for mats in groups.values():
        total = len(mats) * (len(mats) - 1) // 2
        out.pairs += total
        t0 = time.perf_counter()
        if max_pairs is None or max_pairs >= total:
            pairwise_distances(name, mats)
            out.measured_pairs += total
            out.seconds += time.perf_counter() - t0
        else:
            prep, pair_seconds = time_sampled(name, mats, sample_pairs(len(mats), max_pairs, rng))
            out.measured_pairs += max_pairs
            out.seconds += prep + pair_seconds * total / max_pairs
        out.measured_seconds += time.perf_counter() - t0
    return out


def covariance(a: np.ndarray) -> np.ndarray:
    """``Σ = aᵀ a / n_out`` in float64, the convention of ``lfgraph.passes.metrics``."""
    a = a.astype(np.float64)
    return a.T @ a / a.shape[0]


def bures_sqrtm(sigma_a: np.ndarray, root_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """The paper's eq. 5 literally: ``sqrt(tr Σa + tr Σb - 2 tr(sqrtm(Σa^½ Σb Σa^½)))``."""
    inner = scipy.linalg.sqrtm(root_a @ sigma_b @ root_a)
    squared = np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(inner).real
    return math.sqrt(max(0.0, float(squared)))


def compare_bures(groups: dict[str, list[np.ndarray]], n_pairs: int) -> list[tuple[str, int, float, float, float]]:
    """Per group: (key, pairs, closed-form s, sqrtm s, max relative difference).

    The pairs are layer 0 against layers 1..n_pairs, so the reference needs ``sqrtm(Σ)`` of
    one layer only (it is the slow part for a 1536-wide covariance). Each form's time
    includes its own per-matrix preparation: covariances and that one ``sqrtm`` for the
    reference, a QR factor or nothing for the closed form.
    """
    rows = []
    for key, mats in groups.items():
        pairs = [(0, j) for j in range(1, min(n_pairs, len(mats) - 1) + 1)]

        t0 = time.perf_counter()
        closed = pairwise_distances("bures", mats, pairs=pairs)
        t_closed = time.perf_counter() - t0

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # Σ is singular for wide layers (rank n_out < fan_in); sqrtm warns but copes.
            warnings.simplefilter("ignore")
            sigmas = {i: covariance(mats[i]) for i in range(len(pairs) + 1)}
            root = scipy.linalg.sqrtm(sigmas[0])
            reference = {(0, j): bures_sqrtm(sigmas[0], root, sigmas[j]) for _, j in pairs}
        t_sqrtm = time.perf_counter() - t0

        worst = max(abs(closed[i, j] - ref) / ref for (i, j), ref in reference.items())
        rows.append((key, len(pairs), t_closed, t_sqrtm, worst))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model spec for lfgraph.models.load_model")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated, from: {', '.join(METRICS)}")
    parser.add_argument("--max-pairs", type=int, default=40, help="pairs per group timed for --sampled metrics")
    parser.add_argument("--sampled", default="wasserstein", help="comma-separated metrics timed on --max-pairs pairs")
    parser.add_argument("--bures-pairs", type=int, default=20, help="pairs per group for closed form vs sqrtm (slow: a 1536-wide sqrtm is seconds)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (set before NumPy loads)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    sampled = {m for m in args.sampled.split(",") if m}
    unknown = [m for m in metrics + sorted(sampled) if m not in METRICS]
    if unknown:
        parser.error(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)}")

    import torch

    from lfgraph.frontends.torch_fx import build_layer_graph
    from lfgraph.models import load_model

    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    lm = load_model(args.model)
    graph = build_layer_graph(lm.module, lm.example_inputs)
    groups = {key: [node.matrix for node in nodes] for key, nodes in graph.groups().items()}
    print(f"model {args.model}: {len(groups)} groups, loaded and traced in {time.perf_counter() - t0:.1f} s")
    for key, mats in groups.items():
        print(f"  {key:<40} {len(mats):>3} layers  {mats[0].shape[0]}x{mats[0].shape[1]}")
    print(
        f"threads {args.threads}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}"
    )
    print()

    header = f"{'metric':<12} {'pairs':>6} {'seconds':>9} {'s/pair':>9}  extrapolated?"
    print(header)
    print("-" * len(header))
    for name in metrics:
        t = time_metric(name, groups, args.max_pairs if name in sampled else None, args.seed)
        extrapolated = (
            f"yes: prep of all layers + {t.measured_pairs} pairs measured ({t.measured_seconds:.1f} s), "
            f"pair time scaled to {t.pairs}"
            if t.measured_pairs < t.pairs
            else "no"
        )
        print(f"{name:<12} {t.pairs:>6} {t.seconds:>9.2f} {t.seconds / t.pairs:>9.4f}  {extrapolated}", flush=True)
    print()

    rows = compare_bures(groups, args.bures_pairs)
    print("bures closed form vs scipy.linalg.sqrtm formula, same pairs, this run:")
    header = f"{'group':<40} {'pairs':>5} {'closed s':>9} {'sqrtm s':>9} {'ratio':>7} {'max rel diff':>12}"
    print(header)
    print("-" * len(header))
    for key, n, closed, ref, worst in rows:
        print(f"{key:<40} {n:>5} {closed:>9.3f} {ref:>9.3f} {ref / closed:>6.1f}x {worst:>12.1e}")
    closed_total = sum(r[2] for r in rows)
    ref_total = sum(r[3] for r in rows)
    print(
        f"ratio: sqrtm form {ref_total:.2f} s / closed form {closed_total:.2f} s = "
        f"{ref_total / closed_total:.1f}x faster closed form ({sum(r[1] for r in rows)} pairs, measured)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
