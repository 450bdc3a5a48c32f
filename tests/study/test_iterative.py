"""iterative_heal(): compress and heal on a curriculum (the research loop of
lfgraph_study.loops.iterative), on a tiny Llama trained on a learnable token chain."""

from __future__ import annotations

import pytest
import torch

from lfgraph.calibration import mean_nll
from lfgraph.models import LoadedModel
from lfgraph.retrain import HealConfig
from lfgraph_study.loops.iterative import HealStep, inflection, iterative_heal

from chain_data import trained_chain_llama


@pytest.fixture(scope="module")
def trained() -> dict:
    """A tiny Llama trained on the chain (the 'original') and its data."""
    return trained_chain_llama()


def test_iterative_heal_merges_on_a_curriculum(trained: dict) -> None:
    teacher, train, held = trained["teacher"], trained["train"], trained["held"]
    lm = LoadedModel(module=teacher, example_inputs=(held[:1],), name="tiny", family="causal-lm")
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    out, steps = iterative_heal(lm, 0.5, train, compression_steps=2, schedule_kind="uniform",
                                heal_config=HealConfig(steps=20, lr=1e-3, batch_size=8), select="block_influence", fuse="remove",
                                calibration=train[:8], evaluate=lambda m: mean_nll(m, held), progress=False)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in snapshot.items())  # input untouched
    assert [s.blocks for s in steps] == [4, 3, 2] and len(out.model.model.layers) == 2
    assert [s.fraction for s in steps] == [0.0, 0.25, 0.5]
    for s in steps[1:]:
        assert s.healed < s.one_shot  # each step's healing lowered the held-out loss
    assert mean_nll(out, held) == pytest.approx(steps[-1].healed)


def test_iterative_heal_ties_and_stops_at_the_inflection_point(trained: dict) -> None:
    # damage 0.1 per 10 % then 0.5 per 10 %: the curve bends upward at the last step
    rows = [HealStep(i, f, 4, 1, None, h, None) for i, (f, h) in enumerate([(0.0, 1.0), (0.1, 1.1), (0.2, 1.6)])]
    assert inflection(rows, 2.0) and not inflection(rows[:2], 2.0)
    assert not inflection([HealStep(i, f, 4, 1, None, 1 + f, None) for i, f in enumerate([0.0, 0.1, 0.2])], 2.0)
    teacher, train, held = trained["teacher"], trained["train"], trained["held"]
    lm = LoadedModel(module=teacher, example_inputs=(held[:1],), name="tiny", family="causal-lm")
    before = sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values())
    out, steps = iterative_heal(lm, 0.2, train, compression_steps=2, mode="tie", heal_config=HealConfig(steps=3, lr=1e-3),
                                evaluate=lambda m: mean_nll(m, held), progress=False)
    after = sum(p.numel() for p in {id(p): p for p in out.parameters()}.values())
    assert after <= 0.8 * before + 1 and len(steps) == 3
