"""A checkpoint read block by block is the model loaded in memory: the same layer graph
(names, roles, order, blocks, block kinds, hidden spaces, parameter count, fingerprint),
the same stack input and the same logits, family by family; a family that cannot be read
block by block is refused by its class, naming why."""

from __future__ import annotations

import pytest
import torch

from lfgraph import pipeline
from lfgraph.blocks import CheckpointBlocks, HeldBlocks
from lfgraph.errors import UnsupportedModelError
from lfgraph.frontends.checkpoint import build_layer_graph

from tiny_families import FAMILIES, tiny_family_model

#: Families whose checkpoints transformers converts when it loads them (per-expert tensors
#: merged into one): refused by their class.
CONVERTED = ("mixtral", "qwen3_moe")
STREAMED = [f for f in FAMILIES if f not in CONVERTED]


def _rows(graph):
    nodes = [(n.name, n.role, n.op, n.shape, n.block, n.order, n.attrs, n.bias is None) for n in graph.nodes]
    blocks = [(b.name, b.kind, b.skip, [(s.size, s.tensors) for s in b.hidden]) for b in graph.blocks]
    return nodes, blocks


@pytest.mark.parametrize("family", STREAMED)
def test_the_checkpoint_is_the_model_in_memory(family, tmp_path):
    folder = tmp_path / family
    tiny_family_model(family, folder)
    source, graph = pipeline.graph_of(str(folder))
    blocks = CheckpointBlocks(folder)
    streamed = build_layer_graph(blocks)
    assert _rows(streamed) == _rows(graph)
    assert streamed.total_params == graph.total_params == blocks.parameter_count()
    assert streamed.fingerprint() == graph.fingerprint()
    ids = torch.randint(2, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    held = HeldBlocks(source.model.module, blocks.container)
    logits = []
    for s in (held, blocks):
        inputs = s.stack_input([ids], batch_size=2)
        x = inputs.hidden[0]
        for i, block in s.blocks():
            x = inputs.calls[0][i](block, x)
        logits.append(s.logits(x, inputs.ids[0]))
    with torch.no_grad():
        want = source.model.module(ids[:2])
    # the same operations on the same tensors: bit for bit
    assert torch.equal(logits[1], want) and torch.equal(logits[0], want)


@pytest.mark.parametrize("family", CONVERTED)
def test_a_family_that_cannot_stream_is_refused_by_its_class(family, tmp_path):
    folder = tmp_path / family
    tiny_family_model(family, folder)
    with pytest.raises(UnsupportedModelError, match="merges this family's per-expert checkpoint tensors"):
        CheckpointBlocks(folder)


def test_the_fingerprint_is_hashed_from_the_blocks_a_pass_reads(tmp_path):
    """After a pass over every block, the fingerprint reads only the layers outside the
    blocks (the head) from the checkpoint; it equals the one read layer by layer."""
    from blocks_helpers import save_folder

    folder = save_folder(tmp_path / "model", "qwen2", layers=4, dtype=torch.bfloat16)
    blocks = CheckpointBlocks(folder)
    graph = build_layer_graph(blocks)
    blocks.observers.append(graph.hash_block)
    for _ in blocks.blocks():
        pass
    read = blocks.ckpt.bytes_read
    fp = graph.fingerprint()
    head = blocks.ckpt.entry("lm_head.weight").nbytes
    assert blocks.ckpt.bytes_read - read == head
    assert fp == build_layer_graph(CheckpointBlocks(folder)).fingerprint()
