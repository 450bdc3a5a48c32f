"""What ``compress``, ``plan`` and ``heal`` share before anything is written: the option
checks made before loading (:func:`check_recipe`, :func:`check_inputs`), the one place a
run's recipe is chosen (:func:`resolve_recipe`), planning by any selection of
:mod:`lfgraph.registry` (:func:`plan_model`) and the rewrite (:func:`rewrite`).

Selections and fusion rules are looked up in :mod:`lfgraph.registry`: what a selection
needs (calibration data, activations, source kinds, modes, target kinds) and its budget
are the entry's, not branches on its name here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .calibration import load_calibration_text
from .errors import LfgraphError
from .graph import LayerGraph
from .model_types import CalibrationOptions
from .models import LoadedModel
from .options import COUNT, SEQ_LEN, check
from .passes.analysis import Analysis
from .passes.base import PassResult
from .passes.selection import runs_to_plan
from .plan import FusionPlan
from .recipes import default_recipe, refit_provenance, split_fusion_rule
from .registry import SELECTION_REGISTRY, fusion_rule, selection
from .sources import Source, TorchSource, check_model_spec

#: The modes a plan can have (what the rewrite does to the graph: see :mod:`lfgraph.recipes`).
MODES = ("merge", "tie")
#: What ``--target`` counts.
TARGET_KINDS = ("blocks", "params")


def plan_model(
    model: LoadedModel | Source,
    graph: LayerGraph,
    target: float,
    mode: str = "merge",
    select: str = "similarity",
    fuse: str = "aligned-mean",
    metric: str = "bures",
    scope: str = "adjacent",
    target_kind: str = "blocks",
    calibration: Any = None,
    analysis: Analysis | None = None,
    progress: bool = True,
    distill_trainable: str | None = None,
) -> FusionPlan:
    """A FusionPlan by weight similarity (``select="similarity"``) or by an activation-based
    selection (Block Influence, Gromov angular distance, SLEB; PyTorch sources only).

    The plan's provenance states the fraction actually removed (a target is rounded to
    whole blocks) and, for activation selections, each candidate block's score.
    ``distill_trainable`` (``-distill`` rules only) replaces the rule's trainable set.
    """
    check_recipe(target, mode, select, fuse, target_kind)
    refit_provenance(fuse, distill_trainable)  # refuse a bad combination before selecting
    rule, align = split_fusion_rule(fuse)
    entry = selection(select)
    if entry.plan is not None:  # weights only: the whole-graph planner (tie, params targets, ONNX)
        plan = entry.plan(graph, metric=metric, target=target, target_kind=target_kind, scope=scope, mode=mode,
                          fuse=rule, align=align, analysis=analysis, progress=progress)
        plan.provenance["select"] = select
        return _finish_plan(plan, graph, fuse, distill_trainable)
    source = model if isinstance(model, Source) else TorchSource(model)
    if source.kind not in entry.source_kinds:
        others = " or ".join(s.name for s in SELECTION_REGISTRY.values() if source.kind in s.source_kinds)
        raise LfgraphError(f"selection {select!r} needs activations, which lfgraph computes from the PyTorch model; ONNX files support --select {others}")
    if mode not in entry.modes:
        raise LfgraphError(f"selection {select!r} picks blocks to remove: use it with --mode merge")
    if target_kind not in entry.target_kinds:
        raise LfgraphError(f"selection {select!r} takes a fraction of blocks (--target-kind blocks)")
    if entry.needs_calibration and calibration is None:
        raise LfgraphError(f"selection {select!r} needs calibration data")
    # only blocks with an identity skip can be dropped; the target counts all blocks
    blocks = [b.name for b in graph.removable_blocks()]
    if not blocks:
        raise LfgraphError(f"{graph.model_name or 'the model'} has no blocks with an identity skip path: merge cannot remove any")
    n_drop = max(1, round(target * len(graph.blocks)))
    if n_drop > len(blocks) - 1:
        raise LfgraphError(f"target {target} asks to remove {n_drop} of {len(graph.blocks)} blocks but only {len(blocks) - 1} can go: lower the target")
    if entry.budget is not None:
        calibration = entry.budget.trim(calibration)
    walker = source.block_source()
    if getattr(walker, "memory", None) is not None and isinstance(calibration, torch.Tensor) and fusion_rule(fuse).needs_calibration:
        # a refit after the plan starts at its first run: keep the states entering the blocks a run can start at
        walker.memory.want(calibration, range(len(blocks) - n_drop))
    runs = entry.runs(walker, blocks, calibration, n_drop, progress=progress)
    container = blocks[0].rpartition(".")[0]
    provenance = {
        "lfgraph_version": __version__, "model": graph.model_name, "model_fingerprint": graph.fingerprint(),
        "source": graph.source, "select": select, "target": target, "target_kind": "blocks",
        "blocks_before": len(graph.blocks), "blocks_after": len(graph.blocks) - n_drop, "params_before": graph.total_params,
    }
    plan = runs_to_plan(runs, container, fuse=rule, align=align, provenance=provenance)
    return _finish_plan(plan, graph, fuse, distill_trainable)


@dataclass
class Recipe:
    """The selection and fusion rule a run uses, whether they are the family's defaults, and
    what the user should be told about the choice."""

    select: str
    fuse: str
    is_default: bool
    notes: list[str]

    @property
    def needs_calibration(self) -> bool:
        return selection(self.select).needs_calibration or fusion_rule(self.fuse).needs_calibration


def resolve_recipe(source: Source, mode: str, select: str | None, fuse: str | None, target: float, target_kind: str,
                   calibration: CalibrationOptions, metric: str | None = None, scope: str | None = None) -> Recipe:
    """The one place a run's recipe is chosen (``compress``, ``plan`` and ``heal`` ask it):
    the user's ``select``/``fuse`` where given, else the family's measured default for this
    target (:func:`lfgraph.recipes.default_recipe`), the weights-only recipe when there is no
    calibration data (a note says so); ``metric``/``scope`` given for a selection that does not
    take them are refused, not ignored."""
    has_data = source.has_calibration(calibration)
    d_select, d_fuse = default_recipe(source.family, mode, has_data, target, target_kind, source.architecture)
    recipe = Recipe(select or d_select, fuse or d_fuse, select is None and fuse is None, [])
    if not has_data and recipe.is_default and mode == "merge" and source.kind == "pytorch":
        recipe.notes.append("no calibration data (no tokenizer files, no --calibration-tokens): the weights-only recipe, "
                            f"select {d_select} + fuse {d_fuse}; give calibration data for the activation-based default")
    takes = selection(recipe.select).parameters
    ignored = [o for o, v in (("metric", metric), ("scope", scope)) if v is not None and o not in takes]
    if ignored:
        users = " or ".join(s.name for s in SELECTION_REGISTRY.values() if all(o in s.parameters for o in ignored))
        flags = " and ".join("--" + o for o in ignored)
        chosen = "--select" if select is not None else "the family's default selection"
        raise LfgraphError(f"{flags} {'applies' if len(ignored) == 1 else 'apply'} to --select {users} only, and {chosen} is "
                           f"{recipe.select}: drop {flags}, or give --select {users}")
    return recipe


def _finish_plan(plan: FusionPlan, graph: LayerGraph, fusion_rule: str, distill_trainable: str | None = None) -> FusionPlan:
    """Record what a plan's reader needs beyond its fusions: the refit's capacity and
    distillation for ``calibrated-map``/``calibrated-distill``, and the fraction actually removed (targets round to whole blocks
    or layers)."""
    p = plan.provenance
    p.update(refit_provenance(fusion_rule, distill_trainable))
    if plan.mode == "merge" and graph.blocks:
        removed = sum(len(f.absorb) for f in plan.fusions)
        p["achieved"] = round(removed / len(graph.blocks), 4)
        p["achieved_kind"] = "blocks"
    elif graph.total_params:
        p["achieved"] = round(int(p.get("params_saved", 0)) / graph.total_params, 4)
        p["achieved_kind"] = "params"
    return plan


def weight_warnings(graph: LayerGraph) -> list[str]:
    """Say when weights carry no information: every distance is then 0 and any ranking
    falls back to layer order (structure-only test graphs, e.g. the onnx package's light
    models, build every weight from one constant)."""
    uniform = [n.name for n in graph.nodes if n.weight.size and float(np.ptp(n.weight)) == 0.0]
    if uniform and len(uniform) == len(graph.nodes):
        return [f"every weight of {graph.model_name or 'the model'} is one repeated value (a structure-only graph?): "
                "all distances are 0 and the ranking falls back to layer order"]
    if len(uniform) > len(graph.nodes) // 2:
        return [f"{len(uniform)} of {len(graph.nodes)} layers have weights of one repeated value (e.g. {uniform[0]}): their distances say nothing"]
    return []


def rewrite(model: LoadedModel | Source, graph: LayerGraph, plan: FusionPlan, calibration: Any = None, progress: bool = True) -> PassResult:
    """Apply ``plan`` to a copy of the model (the loaded model is not modified)."""
    source = model if isinstance(model, Source) else TorchSource(model)
    plan.check_matches(graph)
    return source.rewrite(plan, calibration=calibration, progress=progress)


# ---------------------------------------------------------------------------------------
# checks made before anything heavy


def check_recipe(target: float, mode: str, select: str, fuse: str, target_kind: str) -> None:
    """Refuse impossible option values with one line, before loading anything."""
    if mode not in MODES:
        raise LfgraphError(f"unknown mode {mode!r}: choose merge or tie")
    selection(select)  # the registries refuse an unknown name with the list of choices
    fusion_rule(fuse)
    if target_kind not in TARGET_KINDS:
        raise LfgraphError(f"unknown target kind {target_kind!r}: choose blocks or params")
    if not (0.0 < target < 1.0):
        raise LfgraphError(f"target {target} is out of range: give a fraction strictly between 0 and 1 (e.g. 0.25)")


def check_inputs(spec: Any, plan: Any = None, calibration: CalibrationOptions | None = None) -> FusionPlan | None:
    """Every check of the inputs that needs no model: the model path, plan file, calibration
    files. Returns the plan when a plan file was given (parsed, not yet matched to the model)."""
    if isinstance(spec, (str, os.PathLike)):
        check_model_spec(str(spec))
    if calibration is not None:
        if calibration.text_file:
            load_calibration_text(calibration.text_file)  # exists, and is text
        if calibration.token_file and not Path(calibration.token_file).is_file():
            raise LfgraphError(f"token file {calibration.token_file} does not exist: give a .npy or .pt file of token ids")
        check("--calibration-windows", calibration.windows, COUNT)
        check("--calibration-seq-len", calibration.seq_len, SEQ_LEN)
    if plan is None or isinstance(plan, FusionPlan):
        return plan
    return FusionPlan.load(plan)
