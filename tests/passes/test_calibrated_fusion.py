"""Calibrated fusion: the ridge refit recovers what a fused run computes.

Trusted second computations: a run that is exactly linear in the kept block's features must
be reproduced exactly; an infinite ridge strength must give back the starting weights; a
basic block followed by a no-op block must be reproduced exactly; and on a real (tiny,
random) Llama the fit must beat plain deletion.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lfgraph.errors import LfgraphError, UnsupportedModelError
from lfgraph.models import CausalLMLogits
from lfgraph.passes.block_stack import remove_blocks
from lfgraph.passes.calibrated_fusion import RidgeStats, calibrated_merge, calibrated_merge_plan, ridge_solve
from lfgraph.passes.selection import Run, runs_to_plan
from tiny_models import ResNetCNN, randomize_batchnorm, tiny_llama

torch.set_num_threads(2)


class LinearMLP(nn.Module):
    """``down_proj(up_proj(x))``: no nonlinearity, so every block update is linear in x."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x))


class LinearBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.mlp = LinearMLP(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class LinearNet(nn.Module):
    def __init__(self, d: int = 8, h: int = 16, n: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(5, d)
        self.layers = nn.ModuleList(LinearBlock(d, h) for _ in range(n))
        for layer in self.layers:
            layer.mlp.down_proj.weight.data *= 0.3
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_linear_run_is_recovered_exactly() -> None:
    net = LinearNet().eval()
    calib = torch.randn(12, 10, 5)
    test = torch.randn(4, 10, 5)
    before = net(test)
    out = calibrated_merge(net, [["layers.1", "layers.2", "layers.3"]], calib, strengths=(1e-9,), token_weighting="none")
    assert len(out.model.layers) == 2
    # the kept block's update D U1 x must equal the composite (I+D3U3)(I+D2U2)(I+D1U1)x - x
    torch.testing.assert_close(out.model(test), before, rtol=1e-4, atol=1e-4)
    assert out.log.count("refit") == 1 and out.log.count("remove") == 2
    # the caller's model is untouched
    assert len(net.layers) == 4
    torch.testing.assert_close(net(test), before)


def test_huge_strength_gives_back_starting_weights() -> None:
    model = CausalLMLogits(tiny_llama(layers=4)).eval()
    w0 = model.model.model.layers[1].mlp.down_proj.weight.detach().clone()
    o0 = model.model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    out = calibrated_merge(model, [["model.model.layers.1", "model.model.layers.2"]], ids, strengths=(1e12,), fit_attention=True)
    kept = out.model.model.model.layers[1]
    torch.testing.assert_close(kept.mlp.down_proj.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(kept.self_attn.o_proj.weight, o0, rtol=0, atol=1e-6)


def test_ridge_solve_limits() -> None:
    g = torch.Generator().manual_seed(0)
    z, W_true, W0 = torch.randn(200, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    stats = RidgeStats.zeros(6, 3)
    stats.add(z, z @ W_true.T)
    torch.testing.assert_close(ridge_solve(stats, W0, 1e-12).float(), W_true, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ridge_solve(stats, W0, 1e12).float(), W0, rtol=1e-5, atol=1e-5)
    assert stats.loss(W_true) == pytest.approx(0.0, abs=1e-6)


def test_calibrated_beats_removal_on_tiny_llama() -> None:
    model = CausalLMLogits(tiny_llama(layers=6)).eval()
    gen = torch.Generator().manual_seed(1)
    calib, test = torch.randint(0, 128, (16, 24), generator=gen), torch.randint(0, 128, (4, 24), generator=gen)
    ref = model(test)
    run = [f"model.model.layers.{i}" for i in (2, 3, 4)]
    removed = copy.deepcopy(model)
    remove_blocks(removed, run[1:])
    fused = calibrated_merge(model, [run], calib, fit_attention=True).model
    assert fused.model.config.num_hidden_layers == 4
    err_fused, err_removed = (fused(test) - ref).pow(2).mean(), (removed(test) - ref).pow(2).mean()
    assert err_fused < err_removed


def test_plan_entry_point_and_keep_choice() -> None:
    model = CausalLMLogits(tiny_llama(layers=4)).eval()
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
    plan = runs_to_plan([Run([1, 2], keep=2)], "model.model.layers", fuse="calibrated")
    out = calibrated_merge_plan(model, plan, ids)
    assert [r.target for r in out.log.records if r.action == "remove"] == ["model.model.layers.1"]
    assert out.log.records[0].target == "model.model.layers.2.mlp.down_proj"
    best = calibrated_merge(model, [["model.model.layers.1", "model.model.layers.2"]], ids, keep="best")
    assert best.log.count("refit") == 1 and best.log.count("remove") == 1
    with pytest.raises(LfgraphError):
        calibrated_merge(model, [["model.model.layers.1", "model.model.layers.3"]], ids)
    with pytest.raises(LfgraphError):
        calibrated_merge(model, [["model.model.layers.0", "model.model.layers.1"], ["model.model.layers.1", "model.model.layers.2"]], ids)


def test_conv_block_followed_by_noop_is_reproduced() -> None:
    torch.manual_seed(0)
    net = randomize_batchnorm(ResNetCNN(stages=((8, 3),), num_classes=4))
    # block 2 adds nothing: relu(0 + x) = x for the non-negative output of block 1
    with torch.no_grad():
        net.blocks[2].conv2.weight.zero_()
        net.blocks[2].bn2.bias.zero_()
        net.blocks[2].bn2.running_mean.zero_()
    x = torch.randn(24, 3, 8, 8)
    ref = net(x)
    out = calibrated_merge(net, [["blocks.1", "blocks.2"]], x, strengths=(1e-9,))
    assert len(out.model.blocks) == 2
    torch.testing.assert_close(out.model(x), ref, rtol=1e-4, atol=1e-4)


def test_conv_fit_improves_on_removal() -> None:
    torch.manual_seed(0)
    net = randomize_batchnorm(ResNetCNN(stages=((8, 3),), num_classes=4))
    calib, test = torch.randn(64, 3, 8, 8), torch.randn(16, 3, 8, 8)
    ref = net(test)
    removed = copy.deepcopy(net)
    remove_blocks(removed, ["blocks.2"])
    fused = calibrated_merge(net, [["blocks.1", "blocks.2"]], calib).model
    assert (fused(test) - ref).pow(2).mean() < (removed(test) - ref).pow(2).mean()


def test_post_layernorm_blocks_are_refused() -> None:
    from lfgraph.models import EncoderHidden
    from tiny_models import tiny_bert

    model = EncoderHidden(tiny_bert(layers=3)).eval()
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    run = ["model.encoder.layer.0", "model.encoder.layer.1"]
    with pytest.raises(UnsupportedModelError, match="post-LayerNorm"):
        calibrated_merge(model, [run], ids, mlp_proj="output.dense")
    # the family's architecture config knows BERT blocks are post-LayerNorm: refused before any fit
    with pytest.raises(UnsupportedModelError, match="bert blocks normalise the residual stream"):
        calibrated_merge(model, [run], ids)


def test_repair_refits_the_next_block_towards_the_original() -> None:
    net = LinearNet(n=5).eval()
    calib, test = torch.randn(12, 10, 5), torch.randn(4, 10, 5)
    before = net(test)
    out = calibrated_merge(net, [["layers.0", "layers.1"]], calib, repair_next=2, target="original", strengths=(1e-9,), token_weighting="none")
    repairs = [r for r in out.log.records if r.action == "refit" and r.detail["repair"]]
    assert [r.target for r in repairs] == ["layers.2.mlp.down_proj", "layers.3.mlp.down_proj"]
    assert all(r.detail["fit_target"] == "original" for r in repairs)
    assert len(out.model.layers) == 4
    torch.testing.assert_close(out.model(test), before, rtol=1e-4, atol=1e-4)


def test_map_refit_only_mixes_the_projections_outputs() -> None:
    """``refit="map"`` gives ``W = M W0``: the refitted rows stay in the row space of the
    starting weights, the fit error lies between the full refit's and no refit's, and an
    infinite ridge gives back ``W0`` (``M = I``)."""
    from lfgraph.passes.calibrated_fusion import map_stats

    g = torch.Generator().manual_seed(0)
    z, W0 = torch.randn(300, 12, generator=g), torch.randn(4, 12, generator=g)
    stats = RidgeStats.zeros(12, 4)
    stats.add(z, z @ torch.randn(12, 4, generator=g))
    eye = torch.eye(4, dtype=torch.float64)
    M = ridge_solve(map_stats(stats, W0), eye, 1e-9)
    W_map, W_full = M @ W0.double(), ridge_solve(stats, W0, 1e-9)
    # rows of W_map are combinations of W0's rows: stacking them adds no rank
    assert int(torch.linalg.matrix_rank(torch.cat([W0.double(), W_map]))) == 4
    assert stats.loss(W_full) <= stats.loss(W_map) + 1e-6 <= stats.loss(W0) + 1e-6
    torch.testing.assert_close(ridge_solve(map_stats(stats, W0), eye, 1e12), eye, rtol=0, atol=1e-6)

    model = CausalLMLogits(tiny_llama(layers=4)).eval()
    ids = torch.randint(0, 128, (6, 16), generator=g)
    w0 = model.model.model.layers[1].mlp.down_proj.weight.detach().double()
    out = calibrated_merge(model, [["model.model.layers.1", "model.model.layers.2"]], ids, refit="map")
    w = out.model.model.model.layers[1].mlp.down_proj.weight.detach().double()
    # columns of w.T = w0.T M.T stay in the column space of w0.T (128 x 64): no new rank
    assert int(torch.linalg.matrix_rank(torch.cat([w0.T, w.T], dim=1), atol=1e-4)) == int(torch.linalg.matrix_rank(w0.T, atol=1e-4)) == 64
    assert [r.detail["refit"] for r in out.log.records if r.action == "refit"] == ["map"]
    with pytest.raises(LfgraphError, match="refit"):
        calibrated_merge(model, [["model.model.layers.1", "model.model.layers.2"]], ids, refit="half")


def _kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t = torch.log_softmax(teacher(ids), -1)
        return float((t.exp() * (t - torch.log_softmax(student(ids), -1))).sum(-1).mean())


def test_distilled_map_changes_only_the_map_and_lowers_the_kl() -> None:
    """``distill``: after the closed-form map, only the kept block's down projection moves,
    and only by a square map on its output (``W = M W_map``: no new row space); the held-out
    KL to the original falls, the original is untouched and no parametrization is left."""
    from torch.nn.utils import parametrize

    from lfgraph.passes.map_distillation import DistillSettings

    model = CausalLMLogits(tiny_llama(layers=6)).eval()
    before = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    calib, test = torch.randint(0, 128, (16, 24), generator=gen), torch.randint(0, 128, (8, 24), generator=gen)
    run = [f"model.model.layers.{i}" for i in (2, 3, 4)]
    closed = calibrated_merge(model, [run], calib, refit="map").model
    # calibration windows only: these random-token windows are nothing like the random tiny
    # model's own samples, and the unseen windows below are drawn like the calibration ones
    out = calibrated_merge(model, [run], calib, refit="map", distill=DistillSettings(steps=60, lr=3e-3, eval_every=5, sampled_windows=0, trainable="maps"))
    distilled = out.model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the teacher is the caller's model, unchanged
    changed = [k for k, v in distilled.state_dict().items() if not torch.equal(v, closed.state_dict()[k])]
    assert changed == ["model.model.layers.2.mlp.down_proj.weight"]
    w_map = closed.model.model.layers[2].mlp.down_proj.weight.detach().double()
    w = distilled.model.model.layers[2].mlp.down_proj.weight.detach().double()
    assert int(torch.linalg.matrix_rank(torch.cat([w_map.T, w.T], dim=1), atol=1e-4)) == int(torch.linalg.matrix_rank(w_map.T, atol=1e-4))
    assert not parametrize.is_parametrized(distilled.model.model.layers[2].mlp.down_proj)
    assert all(p.requires_grad for p in distilled.parameters())
    (rec,) = [r for r in out.log.records if r.action == "distill"]
    assert rec.detail["kl_best"] < rec.detail["kl_start"] and rec.detail["best_step"] > 0
    # the held-out windows were never trained on; unseen windows improve too
    assert _kl(distilled, model, test) < _kl(closed, model, test)


@pytest.mark.slow
def test_distillation_never_returns_worse_than_its_start() -> None:
    """A learning rate that only hurts: the best state kept is the closed-form start."""
    from lfgraph.passes.map_distillation import DistillSettings

    model = CausalLMLogits(tiny_llama(layers=4)).eval()
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(4))
    run = ["model.model.layers.1", "model.model.layers.2"]
    closed = calibrated_merge(model, [run], ids, refit="map").model
    out = calibrated_merge(model, [run], ids, refit="map", distill=DistillSettings(steps=4, lr=5.0, eval_every=1, extra={"warmup": 0}))
    (rec,) = [r for r in out.log.records if r.action == "distill"]
    assert rec.detail["best_step"] == 0
    for k, v in out.model.state_dict().items():
        torch.testing.assert_close(v, closed.state_dict()[k], rtol=0, atol=0)
    with pytest.raises(LfgraphError, match="at least 2 calibration windows"):
        calibrated_merge(model, [run], ids[:1], refit="map", distill=DistillSettings(steps=2))


def test_sampled_windows_continue_the_prompts_from_the_original() -> None:
    """``sample_windows``: each window keeps its prompt, has the calibration windows' length,
    is reproducible from its seed, and comes from the original's distribution: with a nucleus
    so small that only the top token survives, sampling is the original's greedy decoding."""
    from lfgraph.passes.map_distillation import sample_windows

    model = CausalLMLogits(tiny_llama(layers=2)).eval()
    windows = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    a = sample_windows(model, windows, 5, prompt_tokens=4, seed=1)
    assert a.shape == (5, 12) and a.dtype == windows.dtype
    assert torch.equal(a[:, :4], windows[torch.arange(5) % 3, :4])
    assert torch.equal(a, sample_windows(model, windows, 5, prompt_tokens=4, seed=1))
    assert not torch.equal(a, sample_windows(model, windows, 5, prompt_tokens=4, seed=2))
    greedy = sample_windows(model, windows, 3, prompt_tokens=4, top_p=1e-6)
    seq = windows[:, :4]
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq)
    with pytest.raises(LfgraphError, match="prompt_tokens"):
        sample_windows(model, windows, 2, prompt_tokens=12)
    with pytest.raises(LfgraphError, match="generate"):
        sample_windows(nn.Linear(2, 2), windows, 2, prompt_tokens=4)


def test_sampled_windows_are_cached_by_weights_prompts_and_settings(tmp_path, monkeypatch) -> None:
    """``cache=True``: the second call with the same original, prompts and settings reads the
    windows back without sampling (generate is not called) and gets the same tokens; another
    seed or a changed weight is another entry; a damaged entry is sampled again."""
    from lfgraph.passes import map_distillation as md

    monkeypatch.setenv("LFGRAPH_CACHE", str(tmp_path))
    model = CausalLMLogits(tiny_llama(layers=2)).eval()
    windows = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    a = md.sample_windows(model, windows, 5, prompt_tokens=4, seed=1, cache=True)
    entries = list((tmp_path / "samples").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".pt"
    gen = md._generator(model)
    real_generate = gen.generate
    gen.generate = lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled again"))
    try:
        assert torch.equal(md.sample_windows(model, windows, 5, prompt_tokens=4, seed=1, cache=True), a)
    finally:
        gen.generate = real_generate
    b = md.sample_windows(model, windows, 5, prompt_tokens=4, seed=2, cache=True)
    with torch.no_grad():
        next(gen.parameters()).add_(1e-3)
    c = md.sample_windows(model, windows, 5, prompt_tokens=4, seed=1, cache=True)
    assert len(list((tmp_path / "samples").iterdir())) == 3 and not torch.equal(a, b)
    assert torch.equal(c[:, :4], a[:, :4])
    entries[0].write_bytes(b"damaged")
    with torch.no_grad():
        next(gen.parameters()).sub_(1e-3)
    assert md.sample_windows(model, windows, 5, prompt_tokens=4, seed=1, cache=True).shape == (5, 12)


def test_distillation_trains_on_sampled_windows_and_holds_out_real_ones() -> None:
    """``sampled_windows``: the count is recorded, the held-out windows stay the real ones
    (the starting KL equals a run without samples), and only the map changes."""
    from lfgraph.passes.map_distillation import DistillSettings

    model = CausalLMLogits(tiny_llama(layers=4)).eval()
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(6))
    run = ["model.model.layers.1", "model.model.layers.2"]
    plain = calibrated_merge(model, [run], ids, refit="map", distill=DistillSettings(steps=3, eval_every=1, sampled_windows=0))
    out = calibrated_merge(model, [run], ids, refit="map", distill=DistillSettings(steps=30, lr=3e-3, eval_every=5, sampled_windows=12, prompt_tokens=4, trainable="maps"))
    (a,) = [r for r in plain.log.records if r.action == "distill"]
    (b,) = [r for r in out.log.records if r.action == "distill"]
    assert (a.detail["sampled_windows"], b.detail["sampled_windows"]) == (0, 12)
    assert b.detail["kl_best"] < b.detail["kl_start"]
    assert b.detail["kl_start"] == pytest.approx(a.detail["kl_start"], rel=1e-6)
    closed = calibrated_merge(model, [run], ids, refit="map").model.state_dict()
    changed = [k for k, v in out.model.state_dict().items() if not torch.equal(v, closed[k])]
    assert changed == ["model.model.layers.1.mlp.down_proj.weight"]


def test_neighbor_distillation_trains_the_blocks_around_the_cut_only() -> None:
    """``trainable="neighbors"``: the kept block and the block right after the cut train with
    the map, nothing else moves; the held-out KL falls; an unknown trainable set, and
    neighbours asked for but not given, are one clear error each."""
    from lfgraph.passes.map_distillation import DistillSettings, distill_maps

    model = CausalLMLogits(tiny_llama(layers=6)).eval()
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(7))
    run = [f"model.model.layers.{i}" for i in (2, 3, 4)]
    closed = calibrated_merge(model, [run], ids, refit="map").model
    out = calibrated_merge(model, [run], ids, refit="map",
                           distill=DistillSettings(steps=20, lr=1e-3, eval_every=5, sampled_windows=0, trainable="neighbors"))
    changed = {k for k, v in out.model.state_dict().items() if not torch.equal(v, closed.state_dict()[k])}
    # merged stack: 0, 1, 2 (kept, holds the map), 3 (old block 5, right after the cut)
    assert changed and all(k.startswith(("model.model.layers.2.", "model.model.layers.3.")) for k in changed)
    assert any(k.startswith("model.model.layers.3.") for k in changed)
    assert "model.model.layers.2.mlp.down_proj.weight" in changed
    (rec,) = [r for r in out.log.records if r.action == "distill"]
    assert rec.detail["trainable"] == "neighbors" and rec.detail["kl_best"] < rec.detail["kl_start"]
    with pytest.raises(LfgraphError, match="trainable"):
        calibrated_merge(model, [run], ids, refit="map", distill=DistillSettings(steps=2, trainable="everything"))
    student = copy.deepcopy(closed)
    with pytest.raises(LfgraphError, match="neighbors"):
        distill_maps(student, model, [student.model.model.layers[2].mlp.down_proj], ids, DistillSettings(steps=2, trainable="neighbors"))


def test_blocks_to_train_names_each_set_in_stack_order() -> None:
    """``neighbors``: the kept block and the first surviving block after each run (none
    after a run at the top); ``blocks``: every surviving block; ``maps``: none."""
    from lfgraph.passes.calibrated_fusion import blocks_to_train

    stack = [nn.Identity() for _ in range(10)]
    runs, keeps = [[2, 3, 4], [6, 7], [8, 9]], [2, 6, 8]
    index = {id(b): i for i, b in enumerate(stack)}
    names = lambda trainable: [index[id(b)] for b in blocks_to_train(stack, keeps, runs, trainable)]  # noqa: E731
    assert names("maps") == []
    assert names("neighbors") == [2, 5, 6, 8]
    assert names("blocks") == [0, 1, 2, 5, 6, 8]


def test_block_distillation_trains_every_block_and_nothing_outside_the_stack() -> None:
    """``trainable="blocks"``: blocks below and above the cut may move, the embeddings, final
    norm and head stay; the held-out KL falls; the default learning rate is the lower one."""
    from lfgraph.passes.map_distillation import DEFAULT_LR, DistillSettings

    model = CausalLMLogits(tiny_llama(layers=6)).eval()
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(7))
    run = [f"model.model.layers.{i}" for i in (2, 3, 4)]
    closed = calibrated_merge(model, [run], ids, refit="map").model.state_dict()
    settings = DistillSettings(steps=20, lr=3e-4, eval_every=5, sampled_windows=0, trainable="blocks")
    out = calibrated_merge(model, [run], ids, refit="map", distill=settings)
    changed = {k for k, v in out.model.state_dict().items() if not torch.equal(v, closed[k])}
    assert {k.split(".")[3] for k in changed} == {"0", "1", "2", "3"}  # every block of the merged stack
    assert all(k.startswith("model.model.layers.") for k in changed)
    (rec,) = [r for r in out.log.records if r.action == "distill"]
    assert rec.detail["trainable"] == "blocks" and rec.detail["kl_best"] < rec.detail["kl_start"]
    assert DistillSettings(trainable="blocks").learning_rate == DEFAULT_LR["blocks"] < DistillSettings().learning_rate


def _ridge_problem(d: int = 120, o: int = 16, n: int = 90, nv: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.1
    W0 = torch.randn(o, d, generator=g, dtype=torch.float64) * 0.1
    T = torch.randn(d, o, generator=g, dtype=torch.float64) * 0.1
    Z, Zv = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix, torch.randn(nv, d, generator=g, dtype=torch.float64) @ mix
    Y, Yv = Z @ T + torch.randn(n, o, generator=g, dtype=torch.float64), Zv @ T + torch.randn(nv, o, generator=g, dtype=torch.float64)
    w, wv = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(nv, generator=g, dtype=torch.float64)
    return W0, (Z, Y, w), (Zv, Yv, wv)


def _textbook(G: torch.Tensor, C: torch.Tensor, W0: torch.Tensor, s: float) -> torch.Tensor:
    """``W = (C + lam W0)(G + lam I)^-1`` with ``lam = s * trace(G) / dim``, solved plainly."""
    lam = s * float(G.diagonal().mean())
    return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), (C + lam * W0).T).T


@pytest.mark.parametrize("fit_rows", [False, True], ids=["primal", "dual"])
def test_ridge_solve_and_strength_search_equal_the_textbook_formula(fit_rows: bool) -> None:
    """The in-place primal solve (fit as a Gram matrix) and the dual solve (fewer fitting
    tokens than inputs: fit as rows, n x n kernels, no in x in matrix), the held-out set kept
    as rows, the in-place sum of the statistics and the golden-section strength search give
    what the textbook formulas give: ``W = (C + lam W0)(G + lam I)^-1`` with explicit Gram
    matrices, every strength tried."""
    from lfgraph.passes.calibrated_fusion import DEFAULT_LAMBDAS, _solution_loss, choose_strength

    W0, (Z, Y, w), (Zv, Yv, wv) = _ridge_problem(d=120, n=90, nv=25) if fit_rows else _ridge_problem()
    d, o = Z.shape[1], Y.shape[1]
    fit, val = RidgeStats.zeros(d, o, rows=fit_rows, ref=W0), RidgeStats.zeros(d, o, rows=True, ref=W0)
    fit.add(Z, Y, w)
    val.add(Zv, Yv, wv)
    assert val.is_rows and fit.is_rows == fit_rows
    G, C = (Z * w[:, None]).T @ Z, Y.T @ (Z * w[:, None])
    Gv, Cv, Sv = (Zv * wv[:, None]).T @ Zv, Yv.T @ (Zv * wv[:, None]), float(((Yv * Yv).sum(1) * wv).sum())
    rtol = 1e-8 if fit_rows else 1e-10
    losses = {}
    for s in DEFAULT_LAMBDAS:
        W = _textbook(G, C, W0, s)
        torch.testing.assert_close(ridge_solve(fit, W0, s), W, rtol=rtol, atol=1e-10)
        losses[s] = float((W @ Gv * W).sum() - 2 * (W * Cv).sum() + Sv)
    best = min(losses, key=lambda s: (losses[s], -s))
    for search in ("grid", "golden"):
        s, seen = choose_strength(fit, val, W0, DEFAULT_LAMBDAS, search=search)
        assert s == best
        for k, v in seen.items():
            assert v == pytest.approx(losses[k], rel=rtol)
    assert len(choose_strength(fit, val, W0, DEFAULT_LAMBDAS)[1]) < len(DEFAULT_LAMBDAS)
    # the final fit on everything: held-out statistics added into the fit's in place
    G_all, C_all = G + Gv, C + Cv
    everything = fit.absorb(val)
    if fit_rows:  # 115 tokens, still fewer than the 120 inputs: still rows, no Gram matrix
        assert everything.is_rows and everything.G is None
    else:
        assert everything.G.data_ptr() == fit.G.data_ptr()
        torch.testing.assert_close(everything.G, G_all, rtol=1e-12, atol=1e-12)
    W = ridge_solve(everything, W0, best)
    torch.testing.assert_close(W, _textbook(G_all, C_all, W0, best), rtol=rtol, atol=1e-10)
    S_all = float(((Y * Y).sum(1) * w).sum()) + Sv
    full_loss = float((W @ G_all * W).sum() - 2 * (W * C_all).sum() + S_all)
    assert _solution_loss(everything, W0, W, best) == pytest.approx(full_loss, rel=1e-8)
    assert everything.ref_loss == pytest.approx(float((W0 @ G_all * W0).sum() - 2 * (W0 * C_all).sum() + S_all), rel=1e-10)
    if fit_rows:  # strength 0 with fewer tokens than inputs: the minimum-norm change that fits exactly
        torch.testing.assert_close(everything.Z @ ridge_solve(everything, W0, 0.0).T, everything.Y, rtol=1e-6, atol=1e-6)


def test_golden_search_falls_back_to_the_grid_when_not_unimodal() -> None:
    """A held-out loss with dips over the grid: where the points the walk evaluates are not
    falling-then-rising it tries every strength, so it returns the full grid's choice. (A
    bump that falls between the points it evaluates is not seen: the walk is exact for
    unimodal curves only.)"""
    from lfgraph.passes import calibrated_fusion as cf

    curve = {1e-3: 1.0, 3e-3: 5.0, 1e-2: 4.0, 3e-2: 3.0, 1e-1: 3.5, 3e-1: 2.5, 1.0: 2.8, 3.0: 4.0, 10.0: 5.0}
    original = cf._heldout_loss
    cf._heldout_loss = lambda fit, G, C, val, W0, s, work: curve[s]  # type: ignore[assignment]
    try:
        stats = RidgeStats.zeros(3, 2)
        val = RidgeStats.zeros(3, 2, rows=True)
        val.add(torch.randn(2, 3), torch.randn(2, 2))
        s, seen = cf.choose_strength(stats, val, torch.zeros(2, 3), cf.DEFAULT_LAMBDAS)
    finally:
        cf._heldout_loss = original
    assert s == 1e-3 and len(seen) == len(curve)


def test_rows_turn_into_a_gram_matrix_when_larger() -> None:
    stats = RidgeStats.zeros(5, 2, rows=True)
    stats.add(torch.randn(4, 5), torch.randn(4, 2))
    assert stats.is_rows
    stats.add(torch.randn(3, 5), torch.randn(3, 2))
    assert not stats.is_rows and stats.n == 7 and stats.G.shape == (5, 5)
