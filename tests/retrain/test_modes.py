"""Retraining modes: each rule checked against a direct computation on an unfused copy."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.retrain.modes import (
    RETRAIN_MODES,
    gaussian_kl_to_mixture,
    install_retrain_mode,
    js_gamma,
    unique_parameter_count,
)

torch.set_num_threads(1)


def mlp(seed: int = 0, width: int = 8, depth: int = 4) -> nn.Sequential:
    """Linear layers at indices 0, 2, …, 2*depth; the hidden ones (2, 4, …) are 8x8."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


def batch(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def sgd_steps(model: nn.Module, n: int = 3, lr: float = 0.1) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(n):
        x, y = batch(seed=10 + i)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


# --------------------------------------------------------------------------- mean


def test_mean_starts_at_average_and_gets_average_gradient() -> None:
    model = mlp()
    avg_w = (model[2].weight + model[4].weight).detach() / 2
    avg_b = (model[2].bias + model[4].bias).detach() / 2
    # the trusted way: an unfused copy with both layers set to the average
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in (2, 4):
            ref[i].weight.copy_(avg_w)
            ref[i].bias.copy_(avg_b)
    handle = install_retrain_mode(model, [["2", "4"]], "mean")
    assert torch.equal(model[2].weight, avg_w) and torch.equal(model[4].weight, avg_w)
    x, y = batch()
    loss_of(model, x, y).backward()
    loss_of(ref, x, y).backward()
    expected = (ref[2].weight.grad + ref[4].weight.grad) / 2
    torch.testing.assert_close(model[2].weight.grad, expected)
    torch.testing.assert_close(model[4].weight.grad, expected)
    torch.testing.assert_close(model[2].bias.grad, (ref[2].bias.grad + ref[4].bias.grad) / 2)
    handle.finalize()


def test_mean_stays_equal_and_finalize_saves_exactly_one_layer() -> None:
    model = mlp()
    before = unique_parameter_count(model)
    handle = install_retrain_mode(model, [["2", "4"]], "mean")
    for _ in range(3):
        sgd_steps(model, n=1)
        assert torch.equal(model[2].weight, model[4].weight)
        assert torch.equal(model[2].bias, model[4].bias)
    out = handle.finalize()
    assert out is model
    assert model[2].weight is model[4].weight and model[2].bias is model[4].bias
    assert isinstance(model[2].weight, nn.Parameter)
    assert before - unique_parameter_count(model) == 8 * 8 + 8
    # training after finalize keeps the tie (one parameter)
    sgd_steps(model, n=1)
    assert model[2].weight is model[4].weight


def test_mean_three_members_and_conv() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
    before = unique_parameter_count(net)
    avg = torch.stack([c.weight.detach() for c in net]).mean(0)
    handle = install_retrain_mode(net, [["0", "1", "2"]], "mean")
    torch.testing.assert_close(net[1].weight, avg)
    handle.finalize()
    assert net[0].weight is net[1].weight is net[2].weight
    assert before - unique_parameter_count(net) == 2 * (4 * 4 * 9 + 4)


def test_already_tied_layers_follow_a_new_fusion() -> None:
    model = mlp(depth=5)
    model[6].weight = model[2].weight  # an earlier fusion tied 2 and 6
    model[6].bias = model[2].bias
    before = unique_parameter_count(model)
    install_retrain_mode(model, [["2", "4"]], "mean").finalize()
    assert model[2].weight is model[4].weight is model[6].weight
    assert before - unique_parameter_count(model) == 8 * 8 + 8


# --------------------------------------------------------------------------- freeze


def js_by_quadrature(w_i: torch.Tensor, w_j: torch.Tensor) -> float:
    """Eq. 6's γ computed a second way: scipy's adaptive quadrature on the true mixture."""
    mu_i, sd_i = float(w_i.double().mean()), float(w_i.double().std(unbiased=False))
    mu_j, sd_j = float(w_j.double().mean()), float(w_j.double().std(unbiased=False))
    p, q = stats.norm(mu_i, sd_i), stats.norm(mu_j, sd_j)

    def kl_to_mix(a: stats.rv_continuous) -> float:
        def f(x: float) -> float:
            pa = a.pdf(x)
            m = 0.5 * (p.pdf(x) + q.pdf(x))
            return pa * math.log(pa / m) if pa > 0 else 0.0

        lo = min(mu_i - 12 * sd_i, mu_j - 12 * sd_j)
        hi = max(mu_i + 12 * sd_i, mu_j + 12 * sd_j)
        return integrate.quad(f, lo, hi, points=[mu_i, mu_j], limit=400)[0]

    return 0.5 * (kl_to_mix(p) + kl_to_mix(q)) / math.log(2)


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.0, 3.0), (0.5, 1.0), (2.0, 0.2)])
def test_js_gamma_matches_quadrature(shift: float, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    w_i = torch.randn(32, 16, generator=g) * 0.1
    w_j = torch.randn(32, 16, generator=g) * 0.1 * scale + shift * 0.1
    gamma = js_gamma(w_i, w_j)
    assert 0.0 <= gamma <= 1.0
    assert gamma == pytest.approx(js_by_quadrature(w_i, w_j), abs=1e-6)
    assert gamma == pytest.approx(js_gamma(w_j, w_i), abs=1e-12)


def test_js_gamma_bounds() -> None:
    w = torch.randn(8, 8)
    assert js_gamma(w, w.clone()) == pytest.approx(0.0, abs=1e-9)
    far = js_gamma(w * 1e-3, w * 1e-3 + 100.0)
    assert far == pytest.approx(1.0, abs=1e-6)
    kl_p, kl_q = gaussian_kl_to_mixture(0.0, 1.0, 0.0, 1.0)
    assert kl_p == pytest.approx(0.0, abs=1e-9) and kl_q == pytest.approx(0.0, abs=1e-9)


def test_freeze_keeps_frozen_layer_and_weights_gradient_by_eq6() -> None:
    model = mlp(depth=5)  # hidden layers at 2, 4, 6, 8; layer positions 0..5, middle 2.5
    with torch.no_grad():
        model[6].weight.mul_(2.0)  # distributions differ, so γ is clearly above 0
    original = copy.deepcopy(model)
    # the trusted way: an unfused copy whose two positions hold the pair's average
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("weight", "bias"):
            avg = (getattr(ref[2], name) + getattr(ref[6], name)) / 2
            getattr(ref[2], name).copy_(avg)
            getattr(ref[6], name).copy_(avg)
    handle = install_retrain_mode(model, [["2", "6"]], "freeze")
    info = handle.info()[0]
    # depth positions "2" -> 1 and "6" -> 3 of 0..5: "6" is nearer the middle (2.5), so frozen
    assert info["frozen"] == ["6"] and info["trainable"] == "2"
    gamma = info["gamma"]["6"]
    assert gamma == pytest.approx(js_gamma(original[2].weight, original[6].weight))
    assert 0.05 < gamma < 0.95
    x, y = batch()
    loss_of(model, x, y).backward()
    loss_of(ref, x, y).backward()
    trainable = model[2].parametrizations.weight.original
    frozen = model[6].parametrizations.weight.original
    assert not frozen.requires_grad and frozen.grad is None
    # eq. 6: γ · (gradient at the frozen layer's position) + (1 − γ) · (at the trainable's)
    torch.testing.assert_close(trainable.grad, gamma * ref[6].weight.grad + (1 - gamma) * ref[2].weight.grad)
    torch.testing.assert_close(model[2].parametrizations.bias.original.grad, gamma * ref[6].bias.grad + (1 - gamma) * ref[2].bias.grad)
    # training forward = the deployed (averaged) network
    torch.testing.assert_close(model(x), ref(x))

    frozen_before = frozen.detach().clone()
    model.zero_grad()
    sgd_steps(model, n=3)
    assert torch.equal(frozen, frozen_before)
    assert not torch.equal(trainable, original[2].weight)


def test_freeze_divergence_rule_and_eval_equals_finalized() -> None:
    model = mlp()
    with torch.no_grad():
        model[4].weight.mul_(5.0)
    kl_2, kl_4 = gaussian_kl_to_mixture(
        float(model[2].weight.detach().mean()), float(model[2].weight.detach().std(unbiased=False)),
        float(model[4].weight.detach().mean()), float(model[4].weight.detach().std(unbiased=False)),
    )
    # the narrow layer is the one its mixture with the wide one represents worst
    assert kl_2 > kl_4
    handle = install_retrain_mode(model, [["2", "4"]], "freeze", freeze_by="divergence")
    assert handle.info()[0]["trainable"] == "2" and handle.info()[0]["frozen"] == ["4"]
    sgd_steps(model, n=2)
    model.eval()
    x, _ = batch()
    with torch.no_grad():
        before = model(x)
        avg = (model[2].parametrizations.weight.original + model[4].parametrizations.weight.original) / 2
    handle.finalize()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
        torch.testing.assert_close(model[2].weight, avg)
    assert model[2].weight is model[4].weight


def test_freeze_rejects_unknown_rule() -> None:
    with pytest.raises(LfgraphError, match="freeze_by"):
        install_retrain_mode(mlp(), [["2", "4"]], "freeze", freeze_by="coin")


# --------------------------------------------------------------------------- mix


def test_mix_rows_come_from_one_member_and_bias_is_averaged() -> None:
    model = mlp(width=32)
    w2, w4 = model[2].weight.detach().clone(), model[4].weight.detach().clone()
    b2, b4 = model[2].bias.detach().clone(), model[4].bias.detach().clone()
    handle = install_retrain_mode(model, [["2", "4"]], "mix", seed=3)
    model.train()
    seen: list[torch.Tensor] = []
    for i in range(3):
        model(batch(seed=i)[0])  # the pre-forward hook draws new rows
        mixed = model[2].weight.detach()
        assert torch.equal(mixed, model[4].weight.detach())  # one mixed layer in both places
        from2 = (mixed == w2).all(1)
        from4 = (mixed == w4).all(1)
        assert bool((from2 | from4).all())
        assert 0 < int(from2.sum()) < 32  # Bernoulli(1/2) over 32 rows
        seen.append(from2)
        torch.testing.assert_close(model[2].bias, (b2 + b4) / 2)
    assert not all(torch.equal(seen[0], s) for s in seen[1:])
    handle.finalize()
    torch.testing.assert_close(model[2].weight, (w2 + w4) / 2)


def test_mix_gradient_reaches_only_drawn_rows() -> None:
    model = mlp(width=16)
    install_retrain_mode(model, [["2", "4"]], "mix", seed=0)
    model.train()
    x, y = batch()
    loss_of(model, x, y).backward()
    choice = model[2].parametrizations.weight[0]._state[0].choice
    g2 = model[2].parametrizations.weight.original.grad
    g4 = model[4].parametrizations.weight.original.grad
    assert bool((g2[choice == 1] == 0).all()) and bool((g4[choice == 0] == 0).all())
    assert float(g2.abs().sum()) > 0 and float(g4.abs().sum()) > 0


def test_mix_gpt2_conv1d_mixes_output_columns() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(12, 6), Conv1D(12, 6))  # weights (in=6, out=12)
    for c in net:
        nn.init.normal_(c.weight)
    w0, w1 = net[0].weight.detach().clone(), net[1].weight.detach().clone()
    net = nn.Sequential(net[0], nn.Linear(12, 6), net[1])
    install_retrain_mode(net, [["0", "2"]], "mix", seed=1)
    net.train()
    net(torch.randn(2, 6))
    mixed = net[0].weight.detach()
    cols = [(mixed[:, c] == w0[:, c]).all() or (mixed[:, c] == w1[:, c]).all() for c in range(12)]
    assert all(bool(c) for c in cols)


# --------------------------------------------------------------------------- all modes


@pytest.mark.parametrize("mode", sorted(RETRAIN_MODES))
def test_every_mode_finalizes_to_one_shared_parameter(mode: str) -> None:
    model = mlp()
    before = unique_parameter_count(model)
    handle = install_retrain_mode(model, [["2", "4"]], mode)
    sgd_steps(model, n=2)
    model.eval()
    x, _ = batch()
    with torch.no_grad():
        installed_eval = model(x)
    handle.finalize()
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert model[2].weight is model[4].weight
    assert before - unique_parameter_count(model) == 8 * 8 + 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), installed_eval)
    with pytest.raises(LfgraphError, match="already finalized"):
        handle.finalize()


def test_errors_name_the_problem() -> None:
    with pytest.raises(LfgraphError, match="unknown retraining mode 'avg'.*freeze"):
        install_retrain_mode(mlp(), [["2", "4"]], "avg")
    with pytest.raises(LfgraphError, match="does not match"):
        install_retrain_mode(mlp(), [["0", "2"]], "mean")
    with pytest.raises(LfgraphError, match="not a module"):
        install_retrain_mode(mlp(), [["2", "40"]], "mean")
    with pytest.raises(LfgraphError, match="only nn.Linear"):
        install_retrain_mode(mlp(), [["1", "3"]], "mean")
    with pytest.raises(LfgraphError, match="two fused sets"):
        install_retrain_mode(mlp(), [["2", "4"], ["4", "6"]], "mean")
    with pytest.raises(LfgraphError, match="fewer than two"):
        install_retrain_mode(mlp(), [["2"]], "mean")
    with pytest.raises(LfgraphError, match="takes options"):
        install_retrain_mode(mlp(), [["2", "4"]], "mean", seed=1)
    model = mlp()
    install_retrain_mode(model, [["2", "4"]], "mix")
    with pytest.raises(LfgraphError, match="finalize"):
        install_retrain_mode(model, [["2", "4"]], "mix")


def test_gaussian_kl_to_mixture_is_bounded() -> None:
    for sd in (1e-6, 1.0, 1e6):
        kl_p, kl_q = gaussian_kl_to_mixture(0.0, sd, 1.0, 1.0)
        assert 0.0 <= kl_p <= math.log(2) and 0.0 <= kl_q <= math.log(2)
    assert np.isfinite(js_gamma(torch.zeros(4, 4), torch.ones(4, 4)))
