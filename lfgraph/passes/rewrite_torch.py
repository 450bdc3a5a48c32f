"""PyTorch rewrite passes: apply a :class:`FusionPlan` to an ``nn.Module``.

- ``tie``: every fused set of layers shares ONE ``nn.Parameter`` holding the mean of their
  weights (and biases). Depth stays, unique parameters drop by exactly the absorbed
  layers' sizes.
- ``merge``: each fused set of blocks becomes the kept block with fused weights
  (``fuse="mean"``: the mean of the blocks' parameters and buffers, after neuron alignment
  when ``Fusion.align``; ``fuse="remove"``: the kept block unchanged) and the absorbed
  blocks are deleted, so the network is shallower. ``fuse="calibrated"`` refits the kept
  block on calibration data (``lfgraph.passes.calibrated_fusion``).

Expects the ``LayerGraph`` built from the same module (its fingerprint must match the
plan's). Guarantees: the input module is never modified (the pass works on a deep copy);
the result is checked right after rewriting (unique-parameter or block counts match what
the plan says), else ``RewriteCheckError`` names the fusion at fault.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LfgraphError
from ..graph import Block, HiddenSpace, LayerGraph
from ..plan import FusionPlan
from .base import PassResult, RewriteLog
from .block_stack import remove_blocks
from .metrics import row_assignment


class RewriteCheckError(LfgraphError):
    """A rewrite's result does not match its plan (a bug, reported with the fusion at fault)."""


def unique_parameter_count(module: nn.Module) -> int:
    """Parameters counted once per distinct tensor (tied weights count once)."""
    seen: set[int] = set()
    total = 0
    for _, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def apply_plan(module: nn.Module, graph: LayerGraph, plan: FusionPlan, calibration: Any = None, progress: bool = False) -> PassResult:
    """Rewrite a copy of ``module`` as ``plan`` says; see the module docstring."""
    plan.check_matches(graph)
    model = copy.deepcopy(module)
    log = RewriteLog()
    if not plan.fusions:
        return PassResult(model, modified=False, log=log)
    if plan.mode == "tie":
        before = unique_parameter_count(model)
        _tie(model, graph, plan, log)
        saved = sum(graph.node(a).num_params for f in plan.fusions for a in f.absorb)
        after = unique_parameter_count(model)
        if before - after != saved:
            raise RewriteCheckError(f"tie removed {before - after} parameters, the plan says {saved}")
    elif plan.mode == "merge":
        if any(f.unit != "block" for f in plan.fusions):
            raise LfgraphError("a merge plan must fuse blocks (unit 'block'); make it with --mode merge")
        if plan.fuse == "calibrated":
            return _calibrated(model, graph, plan, calibration, progress)
        _merge(model, graph, plan, log)
    else:
        raise LfgraphError(f"unknown plan mode {plan.mode!r}: expected 'tie' or 'merge'")
    return PassResult(model, modified=True, log=log)


def _tie(model: nn.Module, graph: LayerGraph, plan: FusionPlan, log: RewriteLog) -> None:
    for f in plan.fusions:
        names = [f.keep, *f.absorb]
        try:
            mods = [model.get_submodule(graph.node(n).ref) for n in names]
        except (AttributeError, KeyError) as e:
            raise LfgraphError(f"plan names layer {e} that this model does not have: make a new plan") from None
        mods = _with_tied_partners(model, mods)
        shapes = {tuple(m.weight.shape) for m in mods}
        if len(shapes) != 1:
            raise RewriteCheckError(f"fusion of {names} mixes weight shapes {sorted(shapes)}")
        with torch.no_grad():
            shared_w = nn.Parameter(torch.stack([m.weight.detach() for m in mods]).mean(0))
            has_bias = all(getattr(m, "bias", None) is not None for m in mods)
            shared_b = nn.Parameter(torch.stack([m.bias.detach() for m in mods]).mean(0)) if has_bias else None
        for m in mods:
            m.weight = shared_w
            if shared_b is not None:
                m.bias = shared_b
        for a in f.absorb:
            log.add("tie", "tie", a, [f.keep], params_saved=graph.node(a).num_params)


def _with_tied_partners(model: nn.Module, mods: list[nn.Module]) -> list[nn.Module]:
    """``mods`` plus every module already sharing a weight with one of them (an earlier tie,
    e.g. an earlier step of iterative compression), so that tying again joins the tie sets
    instead of silently untying the earlier partners. The shared value is then the mean
    over every member module, i.e. over the original layers of the joined set."""
    shared = {id(m.weight) for m in mods}
    out = list(mods)
    seen = {id(m) for m in mods}
    for m in model.modules():
        if id(m) not in seen and isinstance(getattr(m, "weight", None), nn.Parameter) and id(m.weight) in shared:
            out.append(m)
            seen.add(id(m))
    return out


def _block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(block.named_parameters())
    tensors.update({k: v for k, v in block.named_buffers() if v.is_floating_point()})
    return tensors


def _merge(model: nn.Module, graph: LayerGraph, plan: FusionPlan, log: RewriteLog) -> None:
    blocks = {b.name: b for b in graph.blocks}
    to_remove: list[str] = []
    for f in plan.fusions:
        for name in [f.keep, *f.absorb]:
            if name not in blocks:
                raise LfgraphError(f"plan names block {name!r} that this model does not have: make a new plan")
        for a in f.absorb:
            if blocks[a].skip != "identity":
                raise LfgraphError(f"block {a} has a projection skip path: removing it would change tensor shapes")
            if blocks[a].kind != blocks[f.keep].kind:
                raise LfgraphError(f"blocks {f.keep} and {a} differ in structure and cannot be fused")
        if plan.fuse == "mean":
            _fuse_mean(model, blocks[f.keep], [blocks[a] for a in f.absorb], f.align, log)
        to_remove.extend(f.absorb)
        for a in f.absorb:
            log.add("merge", "remove", a, [f.keep], fuse=plan.fuse)
    before = _stack_len(model, to_remove[0])
    remove_blocks(model, to_remove)
    after = _stack_len(model, to_remove[0])
    if before - after != len(to_remove):
        raise RewriteCheckError(f"merge removed {before - after} blocks, the plan says {len(to_remove)}")


def _stack_len(model: nn.Module, block_name: str) -> int:
    container = block_name.rpartition(".")[0]
    return len(model.get_submodule(container))


def _fuse_mean(model: nn.Module, keep: Block, absorb: list[Block], align: bool, log: RewriteLog) -> None:
    fuse_mean(model.get_submodule(keep.name), [model.get_submodule(b.name) for b in absorb], keep, [b.name for b in absorb], align, log)


def fuse_mean(kept: nn.Module, absorbed: list[nn.Module], keep: Block, absorb_names: list[str], align: bool, log: RewriteLog) -> None:
    """Set ``kept``'s parameters and floating buffers to the mean of its own and those of
    the ``absorbed`` blocks (after permuting each absorbed block's hidden units to match
    ``kept``'s, by ``keep.hidden``, when ``align``); the absorbed modules are not modified."""
    kept_t = _block_tensors(kept)
    others = []
    for name, mod in zip(absorb_names, absorbed):
        t = {k: v.detach().clone() for k, v in _block_tensors(mod).items()}
        if align:
            for space in keep.hidden:
                perm = hidden_unit_permutation(kept_t, t, space)
                if not np.array_equal(perm, np.arange(len(perm))):
                    permute_hidden_units(t, space, perm)
                    moved = int((perm != np.arange(len(perm))).sum())
                    log.add("merge", "permute", name, [keep.name], units=len(perm), moved=moved)
        others.append(t)
    with torch.no_grad():
        for name, tensor in kept_t.items():
            stacked = torch.stack([tensor.detach()] + [o[name] for o in others])
            tensor.copy_(stacked.mean(0))
    log.add("merge", "fuse", keep.name, [keep.name] + list(absorb_names), rule="mean", aligned=align)


def _features(tensors: dict[str, torch.Tensor], space: HiddenSpace) -> np.ndarray:
    cols = [tensors[name].detach().movedim(axis, 0).reshape(space.size, -1) for name, axis in space.tensors]
    return torch.cat(cols, dim=1).double().numpy()


def hidden_unit_permutation(keep: dict[str, torch.Tensor], other: dict[str, torch.Tensor], space: HiddenSpace) -> np.ndarray:
    """``perm`` such that ``other``'s hidden unit ``perm[u]`` best matches ``keep``'s unit ``u``.

    Each unit is described by everything indexed by it (its producer rows, consumer
    columns, normalisation parameters); the matching minimises the summed squared distance
    (optimal assignment), so averaging afterwards combines like with like.
    """
    return row_assignment(_features(keep, space), _features(other, space))


def permute_hidden_units(tensors: dict[str, torch.Tensor], space: HiddenSpace, perm: np.ndarray) -> None:
    """Replace every tensor of ``space`` in the dict by its copy reordered along its axis."""
    index = torch.as_tensor(perm)
    for name, axis in space.tensors:
        tensors[name] = tensors[name].detach().index_select(axis, index)


def permute_block_in_place(block: nn.Module, space: HiddenSpace, perm: np.ndarray) -> None:
    """Reorder the hidden units of a live block module (its function does not change)."""
    live = _block_tensors(block)
    permuted = dict(live)
    permute_hidden_units(permuted, space, perm)
    with torch.no_grad():
        for name, _axis in space.tensors:
            live[name].copy_(permuted[name])


def _calibrated(model: nn.Module, graph: LayerGraph, plan: FusionPlan, calibration: Any, progress: bool) -> PassResult:
    if calibration is None:
        raise LfgraphError("fuse rule 'calibrated' needs calibration data: pass calibration windows (CLI: --calibration-windows)")
    from .calibrated_fusion import calibrated_merge_plan, options_from_provenance

    index = {b.name: b.index for b in graph.blocks}
    for f in plan.fusions:
        idx = sorted(index[m] for m in [f.keep, *f.absorb])
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise LfgraphError(f"calibrated fusion needs runs of consecutive blocks; {[f.keep, *f.absorb]} is not one (use --scope adjacent)")
    # ``model`` is already this pass's private copy
    return calibrated_merge_plan(model, plan, calibration, inplace=True, progress=progress, **options_from_provenance(plan.provenance, progress))
