"""Compression curricula: monotone, exact at the end, exponential front-loads."""

from __future__ import annotations

import pytest

from lfgraph.errors import LfgraphError
from lfgraph_study.loops.schedule import SCHEDULE_KINDS, compression_schedule, retraining_steps


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("final,steps", [(0.5, 1), (0.3, 3), (0.75, 6), (0.9, 10)])
def test_monotone_and_ends_at_final(kind: str, final: float, steps: int) -> None:
    sched = compression_schedule(final, steps, kind)
    assert len(sched) == steps
    assert sched[-1] == final
    assert all(b > a for a, b in zip([0.0, *sched], sched))


@pytest.mark.parametrize("final,steps", [(0.3, 3), (0.75, 6), (0.9, 10)])
def test_exponential_front_loads_versus_uniform(final: float, steps: int) -> None:
    exp = compression_schedule(final, steps, "exponential")
    uni = compression_schedule(final, steps, "uniform")
    assert all(e > u for e, u in zip(exp[:-1], uni[:-1]))
    increments = [b - a for a, b in zip([0.0, *exp], exp)]
    assert all(b < a for a, b in zip(increments, increments[1:]))


def test_documented_formulas() -> None:
    assert compression_schedule(0.6, 3, "uniform") == pytest.approx([0.2, 0.4, 0.6])
    # F (1 - r^s) / (1 - r^N) with r = 1/2, N = 3: increments 4/7, 2/7, 1/7 of F
    assert compression_schedule(0.7, 3, "exponential") == pytest.approx([0.4, 0.6, 0.7])
    assert compression_schedule(0.7, 3, "exponential", rate=0.25) == pytest.approx(
        [0.7 * 16 / 21, 0.7 * 20 / 21, 0.7]
    )


def test_retraining_steps_back_load() -> None:
    steps = retraining_steps(700, 3, "exponential")
    assert sum(steps) == 700 and steps == sorted(steps) and steps[0] < steps[-1]
    assert steps == [100, 200, 400]
    assert retraining_steps(10, 3, "uniform") == [3, 3, 4]
    assert sum(retraining_steps(101, 4, "exponential")) == 101


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(LfgraphError, match="final_fraction"):
        compression_schedule(1.2, 3)
    with pytest.raises(LfgraphError, match="positive integer"):
        compression_schedule(0.5, 0)
    with pytest.raises(LfgraphError, match="unknown schedule kind 'linear'.*exponential"):
        compression_schedule(0.5, 3, "linear")
    with pytest.raises(LfgraphError, match="rate"):
        compression_schedule(0.5, 3, rate=1.0)
    with pytest.raises(LfgraphError, match="total_steps"):
        retraining_steps(-1, 3)
