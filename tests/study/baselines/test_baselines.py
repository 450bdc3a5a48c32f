"""Comparison methods: exact compression amounts, trusted second computations, no mutation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lfgraph_study.baselines import BASELINES, compress_baseline, compressible_layers, compression_stats, layer_weight_count
from lfgraph_study.baselines.dae import fit_dae
from lfgraph_study.baselines.pruning import lowest_magnitude_mask
from lfgraph_study.baselines.quantization import kmeans_1d
from lfgraph_study.baselines.svd import low_rank_layer, rank_for
from lfgraph.errors import LfgraphError
from lfgraph_study.zoo import MLP, ResNetCNN, randomize_batchnorm

torch.set_num_threads(1)


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(16, 32, 3, 4).eval()  # Linear layers 16x32, 32x32, 32x32, 32x4


def cnn() -> ResNetCNN:
    torch.manual_seed(0)
    return randomize_batchnorm(ResNetCNN(stages=((8, 2), (16, 2)))).eval()


def images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [ref.module.weight.detach() for ref in compressible_layers(model)]


@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.9])
def test_prune_layer_exact_fraction_in_every_layer(fraction: float) -> None:
    model = mlp()
    out = compress_baseline(model, "prune-layer", fraction)
    for before, after in zip(weights(model), weights(out)):
        assert int((after == 0).sum()) == round(fraction * before.numel())
        kept = after != 0
        assert torch.equal(after[kept], before[kept])
        assert float(before[~kept].abs().max()) <= float(before[kept].abs().min())


@pytest.mark.parametrize("fraction", [0.2, 0.55])
def test_prune_global_exact_fraction_across_layers(fraction: float) -> None:
    model = mlp()
    out = compress_baseline(model, "prune-global", fraction)
    before = torch.cat([w.flatten() for w in weights(model)])
    after = torch.cat([w.flatten() for w in weights(out)])
    assert int((after == 0).sum()) == round(fraction * before.numel())
    assert float(before[after == 0].abs().max()) <= float(before[after != 0].abs().min())
    per_layer = [float((w == 0).float().mean()) for w in weights(out)]
    assert max(per_layer) - min(per_layer) > 0.01  # not uniform, unlike prune-layer
    assert compression_stats(out)["achieved"] == pytest.approx(fraction, abs=1e-3)


def test_lowest_magnitude_mask_breaks_ties_exactly() -> None:
    values = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 2.0])
    mask = lowest_magnitude_mask(values, 2)
    assert mask.tolist() == [True, False, True, False, False, False]
    assert int(lowest_magnitude_mask(values, 4).sum()) == 4


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_kmeans_distinct_values_per_layer(fraction: float) -> None:
    model = mlp()
    out = compress_baseline(model, "kmeans", fraction)
    for before, after in zip(weights(model), weights(out)):
        k = max(1, round((1 - fraction) * before.numel()))
        assert torch.unique(after).numel() == k
        # every weight sits on its nearest centroid (a Lloyd fixed point in 1-D)
        centroids = torch.unique(after)
        nearest = centroids[(before.flatten()[:, None] - centroids[None, :]).abs().argmin(1)]
        assert torch.allclose(nearest, after.flatten())


def test_kmeans_1d_matches_scipy() -> None:
    from scipy.cluster.vq import kmeans2

    x = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    q, centroids = kmeans_1d(x, 6, iters=200)
    ours = float(((q - x) ** 2).sum())
    book, labels = kmeans2(x.double().numpy(), 6, minit="++", seed=0, iter=200)
    theirs = float(((book[labels].ravel() - x.double().numpy()) ** 2).sum())
    assert centroids.numel() == 6
    assert ours <= theirs * 1.01  # both are Lloyd local optima


def test_svd_rank_and_parameter_count() -> None:
    model = mlp()
    fraction = 0.5
    out = compress_baseline(model, "svd", fraction)
    for ref_before in compressible_layers(model):
        replaced = out.get_submodule(ref_before.path)
        w = ref_before.module.weight
        r = rank_for(ref_before.module, fraction)
        assert r == int((1 - fraction) * w.shape[0] * w.shape[1] // sum(w.shape))
        if r >= min(w.shape):
            assert isinstance(replaced, nn.Linear)  # would not shrink: left alone
            continue
        assert isinstance(replaced, nn.Sequential)
        assert replaced[0].weight.shape == (r, w.shape[1]) and replaced[1].weight.shape == (w.shape[0], r)
        assert replaced[0].weight.numel() + replaced[1].weight.numel() <= (1 - fraction) * w.numel()
        assert torch.linalg.matrix_rank(replaced[1].weight @ replaced[0].weight) == r
    x = torch.randn(5, 16)
    assert out(x).shape == model(x).shape


def test_full_rank_svd_reproduces_linear_conv_and_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    torch.testing.assert_close(low_rank_layer(lin, 7)(x := torch.randn(3, 12)), lin(x), atol=1e-5, rtol=1e-5)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    img = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(low_rank_layer(conv, 6)(img), conv(img), atol=1e-5, rtol=1e-5)
    c1 = Conv1D(5, 8)  # (in=8, out=5)
    nn.init.normal_(c1.weight)
    seq = torch.randn(2, 3, 8)
    torch.testing.assert_close(low_rank_layer(c1, 5)(seq), c1(seq), atol=1e-5, rtol=1e-5)
    # a truncated rank is the best rank-r approximation (Eckart-Young), up to the
    # randomized range finder's error
    w = lin.weight.detach().double()
    s = torch.linalg.svdvals(w)
    two = low_rank_layer(lin, 3)
    err = torch.linalg.matrix_norm(two[1].weight.detach().double() @ two[0].weight.detach().double() - w)
    assert float(err) == pytest.approx(float(s[3:].square().sum().sqrt()), rel=1e-4)
    with pytest.raises(LfgraphError, match="out of range"):
        low_rank_layer(lin, 8)


def test_dae_rollout_shrinks_a_cnn_and_keeps_shapes() -> None:
    model = cnn()
    x = images()
    out = compress_baseline(model, "dae", 0.4, data=[x[:4], (x[4:], torch.zeros(4))])
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    assert layer_weight_count(out) < layer_weight_count(model)
    with torch.no_grad():
        y, y0 = out(x), model(x)
    assert y.shape == y0.shape and torch.isfinite(y).all()
    assert compression_stats(out)["achieved"] >= 0.4 - 0.05


def test_dae_with_activation_runs() -> None:
    model = mlp()
    x = torch.randn(64, 16)
    out = compress_baseline(model, "dae", 0.5, data=[x], activation="tanh", steps=20)
    assert out(x).shape == (64, 4)
    assert any(isinstance(m, nn.Tanh) for m in out.modules() if m not in set(model.modules()))


def test_dae_closed_form_is_pca_without_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    enc_w, enc_b, dec_w, dec_b = fit_dae(x, 2, noise=0.0)
    recon = (x @ enc_w.t() + enc_b) @ dec_w.t() + dec_b
    xc = (x - x.mean(0)).double()
    trailing = torch.linalg.eigvalsh(xc.t() @ xc / 500)[:-2].sum()
    assert float(((recon - x) ** 2).sum(1).mean()) == pytest.approx(float(trailing), rel=1e-4)
    # noise makes the map shrink towards the mean (ridge), never worse in expectation
    enc_n, bias_n, dec_n, dbias_n = fit_dae(x, 2, noise=0.5)
    assert float((enc_n @ dec_n).diagonal().sum()) < float((enc_w @ dec_w).diagonal().sum())


def test_dae_needs_data() -> None:
    with pytest.raises(LfgraphError, match="data"):
        compress_baseline(mlp(), "dae", 0.3)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_input_model_is_never_modified(method: str) -> None:
    model = cnn()
    snapshot = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    x = images(4)
    out = compress_baseline(model, method, 0.3, data=[x])
    assert out is not model
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    with torch.no_grad():
        assert out(x).shape == (4, 10)


def test_tied_embedding_head_is_left_alone() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    model = TinyLM()
    assert [r.path for r in compressible_layers(model)] == ["mid"]
    out = compress_baseline(model, "prune-global", 0.5)
    assert torch.equal(out.emb.weight, model.emb.weight)
    assert int((out.mid.weight == 0).sum()) == 32


def test_user_errors_list_the_choices() -> None:
    with pytest.raises(LfgraphError, match="unknown comparison method 'prune'.*dae.*kmeans.*prune-global"):
        compress_baseline(mlp(), "prune", 0.3)
    with pytest.raises(LfgraphError, match="fraction"):
        compress_baseline(mlp(), "svd", 1.0)
    with pytest.raises(LfgraphError, match="does not take"):
        compress_baseline(mlp(), "svd", 0.3, iters=3)
    with pytest.raises(LfgraphError, match="activation"):
        compress_baseline(mlp(), "dae", 0.3, data=[torch.randn(4, 16)], activation="swish")
    assert np.isfinite(compression_stats(compress_baseline(mlp(), "kmeans", 0.0))["achieved"])
