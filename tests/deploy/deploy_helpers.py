"""Tiny decoders for the deploy tests.

The weights are drawn with a larger spread than transformers' default (0.02) so that every
layer changes the greedy tokens: equality of generated tokens then says something about
which layers a model has."""

from __future__ import annotations

from pathlib import Path

import torch

from lfgraph.plan import Fusion, FusionPlan

PROMPT = [5, 9, 17, 33, 2, 71, 100, 250, 199, 42]


from tiny_text import tiny_tokenizer  # tests/ is on sys.path through its conftest.py


def tiny_decoder(folder: Path, *, gqa: bool = True, tied: bool = True, layers: int = 4, seed: int = 0):
    """A random LlamaForCausalLM with a real tokenizer, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=256,
        tie_word_embeddings=tied, initializer_range=0.2, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def remove_plan(graph, drop: list[int]) -> FusionPlan:
    """A merge plan that deletes blocks ``drop`` (each absorbed by a kept neighbour)."""
    names = [b.name for b in graph.blocks]
    kept = [i for i in range(len(names)) if i not in drop]
    absorbed: dict[int, list[str]] = {}  # one fusion per kept block: a block is in one fusion at most
    for i in drop:
        absorbed.setdefault(max((k for k in kept if k < i), default=kept[0]), []).append(names[i])
    fusions = [Fusion(keep=names[k], absorb=a) for k, a in sorted(absorbed.items())]
    return FusionPlan(fusions=fusions, mode="merge", fuse="remove", provenance={"model_fingerprint": graph.fingerprint()})


