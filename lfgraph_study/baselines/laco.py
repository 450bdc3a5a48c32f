"""LaCo (Yang et al. 2024, "Layer Collapse"): merge following layers into one by adding
their parameter differences (Reserving-Differences-while-Seeking-Common, RDSC):

    θ*_l = θ_l + Σ_{k=1..m} (θ_{l+k} − θ_l)

for every floating-point parameter and buffer of the block; blocks ``l+1 .. l+m`` are then
deleted. ``rule="released"`` follows the authors' released code instead
(``yangyifei729/LaCo``): it applies the additions one after the other to the *copy being
merged* (``W_l += W_{l+k} − W_l`` with the updated ``W_l``), and only to the seven
projection weights (q, k, v, o, gate, up, down), which leaves the last merged layer's
projections and the first layer's norms: a different (and much milder) merge than the
formula, measured side by side in the study as ``laco-released``. The paper's search goes from the top of the stack down: a merge of ``m = C − 1``
layers into ``l`` is kept when the cosine similarity between the merged model's and the
original model's last hidden states on a few calibration samples stays above a threshold
``T`` (then ``l`` moves down by the interval ``I``), else ``l`` moves down by one.

To hit a given number of removed blocks (the study compares at equal depth) two changes to
the paper's loop: a merge never removes more blocks than are still to go, and when a pass
from the top ends short of the target, ``T`` is lowered by ``threshold_step`` and the search
restarts from the top on the model as merged so far.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.passes.block_stack import remove_blocks
from ._hidden import calibration_slice, run_stack, stack_inputs, tokens
from .interface import Method, find_block_stack, n_blocks_for, register, removable_blocks


def _tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(block.named_parameters())
    out.update({k: v for k, v in block.named_buffers() if v.is_floating_point()})
    return out


@torch.no_grad()
def rdsc_merge(blocks: list[nn.Module]) -> dict[str, torch.Tensor]:
    """RDSC of ``blocks`` (the first is ``θ_l``): ``{name: θ_l + Σ (θ_{l+k} − θ_l)}``."""
    base = _tensors(blocks[0])
    others = [_tensors(b) for b in blocks[1:]]
    return {k: v + sum((o[k] - v for o in others), torch.zeros_like(v)) for k, v in base.items()}


#: Where the released code's merge applies: the projection weights of a Llama-style block.
RELEASED_TENSORS = tuple(f"{m}.{p}_proj.weight" for m, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps)
RULES = ("paper", "released")


@torch.no_grad()
def released_merge(blocks: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The released code's merge: ``W_l += W_{l+k} − W_l`` in turn, on the updated ``W_l``,
    for the projection weights only; every other tensor stays the first block's."""
    merged = {k: v.clone() for k, v in _tensors(blocks[0]).items()}
    if not any(k in RELEASED_TENSORS for k in merged):
        # otherwise the merge would silently be plain deletion of the other blocks
        raise LfgraphError(f"laco-released merges Llama-style projections ({', '.join(RELEASED_TENSORS[:2])}, ...) and "
                           f"{type(blocks[0]).__name__} has none: use laco (the paper's formula) for this model")
    for b in blocks[1:]:
        other = _tensors(b)
        for k in merged:
            if k in RELEASED_TENSORS:
                merged[k] += other[k] - merged[k]
    return merged


@torch.no_grad()
def _merged_block(blocks: list[nn.Module], rule: str = "paper") -> nn.Module:
    import copy

    new = copy.deepcopy(blocks[0])
    merged = rdsc_merge(blocks) if rule == "paper" else released_merge(blocks)
    for k, t in _tensors(new).items():
        t.copy_(merged[k])
    return new


@torch.no_grad()
def _similarity(blocks: list[nn.Module], inputs: list[tuple[torch.Tensor, dict]], reference: list[torch.Tensor]) -> float:
    """Mean cosine similarity of the last hidden states (per token) with the reference."""
    total, count = 0.0, 0
    for (x, kw), ref in zip(inputs, reference):
        out = run_stack(blocks, x, kw)
        cos = torch.nn.functional.cosine_similarity(tokens(out).double(), tokens(ref).double(), dim=-1)
        total += float(cos.sum())
        count += cos.numel()
    return total / count


def laco(
    model: nn.Module, target: float, calibration: torch.Tensor, *, merge_layers: int = 4, interval: int = 2,
    threshold: float = 0.65, threshold_step: float = 0.05, lowest: int = 1, max_windows: int = 4, max_tokens: int = 128,
    batch_size: int = 4, rule: str = "paper",
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Collapse layers with LaCo's search until ``round(target x blocks)`` are gone.

    ``merge_layers`` is the paper's ``C`` (``C − 1`` following layers merged into one),
    ``interval`` its ``I``, ``threshold`` its ``T``, ``lowest`` its ``L`` (layers below are
    never merged into). The similarity uses ``max_windows x max_tokens`` calibration tokens.
    ``rule``: ``"paper"`` (the RDSC formula) or ``"released"`` (the authors' code).
    """
    if rule not in RULES:
        raise LfgraphError(f"unknown LaCo rule {rule!r}: choose one of {', '.join(RULES)}")
    cpath = find_block_stack(model)
    n = n_blocks_for(model, target, cpath)
    if len(removable_blocks(model, cpath)) != len(model.get_submodule(cpath)):
        raise LfgraphError("LaCo merges consecutive layers of one kind: this stack has blocks with projection skips")
    stack = model.get_submodule(cpath)
    data = calibration_slice(calibration, max_windows, max_tokens)
    inputs = stack_inputs(model, stack, data, batch_size)
    reference = [run_stack(list(stack), x, kw) for x, kw in inputs]
    blocks = list(stack)
    origin = list(range(len(blocks)))  # original index of each current block
    removed: list[int] = []
    merges: list[dict[str, Any]] = []
    T = threshold
    while len(removed) < n:
        l = len(blocks) - merge_layers
        progress = False
        while l >= lowest and len(removed) < n:
            m = min(merge_layers - 1, n - len(removed), len(blocks) - 1 - l)
            if m < 1:
                l -= 1
                continue
            candidate = blocks[:l] + [_merged_block(blocks[l : l + m + 1], rule)] + blocks[l + m + 1 :]
            sim = _similarity(candidate, inputs, reference)
            if sim > T:
                merges.append({"into": origin[l], "merged": origin[l + 1 : l + m + 1], "similarity": round(sim, 5), "threshold": T})
                removed.extend(origin[l + 1 : l + m + 1])
                blocks, origin = candidate, origin[:l + 1] + origin[l + m + 1 :]
                progress = True
                l -= interval
                l = min(l, len(blocks) - merge_layers)
            else:
                l -= 1
        if len(removed) < n and not progress:
            T -= threshold_step
            if T < -1.0:
                raise LfgraphError("LaCo found no merge to accept at any threshold: lower the target")
    # write the merged weights into the model's own blocks, then delete the merged-away ones
    kept = {o: b for o, b in zip(origin, blocks)}
    with torch.no_grad():
        for o, b in kept.items():
            if b is not stack[o]:
                for k, t in _tensors(stack[o]).items():
                    t.copy_(_tensors(b)[k])
    names = [f"{cpath}.{i}" for i in sorted(removed)]
    remove_blocks(model, names)
    return model, names, {"merges": merges, "final_threshold": T, "rule": rule}


def _released(model: nn.Module, target: float, calibration: torch.Tensor, **options: Any) -> tuple[nn.Module, list[str], dict[str, Any]]:
    return laco(model, target, calibration, rule="released", **options)


register(Method("laco", "depth", "LaCo: layer collapse, parameter differences of following layers added into one (RDSC)", laco))
register(Method("laco-released", "depth", "LaCo as its released code merges (sequential additions on the projections only)", _released))
