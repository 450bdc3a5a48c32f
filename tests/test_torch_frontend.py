"""The torch.export frontend: layers, groups, blocks, skip kinds and hidden spaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lfgraph.errors import UnsupportedModelError
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.models import CausalLMLogits, EncoderHidden

import tiny_models as zoo

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_mlp_has_one_group_and_no_blocks():
    g = build_layer_graph(zoo.MLP(), (torch.randn(2, 16),))
    assert len(g.nodes) == 5
    groups = g.groups()
    assert list(groups) == ["linear:net.*:32x32"]
    assert [n.name for n in groups["linear:net.*:32x32"]] == ["net.2", "net.4", "net.6"]
    assert g.blocks == []


def test_resnet_blocks_skip_kinds_and_hidden_spaces():
    model = zoo.randomize_batchnorm(zoo.ResNetCNN())
    g = build_layer_graph(model, (torch.randn(1, 3, 32, 32),))
    assert [b.name for b in g.blocks] == [f"blocks.{i}" for i in range(6)]
    # the first block of the second stage downsamples through a 1x1 projection
    assert [b.skip for b in g.blocks] == ["identity"] * 3 + ["projection"] + ["identity"] * 2
    assert g.node("blocks.3.downsample.0").role == "downsample.0"
    space = g.blocks[0].hidden[0]
    assert space.size == 16
    assert dict(space.tensors) == {"conv1.weight": 0, "bn1.weight": 0, "bn1.bias": 0, "bn1.running_mean": 0,
                                   "bn1.running_var": 0, "conv2.weight": 1}
    assert g.node("blocks.0.conv1").family == "convolutional"


def test_wide_resnet_is_wider_and_shallower_with_tieable_groups():
    model = zoo.wide_resnet(widen=2, blocks=2)
    g = build_layer_graph(model, (torch.randn(1, 3, 16, 16),))
    assert [b.skip for b in g.blocks] == ["identity", "identity", "projection", "identity"]
    assert g.blocks[0].hidden[0].size == 32 and g.blocks[2].hidden[0].size == 64
    # same-role 3x3 convolutions of equal width are compatible (what tying fuses); the
    # downsampling block's conv1 (32->64, stride 2) fits no group
    groups = {k.split(":")[1] + ":" + k.split(":")[2]: len(v) for k, v in g.groups().items()}
    assert groups == {"conv1:32x32x3x3": 2, "conv2:32x32x3x3": 2, "conv2:64x64x3x3": 2}


@pytest.mark.parametrize("name,build,n_groups,hidden", [
    ("llama", lambda: CausalLMLogits(zoo.tiny_llama(layers=4)), 7, 128),
    ("gpt2", lambda: CausalLMLogits(zoo.tiny_gpt2(layers=4)), 4, 256),
    ("bert", lambda: EncoderHidden(zoo.tiny_bert(layers=4)), 6, 128),
])
def test_transformers_blocks_groups_and_mlp_hidden_space(name, build, n_groups, hidden):
    g = build_layer_graph(build(), (IDS,))
    assert len(g.blocks) == 4
    assert all(b.skip == "identity" for b in g.blocks)
    assert len({b.kind for b in g.blocks}) == 1
    groups = g.groups()
    assert len(groups) == n_groups
    assert all(len(v) == 4 for v in groups.values())
    families = {v[0].family for v in groups.values()}
    assert families == {"attention", "fully-connected"}
    # exactly one permutable hidden space per block: the MLP's intermediate units
    assert [len(b.hidden) for b in g.blocks] == [1] * 4
    assert g.blocks[0].hidden[0].size == hidden


def test_gpt2_conv1d_weights_are_transposed_to_out_in():
    model = CausalLMLogits(zoo.tiny_gpt2(layers=2))
    g = build_layer_graph(model, (IDS,))
    node = g.node("model.transformer.h.0.mlp.c_fc")
    param = model.get_submodule(node.ref).weight.detach().numpy()  # Conv1D stores (in, out)
    assert node.weight.shape == (256, 64)
    np.testing.assert_array_equal(node.weight, param.T)


def test_frontend_copies_weights_and_leaves_model_alone():
    model = zoo.MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = build_layer_graph(model, (torch.randn(2, 16),))
    g.nodes[0].weight[:] = 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fingerprint_tracks_weights():
    model = zoo.MLP()
    a = build_layer_graph(model, (torch.randn(2, 16),)).fingerprint()
    assert build_layer_graph(model, (torch.randn(3, 16),)).fingerprint() == a
    with torch.no_grad():
        model.net[2].weight[0, 0] += 1e-3
    assert build_layer_graph(model, (torch.randn(2, 16),)).fingerprint() != a


class _NoWeights(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.lin(x)
        return x


def test_model_without_weighted_layers_is_refused():
    with pytest.raises(UnsupportedModelError, match="nothing to fuse"):
        build_layer_graph(_NoWeights(), (torch.randn(2, 4),))


def test_untraceable_model_gives_one_clear_error():
    with pytest.raises(UnsupportedModelError, match="torch.export could not trace _Untraceable"):
        build_layer_graph(_Untraceable(), (torch.randn(2, 4),))
