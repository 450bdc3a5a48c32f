"""PyTorch rewrites: tie, merge (remove / mean / aligned mean), neuron alignment."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lfgraph.errors import LfgraphError
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.models import CausalLMLogits, EncoderHidden
from lfgraph.passes.block_stack import remove_blocks
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan, permute_block_in_place, unique_parameter_count
from lfgraph.plan import Fusion, FusionPlan

import tiny_models as zoo

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
IMG = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

MODELS = {
    "llama": (lambda: CausalLMLogits(zoo.tiny_llama(layers=5)), IDS),
    "gpt2": (lambda: CausalLMLogits(zoo.tiny_gpt2(layers=5)), IDS),
    "bert": (lambda: EncoderHidden(zoo.tiny_bert(layers=5)), IDS),
    "cnn": (lambda: zoo.randomize_batchnorm(zoo.ResNetCNN(stages=((8, 4),))), IMG),
}


def _plan(graph, fusions, mode="merge", fuse="mean"):
    return FusionPlan(fusions=fusions, mode=mode, fuse=fuse, provenance={"model_fingerprint": graph.fingerprint()})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tie_drops_unique_parameters_exactly_as_planned(name):
    build, x = MODELS[name]
    model = build()
    before = copy.deepcopy(model.state_dict())
    g = build_layer_graph(model, (x,))
    plan = make_plan(g, target=0.1, target_kind="params", scope="global", mode="tie")
    result = apply_plan(model, g, plan)
    saved = sum(g.node(a).num_params for f in plan.fusions for a in f.absorb)
    assert unique_parameter_count(model) - unique_parameter_count(result.model) == saved
    for f in plan.fusions:  # every fused set shares ONE parameter object
        params = {id(result.model.get_submodule(g.node(n).ref).weight) for n in [f.keep, *f.absorb]}
        assert len(params) == 1
    assert result.model(x).shape == model(x).shape
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    assert result.log.count("tie") == sum(len(f.absorb) for f in plan.fusions)


def test_tie_of_identical_layers_is_exact():
    model = zoo.MLP()
    with torch.no_grad():
        model.net[4].weight.copy_(model.net[2].weight)
        model.net[4].bias.copy_(model.net[2].bias)
    x = torch.randn(4, 16)
    g = build_layer_graph(model, (x,))
    plan = _plan(g, [Fusion(keep="net.2", absorb=["net.4"], unit="layer", align=False)], mode="tie")
    tied = apply_plan(model, g, plan).model
    assert tied.net[2].weight is tied.net[4].weight
    assert torch.equal(tied(x), model(x))


def test_tying_a_tied_layer_again_joins_the_tie_sets():
    """A second tie (as in iterative compression) must not untie the first one's partners:
    the three layers end up sharing one weight, the mean of the three original ones."""
    model = zoo.MLP()
    x = torch.randn(4, 16)
    originals = [model.net[i].weight.detach().clone() for i in (2, 4, 6)]
    g = build_layer_graph(model, (x,))
    first = apply_plan(model, g, _plan(g, [Fusion(keep="net.2", absorb=["net.4"], unit="layer", align=False)], mode="tie")).model
    second = apply_plan(first, g, _plan(g, [Fusion(keep="net.2", absorb=["net.6"], unit="layer", align=False)], mode="tie")).model
    assert second.net[2].weight is second.net[4].weight is second.net[6].weight
    assert torch.allclose(second.net[2].weight, torch.stack(originals).mean(0), atol=1e-6)
    assert unique_parameter_count(model) - unique_parameter_count(second) == 2 * (32 * 32 + 32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merge_remove_equals_deleting_the_blocks(name):
    build, x = MODELS[name]
    model = build()
    g = build_layer_graph(model, (x,))
    names = [b.name for b in g.removable_blocks()]
    plan = _plan(g, [Fusion(keep=names[1], absorb=[names[2]], unit="block")], fuse="remove")
    merged = apply_plan(model, g, plan).model
    manual = copy.deepcopy(model)
    remove_blocks(manual, [names[2]])
    container = names[0].rpartition(".")[0]
    assert len(merged.get_submodule(container)) == len(g.blocks) - 1
    torch.testing.assert_close(merged(x), manual(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merge_mean_makes_the_model_shallower_and_runs(name):
    build, x = MODELS[name]
    model = build()
    g = build_layer_graph(model, (x,))
    plan = make_plan(g, target=0.4, mode="merge", scope="adjacent")
    result = apply_plan(model, g, plan)
    n_removed = sum(len(f.absorb) for f in plan.fusions)
    container = g.blocks[0].name.rpartition(".")[0]
    assert len(result.model.get_submodule(container)) == len(g.blocks) - n_removed
    assert result.log.count("remove") == n_removed
    out = result.model(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()


def test_merge_keeps_hf_config_consistent():
    model = CausalLMLogits(zoo.tiny_llama(layers=5))
    g = build_layer_graph(model, (IDS,))
    plan = make_plan(g, target=0.4, mode="merge")
    merged = apply_plan(model, g, plan).model
    cfg = merged.model.config
    assert cfg.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in merged.model.model.layers] == [0, 1, 2]
    assert model.model.config.num_hidden_layers == 5  # the input's config is untouched


def test_merging_a_projection_block_is_refused():
    model = zoo.ResNetCNN()
    g = build_layer_graph(model, (IMG,))
    proj = next(b for b in g.blocks if b.skip == "projection")
    same_kind = next(b for b in g.blocks if b.index == proj.index - 1)
    plan = _plan(g, [Fusion(keep=same_kind.name, absorb=[proj.name], unit="block")], fuse="remove")
    with pytest.raises(LfgraphError, match="projection skip"):
        apply_plan(model, g, plan)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_permuting_hidden_units_leaves_the_block_function_unchanged(name):
    build, x = MODELS[name]
    model = build()
    g = build_layer_graph(model, (x,))
    block = g.removable_blocks()[0]
    assert block.hidden, "every test model has a permutable hidden space"
    space = block.hidden[0]
    perm = np.random.default_rng(0).permutation(space.size)
    permuted = copy.deepcopy(model)
    permute_block_in_place(permuted.get_submodule(block.name), space, perm)
    assert not torch.equal(
        permuted.get_submodule(block.name).state_dict()[space.tensors[0][0]],
        model.get_submodule(block.name).state_dict()[space.tensors[0][0]],
    )
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_aligned_fusion_with_a_permuted_copy_gives_the_block_back(name):
    build, x = MODELS[name]
    model = build()
    g0 = build_layer_graph(model, (x,))
    a, b = g0.removable_blocks()[0], g0.removable_blocks()[1]
    # make block b a hidden-unit permutation of block a
    with torch.no_grad():
        model.get_submodule(b.name).load_state_dict(model.get_submodule(a.name).state_dict())
    permute_block_in_place(model.get_submodule(b.name), a.hidden[0], np.random.default_rng(1).permutation(a.hidden[0].size))
    g = build_layer_graph(model, (x,))
    want = copy.deepcopy(model.get_submodule(a.name).state_dict())
    for align, exact in ((True, True), (False, False)):
        plan = _plan(g, [Fusion(keep=a.name, absorb=[b.name], unit="block", align=align)])
        merged = apply_plan(model, g, plan).model
        got = merged.get_submodule(a.name).state_dict()
        same = all(torch.allclose(got[k].float(), want[k].float(), atol=1e-6) for k in want)
        assert same is exact
