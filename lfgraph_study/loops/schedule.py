"""Compression curricula for iterative compress-and-retrain.

The paper observes that the damage of compression grows exponentially with the amount
removed, so instead of compressing a constant ``final / N`` at each of ``N`` compression
steps it "allocate[s] more compression earlier in retraining but more retraining steps
later". :func:`compression_schedule` gives the cumulative fractions and
:func:`retraining_steps` the matching (back-loaded) retraining budget.
"""

from __future__ import annotations

from lfgraph.errors import LfgraphError

#: Schedule kinds; the CLI's choices come from here.
SCHEDULE_KINDS = ("exponential", "uniform")


def _check(kind: str, steps: int) -> None:
    if kind not in SCHEDULE_KINDS:
        raise LfgraphError(f"unknown schedule kind {kind!r}: choose one of {list(SCHEDULE_KINDS)}")
    if int(steps) != steps or steps < 1:
        raise LfgraphError(f"the number of compression steps must be a positive integer, got {steps!r}")


def _geometric_weights(steps: int, rate: float) -> list[float]:
    """``rate**0, rate**1, …`` normalised to sum 1 (decreasing for ``rate < 1``)."""
    raw = [rate**s for s in range(steps)]
    total = sum(raw)
    return [r / total for r in raw]


def compression_schedule(final_fraction: float, steps: int, kind: str = "exponential", rate: float = 0.5) -> list[float]:
    """Cumulative compression fraction reached after each of ``steps`` compression steps.

    ``uniform``: ``c_s = F · s / N`` (equal increments).
    ``exponential``: ``c_s = F · (1 − r^s) / (1 − r^N)`` with ``r = rate`` (default ½):
    the increments ``c_s − c_{s−1} = F · r^{s−1} (1 − r) / (1 − r^N)`` shrink
    geometrically, each step compressing ``r`` times as much as the one before, so most of
    the compression happens early and the later steps mostly retrain.

    Guarantees: ``steps`` values, strictly increasing for ``F > 0``, the last exactly
    ``final_fraction``; for every ``s < N`` the exponential ``c_s`` is at least the
    uniform one. Raises ``LfgraphError`` for ``F`` outside ``[0, 1)``, ``steps < 1``,
    ``rate`` outside ``(0, 1)`` or an unknown kind.
    """
    _check(kind, steps)
    if not 0.0 <= final_fraction < 1.0:
        raise LfgraphError(f"final_fraction must be in [0, 1) (the share of weights removed), got {final_fraction}")
    if not 0.0 < rate < 1.0:
        raise LfgraphError(f"rate must be in (0, 1) (each step's share relative to the previous one), got {rate}")
    weights = [1.0 / steps] * steps if kind == "uniform" else _geometric_weights(steps, rate)
    out, acc = [], 0.0
    for w in weights:
        acc += w
        out.append(final_fraction * acc)
    out[-1] = float(final_fraction)  # no rounding drift at the end
    return out


def retraining_steps(total_steps: int, compression_steps: int, kind: str = "exponential", rate: float = 0.5) -> list[int]:
    """Split ``total_steps`` retraining steps over ``compression_steps`` compression steps.

    ``uniform``: equal shares. ``exponential``: the mirror of :func:`compression_schedule`,
    shares growing by ``1 / rate`` per step (more retraining later, when each further
    compression hurts more). Guarantees: the list sums to ``total_steps``, and the
    exponential one is non-decreasing.
    """
    _check(kind, compression_steps)
    if total_steps < 0:
        raise LfgraphError(f"total_steps must be >= 0, got {total_steps}")
    if kind == "uniform":
        weights = [1.0 / compression_steps] * compression_steps
    else:
        weights = list(reversed(_geometric_weights(compression_steps, rate)))
    out = [int(total_steps * w) for w in weights]
    # hand the rounding remainder to the last steps, where retraining matters most
    for i in range(total_steps - sum(out)):
        out[-1 - (i % compression_steps)] += 1
    return sorted(out) if kind == "exponential" else out


__all__ = ["SCHEDULE_KINDS", "compression_schedule", "retraining_steps"]
