"""Every method through the common interface, each checked for what it promises on a tiny
model, by a second computation that does not reuse the method's code path."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lfgraph_study import zoo
from lfgraph_study.baselines import METHODS, compressible_layers, run_method
from lfgraph_study.baselines.laco import laco, released_merge
from lfgraph_study.baselines.linearpatch import PatchedBlock, hadamard_rotation
from lfgraph_study.baselines.replaceme import cut_activations, lstsq_map
from lfgraph_study.baselines.svd import rank_for
from lfgraph.errors import LfgraphError
from lfgraph.models import CausalLMLogits
from lfgraph.passes.block_stack import remove_blocks
from lfgraph.passes.calibrated_fusion import calibrated_merge

STACK = "model.model.layers"


def lm(layers: int = 6, seed: int = 0) -> CausalLMLogits:
    return CausalLMLogits(zoo.tiny_llama(layers=layers, seed=seed)).eval()


def ids(n: int = 8, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def layer_states(model: CausalLMLogits, x: torch.Tensor) -> list[torch.Tensor]:
    """Input of every decoder layer plus the last layer's output, from Hugging Face's own
    ``output_hidden_states`` (its last entry is after the final norm, so the last layer's
    output comes from a forward hook instead)."""
    got = []
    h = model.model.model.layers[-1].register_forward_hook(lambda _m, _a, out: got.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hs = model.model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    h.remove()
    return [*hs[:-1], got[0]]


def nll(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(x)[:, :-1]
    return float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))


def test_registry_has_every_method_and_refuses_unknown() -> None:
    expected = {"prune-layer", "prune-global", "kmeans", "svd", "dae", "shortgpt", "gromov", "sleb", "laco",
                "replaceme-lstsq", "replaceme-cosine", "linearpatch", "lfgraph", "lfgraph-angular"}
    assert expected <= set(METHODS)
    with pytest.raises(LfgraphError, match="unknown method"):
        run_method("nope", lm(), 0.2, ids())
    with pytest.raises(LfgraphError, match="calibration"):
        run_method("shortgpt", lm(), 0.2, None)


@pytest.mark.parametrize("name", ["shortgpt", "gromov", "sleb", "laco", "laco-released", "replaceme-lstsq", "replaceme-cosine", "linearpatch", "lfgraph", "lfgraph-angular"])
def test_depth_methods_remove_the_target_and_leave_the_input_alone(name: str) -> None:
    model, x = lm(), ids()
    before = copy.deepcopy(model.state_dict())
    res = run_method(name, model, 0.34, x, **({"steps": 5} if name == "replaceme-cosine" else {}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(res.model.get_submodule(STACK)) == 4 and len(res.removed) == 2
    assert res.depth_fraction == pytest.approx(2 / 6)
    per_block = sum(r.weight_count for r in compressible_layers(model) if r.path.startswith(STACK + ".0."))
    extra = 64 * 64 if name == "linearpatch" else 0  # the patch's weights count against it
    total = sum(r.weight_count for r in compressible_layers(model))
    assert res.weight_fraction == pytest.approx((2 * per_block - extra) / total)
    assert res.seconds > 0
    assert res.model(x[:1]).shape == (1, 32, 128)
    assert res.model.model.config.num_hidden_layers == 4


def test_global_pruning_hits_the_exact_sparsity() -> None:
    model = lm()
    res = run_method("prune-global", model, 0.37)
    w = torch.cat([r.module.weight.detach().flatten() for r in compressible_layers(res.model)])
    assert int((w == 0).sum()) == round(0.37 * w.numel())
    assert res.weight_fraction == pytest.approx(0.37, abs=1e-6) and res.depth_fraction == 0.0


def test_svd_reaches_the_rank_for_the_target() -> None:
    model = lm(layers=2)
    res = run_method("svd", model, 0.5)
    for ref in compressible_layers(model):
        new = res.model.get_submodule(ref.path)
        product = new[1].weight.detach().double() @ new[0].weight.detach().double()
        assert int(torch.linalg.matrix_rank(product)) == rank_for(ref.module, 0.5)


def test_shortgpt_removes_the_lowest_block_influence() -> None:
    model, x = lm(), ids()
    states = layer_states(model, x)
    bi = [float((1 - torch.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)).mean()) for i in range(6)]
    res = run_method("shortgpt", model, 0.17, x)  # one block
    assert res.removed == [f"{STACK}.{int(np.argmin(bi))}"]


def test_gromov_removes_the_closest_contiguous_block() -> None:
    model, x = lm(), ids()
    states = layer_states(model, x)
    dist = [float((torch.arccos(torch.cosine_similarity(states[l].double(), states[l + 2].double(), dim=-1).clamp(-1, 1)) / math.pi).mean()) for l in range(5)]
    best = int(np.argmin(dist))
    assert run_method("gromov", model, 0.34, x).removed == [f"{STACK}.{best}", f"{STACK}.{best + 1}"]


def test_sleb_removes_the_block_whose_removal_costs_least() -> None:
    model, x = lm(), ids(4, 16)
    costs = []
    for i in range(6):
        m = copy.deepcopy(model)
        remove_blocks(m, [f"{STACK}.{i}"])
        costs.append(nll(m, x))
    res = run_method("sleb", model, 0.17, x, max_windows=4, max_tokens=16)
    assert res.removed == [f"{STACK}.{int(np.argmin(costs))}"]


def test_laco_merged_weights_equal_its_formula() -> None:
    model, x = lm(), ids()
    orig = [dict(b.named_parameters()) for b in model.model.model.layers]
    work = copy.deepcopy(model)
    # threshold -1 accepts the first merge tried: C = 3 layers from the top (3, 4, 5 into 3)
    out, removed, details = laco(work, 0.34, x, merge_layers=3, threshold=-1.0)
    assert removed == [f"{STACK}.4", f"{STACK}.5"] and details["merges"][0]["into"] == 3
    merged = dict(out.model.model.layers[3].named_parameters())
    for k, v in merged.items():
        expected = orig[3][k] + (orig[4][k] - orig[3][k]) + (orig[5][k] - orig[3][k])
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    for i in range(3):  # layers below are untouched
        assert all(torch.equal(p, orig[i][k]) for k, p in out.model.model.layers[i].named_parameters())


def test_laco_released_rule_keeps_the_last_projections_and_the_first_norms() -> None:
    """The released code adds ``W_{l+k} − W_l`` to the already-updated copy, so each
    projection ends as the last merged layer's; norms are not merged."""
    model, x = lm(), ids()
    orig = [dict(b.named_parameters()) for b in model.model.model.layers]
    out, removed, details = laco(copy.deepcopy(model), 0.34, x, merge_layers=3, threshold=-1.0, rule="released")
    assert removed == [f"{STACK}.4", f"{STACK}.5"] and details["rule"] == "released"
    merged = dict(out.model.model.layers[3].named_parameters())
    projections = [k for k in merged if k.endswith("_proj.weight")]
    assert len(projections) == 7
    for k, v in merged.items():
        torch.testing.assert_close(v, orig[5][k] if k in projections else orig[3][k], rtol=0, atol=1e-6)
    with pytest.raises(LfgraphError, match="LaCo rule"):
        laco(copy.deepcopy(model), 0.34, x, rule="nope")
    # a block without Llama-style projections: refused, not silently reduced to deletion
    with pytest.raises(LfgraphError, match="laco-released merges Llama-style projections"):
        released_merge([nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))])


def test_replaceme_map_is_the_least_squares_solution_and_is_folded() -> None:
    model, x = lm(), ids(16, 32)  # 512 tokens > 64 features: a unique solution
    res = run_method("replaceme-lstsq", model, 0.34, x)
    start = res.details["start"]
    act = cut_activations(model, STACK, start, 2, x)
    T_np = np.linalg.lstsq(act.A.double().numpy(), (act.Y - act.X + act.A).double().numpy(), rcond=None)[0]
    T = lstsq_map(act.A, act.B)
    np.testing.assert_allclose(T.numpy(), T_np, atol=1e-8, rtol=1e-6)
    W0 = model.model.model.layers[start - 1].mlp.down_proj.weight.detach().double()
    W = res.model.model.model.layers[start - 1].mlp.down_proj.weight.detach().double()
    torch.testing.assert_close(W, (torch.tensor(T_np).T @ W0), atol=1e-5, rtol=1e-4)
    # the compressed layer before the cut now outputs X - A + A T
    states = layer_states(res.model, x)
    torch.testing.assert_close(states[start].reshape(-1, 64).double(), (act.X - act.A).double() + act.A.double() @ torch.tensor(T_np), atol=2e-4, rtol=1e-3)


def test_replaceme_cosine_lowers_the_cosine_distance() -> None:
    model, x = lm(), ids()
    res = run_method("replaceme-cosine", model, 0.34, x, steps=60, lr=1e-3)
    first, last = res.details["cosine_loss"]
    assert last < first


def test_lfgraph_map_refit_without_ridge_is_replacemes_least_squares() -> None:
    """lfgraph's calibrated rule restricted to a d x d map on the kept block's MLP output,
    with no ridge and no token weighting, solves ReplaceMe's least-squares problem."""
    model, x = lm(), ids(16, 32)
    start = 3
    act = cut_activations(model, STACK, start, 2, x)
    T = lstsq_map(act.A, act.B)
    W0 = model.model.model.layers[start - 1].mlp.down_proj.weight.detach().double()
    run = [f"{STACK}.{i}" for i in range(start - 1, start + 2)]
    out = calibrated_merge(model, [run], x, keep="first", refit="map", strengths=(1e-12,), token_weighting="none", val_fraction=0.0).model
    W = out.model.model.layers[start - 1].mlp.down_proj.weight.detach().double()
    torch.testing.assert_close(W, T.T @ W0, atol=1e-4, rtol=1e-3)


def test_linearpatch_rotation_is_orthonormal_and_patch_fits_better_than_nothing() -> None:
    H = hadamard_rotation(96)  # 96 = 3 x 32: block-diagonal Hadamard
    torch.testing.assert_close(H @ H.T, torch.eye(96, dtype=H.dtype), atol=1e-12, rtol=0)
    model, x = lm(), ids()
    res = run_method("linearpatch", model, 0.34, x)
    start = res.details["start"]
    layers = res.model.model.model.layers
    patched = layers[start] if start < len(layers) else layers[start - 1]
    assert isinstance(patched, PatchedBlock)
    act = cut_activations(model, STACK, start, 2, x)
    P = patched.patch.weight.detach()
    err_patch = ((act.X @ P.T - act.Y) ** 2).sum()
    err_none = ((act.X - act.Y) ** 2).sum()
    assert err_patch < err_none
