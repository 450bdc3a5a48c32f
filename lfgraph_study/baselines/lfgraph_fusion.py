"""lfgraph's own depth reduction through the common interface: a selection criterion picks
runs of consecutive blocks, and each run is fused into one block by a fusion rule
(``calibrated``: the kept block's output projection refitted to reproduce the run, see
:mod:`lfgraph.passes.calibrated_fusion`; ``remove``: the run's other blocks deleted).

- ``lfgraph``: the default recipe of the model's family (``DEFAULT_RECIPES``: for causal
  LMs and the ResNet-style CNN Block Influence + calibrated);
- ``lfgraph-angular``, ``lfgraph-bi``, ``lfgraph-sleb``: a named selection + calibrated.

Options go to :func:`~lfgraph.passes.calibrated_fusion.calibrated_merge` (``refit``,
``strengths``, ``fit_attention``, ``token_weighting``, ``target``, ``keep``...), plus
``select``/``fuse`` to override the recipe and ``sleb_budget`` (windows, tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lfgraph.passes.block_stack import remove_blocks
from lfgraph.passes.calibrated_fusion import calibrated_merge_plan, options_from_provenance
from lfgraph.passes.selection import runs_to_plan, select_runs
from ._hidden import calibration_slice
from .interface import Method, find_block_stack, n_blocks_for, register, removable_blocks
from .sleb import SLEB_BUDGET


def family_of(model: nn.Module) -> str:
    """``vision`` for a stack of convolution blocks, ``causal-lm`` for a transformer stack
    (the interface's models map inputs to logits), else ``generic``."""
    stack = model.get_submodule(find_block_stack(model))
    block = stack[0]
    if isinstance(getattr(block, "conv2", None), nn.Conv2d):
        return "vision"
    if any(hasattr(block, a) for a in ("self_attn", "attn", "attention")):
        return "causal-lm"
    return "generic"


def fuse_runs(
    model: nn.Module, target: float, calibration: torch.Tensor, *, select: str | None = None, fuse: str | None = None,
    sleb_budget: tuple[int, int] = SLEB_BUDGET, batch_size: int = 4, **options: Any,
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Select runs with ``select`` and fuse them with ``fuse`` (defaults: the family's recipe)."""
    from lfgraph.recipes import CALIBRATED_VARIANTS, default_recipe, refit_provenance

    from lfgraph.architectures import of_model

    recipe = default_recipe(family_of(model), "merge", True, target, architecture=of_model(model))
    select, fuse = select or recipe[0], fuse or recipe[1]
    if fuse in CALIBRATED_VARIANTS:  # the calibrated refit, limited and/or distilled (see lfgraph.recipes)
        for key, value in options_from_provenance(refit_provenance(fuse)).items():
            options.setdefault(key, value)
        fuse = "calibrated"
    cpath = find_block_stack(model)
    n = n_blocks_for(model, target, cpath)
    data = calibration_slice(calibration, *sleb_budget) if select == "sleb" else calibration
    runs = select_runs(select, model, removable_blocks(model, cpath), data, n, batch_size=batch_size)
    names = [f"{cpath}.{i}" for r in runs for i in r.absorb]
    details: dict[str, Any] = {"select": select, "fuse": fuse, "runs": [r.blocks for r in runs], "keep": [r.keep for r in runs]}
    if options.get("refit", "full") != "full":
        details["refit"] = options["refit"]
    if fuse == "calibrated":
        plan = runs_to_plan(runs, cpath, fuse="calibrated")
        result = calibrated_merge_plan(model, plan, calibration, inplace=True, batch_size=batch_size, **options)
        details["strengths"] = [r.detail.get("strength") for r in result.log.records if r.action == "refit"]
        for r in result.log.records:
            if r.action == "distill":
                details["distill"] = {k: r.detail[k] for k in ("steps", "best_step", "kl_start", "kl_best", "sampled_windows", "trainable", "seconds") if k in r.detail}
        return result.model, names, details
    if fuse != "remove":
        from lfgraph.errors import LfgraphError

        raise LfgraphError(f"fusion {fuse!r} is not available through the method interface: use calibrated or remove")
    remove_blocks(model, names)
    return model, names, details


def _named(select: str | None):
    def compress(model: nn.Module, target: float, calibration: torch.Tensor, **options: Any) -> tuple[nn.Module, list[str], dict[str, Any]]:
        options.setdefault("select", select)
        return fuse_runs(model, target, calibration, **options)

    return compress


register(Method("lfgraph", "depth", "lfgraph's default recipe for the model family (causal LMs: per target band, lfgraph.recipes.CAUSAL_LM_BANDS)", _named(None)))
register(Method("lfgraph-angular", "depth", "lfgraph: angular-distance selection + the family's default fusion rule", _named("angular")))
register(Method("lfgraph-bi", "depth", "lfgraph: Block Influence selection + the family's default fusion rule", _named("block_influence")))
register(Method("lfgraph-sleb", "depth", "lfgraph: SLEB selection (reduced budget) + the family's default fusion rule", _named("sleb")))
