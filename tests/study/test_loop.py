"""Retraining loops and objectives on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.retrain import RETRAIN_MODES
from lfgraph_study.loops import iterative_compress, retrain
from lfgraph.retrain.modes import unique_parameter_count
from lfgraph.retrain.objectives import Objective, distillation_loss, make_objective, task_loss
from lfgraph_study.zoo import MLP

torch.set_num_threads(1)


def task(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 4-class problem: the argmax of a fixed linear map of the input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x @ torch.randn(16, 4, generator=g)).argmax(1)


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def hidden_pair_model() -> MLP:
    torch.manual_seed(0)
    return MLP(16, 32, 4, 4)  # Linear layers net.0, net.2, net.4, net.6, net.8


@pytest.mark.parametrize("mode", sorted(RETRAIN_MODES))
def test_retraining_a_fused_mlp_lowers_the_loss(mode: str) -> None:
    x, y = task()
    model = hidden_pair_model()
    # the loss of the fused model before retraining: tie without training steps
    untrained = retrain(copy.deepcopy(model), [["net.2", "net.4"]], mode, batches(x, y), steps=0, progress=False)
    before = full_loss(untrained, x, y)
    before_params = unique_parameter_count(model)
    out = retrain(model, [["net.2", "net.4"]], mode, batches(x, y), steps=60, lr=1e-2, progress=False)
    assert out is model
    assert out.net[2].weight is out.net[4].weight
    assert before_params - unique_parameter_count(out) == 32 * 32 + 32
    assert full_loss(out, x, y) < 0.7 * before


def test_trainable_fused_changes_only_the_fused_layers() -> None:
    x, y = task()
    model = hidden_pair_model()
    first = model.net[0].weight.detach().clone()
    retrain(model, [["net.2", "net.4"]], "mean", batches(x, y), steps=5, lr=1e-2, progress=False, trainable="fused")
    assert torch.equal(model.net[0].weight, first)
    assert model.net[0].weight.requires_grad  # restored after training


def test_distillation_loss_is_zero_when_student_is_teacher() -> None:
    logits = torch.randn(3, 5, 7)
    assert float(distillation_loss(logits, logits.clone())) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(logits, logits + 1.0)) == pytest.approx(0.0, abs=1e-6)  # softmax shift
    assert float(distillation_loss(logits, torch.randn(3, 5, 7))) > 0
    model = hidden_pair_model()
    x, y = task(8)
    objective = make_objective("distill", temperature=3.0)
    assert objective(model, (x, y), copy.deepcopy(model)).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_matches_kl_formula() -> None:
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    T = 2.0
    p_t = F.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    torch.testing.assert_close(distillation_loss(s, t, T), expected)


def test_next_token_task_loss() -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = torch.randn(1, 4, 6)
    expected = F.cross_entropy(logits[0, :3], ids[0, 1:])
    torch.testing.assert_close(task_loss(logits, ids, None), expected)
    with pytest.raises(LfgraphError, match="next-token"):
        task_loss(torch.randn(4, 6), torch.randn(4, 6), None)


def test_mixed_objective_and_distillation_retraining() -> None:
    x, y = task()
    teacher = hidden_pair_model().eval()
    student = copy.deepcopy(teacher)
    mixed = make_objective("mixed", alpha=0.25)
    assert isinstance(mixed, Objective) and mixed.alpha == 0.25
    retrain(student, [["net.2", "net.4"]], "mix", batches(x, y), steps=20, objective=mixed, teacher=teacher, lr=1e-2, progress=False)
    with pytest.raises(LfgraphError, match="teacher"):
        retrain(hidden_pair_model(), [], "mean", batches(x, y), steps=1, objective="distill", progress=False)


def test_retrain_user_errors() -> None:
    model = hidden_pair_model()
    with pytest.raises(LfgraphError, match="needs data"):
        retrain(model, [["net.2", "net.4"]], "mean", None, steps=1, progress=False)
    with pytest.raises(LfgraphError, match="unknown objective"):
        retrain(model, [["net.2", "net.4"]], "mean", [], steps=1, objective="mse", progress=False)
    with pytest.raises(LfgraphError, match="no batches"):
        retrain(model, [["net.2", "net.4"]], "mean", [], steps=1, progress=False)
    # a failed round still leaves a plain, tied model behind
    assert model.net[2].weight is model.net[4].weight
    with pytest.raises(LfgraphError, match="unknown retraining mode"):
        retrain(model, [["net.2", "net.6"]], "avg", [task(8)], steps=1, progress=False)


def test_retrain_gpt2_conv1d_language_model() -> None:
    from lfgraph_study.zoo import tiny_gpt2

    model = tiny_gpt2(layers=2, hidden=32)
    ids = torch.arange(32).remainder(8).view(2, 16)  # a repeating, learnable sequence
    with torch.no_grad():
        before = float(task_loss(model(ids), ids, None))
    fused = [["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]]
    retrain(model, fused, "mix", [ids], steps=15, lr=3e-3, progress=False)
    assert model.transformer.h[0].mlp.c_fc.weight is model.transformer.h[1].mlp.c_fc.weight
    model.eval()
    with torch.no_grad():
        assert float(task_loss(model(ids), ids, None)) < before


def test_iterative_compress_reaches_the_final_fraction() -> None:
    x, y = task()
    model = hidden_pair_model()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = lambda m: float((m(x).argmax(1) == y).float().mean())  # noqa: E731
    out, history = iterative_compress(
        model, (x[:2],), batches(x, y), final_fraction=0.4, compression_steps=2, steps_per_compression=[20, 40],
        mode="mean", evaluate=accuracy, progress=False, lr=1e-2,
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())  # input untouched
    assert [h.step for h in history] == [0, 1, 2]
    assert [h.retrain_steps for h in history] == [0, 20, 40]
    assert history[-1].fraction == pytest.approx(0.4)
    assert history[-1].achieved >= 0.4 - 1e-9
    assert history[-1].params == unique_parameter_count(out) < unique_parameter_count(model)
    assert all(h.metric is not None for h in history)
    assert history[-1].loss is not None and not out.training


def test_iterative_compress_rejects_bad_schedule() -> None:
    x, y = task(64)
    with pytest.raises(LfgraphError, match="one per step"):
        iterative_compress(hidden_pair_model(), (x[:2],), batches(x, y), 0.3, 3, [10, 10], progress=False)
    with pytest.raises(LfgraphError, match="schedule kind"):
        iterative_compress(hidden_pair_model(), (x[:2],), batches(x, y), 0.3, 3, 10, schedule_kind="linear", progress=False)
