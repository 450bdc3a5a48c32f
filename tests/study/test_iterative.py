"""iterative_heal(): compress and heal on a curriculum (the research loop of
lfgraph_study.loops.iterative), on a tiny Llama trained on a learnable token chain."""

from __future__ import annotations

import pytest
import torch

from lfgraph.calibration import mean_nll
from lfgraph.models import CausalLMLogits, LoadedModel
from lfgraph.retrain import HealConfig, heal
from lfgraph_study.loops.iterative import HealStep, inflection, iterative_heal
from lfgraph_study.zoo import tiny_llama

V = 64


def chain(n_windows: int, seed: int, perm: torch.Tensor, length: int = 32) -> torch.Tensor:
    """Token windows of a learnable chain: x[t+1] = perm[x[t]], a random restart every 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    x = [0]
    for t in range(n_windows * length - 1):
        x.append(int(torch.randint(0, V, (1,), generator=g)) if t % 8 == 7 else int(perm[x[-1]]))
    return torch.tensor(x).view(n_windows, length)


@pytest.fixture(scope="module")
def trained() -> dict:
    """A tiny Llama trained on the chain (the 'original') and its data."""
    torch.set_num_threads(1)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    train, held = chain(64, 1, perm), chain(16, 2, perm)
    model = CausalLMLogits(tiny_llama(layers=4, hidden=64, vocab_size=V))
    teacher = heal(model, None, train, HealConfig(steps=120, lr=3e-3, batch_size=8, progress=False)).model.eval()
    return {"teacher": teacher, "train": train, "held": held}


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
