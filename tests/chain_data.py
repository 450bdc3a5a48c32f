"""A learnable token chain and a tiny Llama trained on it: the 'original' of the healing
tests (product and study)."""

from __future__ import annotations

import torch

from tiny_models import tiny_llama

#: Vocabulary of the chain.
V = 64


def chain(n_windows: int, seed: int, perm: torch.Tensor, length: int = 32) -> torch.Tensor:
    """Token windows of a learnable chain: x[t+1] = perm[x[t]], a random restart every 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    x = [0]
    for t in range(n_windows * length - 1):
        x.append(int(torch.randint(0, V, (1,), generator=g)) if t % 8 == 7 else int(perm[x[-1]]))
    return torch.tensor(x).view(n_windows, length)


def trained_chain_llama() -> dict:
    """A tiny 4-layer Llama trained on the chain (``teacher``, eval mode), its training and
    held-out windows (``train``, ``held``)."""
    from lfgraph.models import CausalLMLogits
    from lfgraph.retrain import HealConfig, heal

    torch.set_num_threads(1)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    train, held = chain(64, 1, perm), chain(16, 2, perm)
    model = CausalLMLogits(tiny_llama(layers=4, hidden=64, vocab_size=V))
    teacher = heal(model, None, train, HealConfig(steps=120, lr=3e-3, batch_size=8, progress=False)).model.eval()
    return {"teacher": teacher, "train": train, "held": held}
