"""Apply a merge plan to a model read block by block from a checkpoint.

The checkpoint path's rewrite: the same fusion rules as :mod:`lfgraph.passes.rewrite_torch`
(``remove``, ``mean`` with or without neuron alignment, ``calibrated`` with its refit and
distillation variants), applied to a :class:`~lfgraph.blocks.CheckpointBlocks`: the
result is a *view* of the checkpoint (the kept blocks, the tensors the rewrite changed),
never the model in memory. The calibrated rule is the in-memory pass's own driver
(:func:`lfgraph.passes.calibrated_fusion.fit_runs`) on the checkpoint's blocks; its
distillation trains by the objective the caller chose (:data:`OBJECTIVES`):

- ``logit``: the in-memory distillation (:func:`lfgraph.passes.map_distillation.distill_maps`)
  on the compressed model and the original held in memory (read from the checkpoint);
- ``blockwise``: :mod:`lfgraph.passes.blockwise_distillation`, one block in training at a
  time, the original's hidden states as targets.

Expects the plan made for this checkpoint (its fingerprint is checked by the caller).
Guarantees: the checkpoint is only read; the result's overrides hold each changed tensor in
the dtype the checkpoint stores it (what will be written).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..errors import LfgraphError
from ..graph import LayerGraph
from ..plan import FusionPlan
from .base import PassResult, RewriteLog
from .block_stack import split_block_name

#: How a distilling rule trains on the checkpoint path.
OBJECTIVES = ("logit", "blockwise")


def apply_plan_to_blocks(source: Any, graph: LayerGraph, plan: FusionPlan, calibration: Any = None, *, objective: str = "logit",
                         blockwise: Any = None, states: Any = None, progress: bool = False) -> PassResult:
    """Rewrite the model of ``source`` (an original :class:`~lfgraph.blocks.CheckpointBlocks`)
    as ``plan`` says; returns a :class:`~lfgraph.passes.base.PassResult` whose ``model`` is
    the compressed view and whose log has the in-memory pass's records.

    ``objective``: how a distilling rule trains (:data:`OBJECTIVES`); ``blockwise``: its
    :class:`~lfgraph.passes.blockwise_distillation.BlockwiseSettings`. ``states``: what a
    selection pass kept of the calibration windows' hidden states (``(inputs, states)``: a
    :class:`~lfgraph.blocks.StackInput` and block index -> states entering it), so that
    the refit starts at its first run instead of block 0."""
    if plan.mode != "merge":
        raise LfgraphError(f"a checkpoint is rewritten block by block by merge plans; this plan has mode {plan.mode!r}: "
                           "tie shares one weight between layers, which a Hugging Face checkpoint cannot store (compress in memory)")
    if any(f.unit != "block" for f in plan.fusions):
        raise LfgraphError("a merge plan must fuse blocks (unit 'block'); make it with --mode merge")
    blocks = {b.name: b for b in graph.blocks}
    index: dict[str, int] = {}
    for f in plan.fusions:
        for name in [f.keep, *f.absorb]:
            if name not in blocks:
                raise LfgraphError(f"plan names block {name!r} that this model does not have: make a new plan")
            index[name] = split_block_name(name)[1]
    gone = sorted(index[a] for f in plan.fusions for a in f.absorb)
    kept = [i for i in range(source.num_blocks) if i not in set(gone)]
    log = RewriteLog()
    if plan.fuse == "calibrated":
        if calibration is None:
            raise LfgraphError("fuse rule 'calibrated' needs calibration data: pass calibration windows (CLI: --calibration-windows)")
        view = _calibrated(source, plan, calibration, log, objective, blockwise, states, progress)
    else:
        view = source.view(range(source.num_blocks))
        if plan.fuse not in ("mean", "remove"):
            raise LfgraphError(f"unknown fusion rule {plan.fuse!r} in the plan")
        for f in plan.fusions:  # the records in the in-memory pass's order
            if plan.fuse == "mean":
                _mean(view, blocks[f.keep], [blocks[a] for a in f.absorb], f.align, log)
            for a in f.absorb:
                log.add("merge", "remove", a, [f.keep], fuse=plan.fuse)
    out = view.view(kept, view.overrides)
    if out.num_blocks != source.num_blocks - len(gone):
        raise LfgraphError(f"internal error: the rewrite kept {out.num_blocks} blocks, the plan says {source.num_blocks - len(gone)}")
    return PassResult(out, True, log)


def _mean(view: Any, keep: Any, absorb: list[Any], align: bool, log: RewriteLog) -> None:
    """The ``mean`` rule on the checkpoint: the kept block and the absorbed ones in memory
    together (one run), averaged by :func:`lfgraph.passes.rewrite_torch.fuse_mean`."""
    import contextlib

    from .rewrite_torch import fuse_mean

    for a in absorb:
        if a.kind != keep.kind:
            raise LfgraphError(f"blocks {keep.name} and {a.name} differ in structure and cannot be fused")
    with contextlib.ExitStack() as opened:
        kept = opened.enter_context(view.open(keep.index))
        others = [opened.enter_context(view.open(a.index)) for a in absorb]
        fuse_mean(kept, others, keep, [a.name for a in absorb], align, log)
        view.keep_changes(keep.index, kept, [k for k, _ in kept.named_parameters()] + [k for k, b in kept.named_buffers() if b.is_floating_point()])


def _calibrated(source: Any, plan: FusionPlan, calibration: torch.Tensor, log: RewriteLog, objective: str, blockwise: Any,
                states: Any, progress: bool) -> Any:
    from .calibrated_fusion import (
        PASS_NAME, _architecture_of, _run_specs, _steps, calibration_state, fit_runs, log_absorbed, options_from_provenance,
    )

    if objective not in OBJECTIVES:
        raise LfgraphError(f"unknown distillation objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    options = options_from_provenance(plan.provenance, progress)
    distill = options["distill"]
    runs, keeps = [], []
    for f in plan.fusions:
        names = sorted([f.keep, *f.absorb], key=lambda n: split_block_name(n)[1])
        idx = [split_block_name(n)[1] for n in names]
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise LfgraphError(f"calibrated fusion needs runs of consecutive blocks; {[f.keep, *f.absorb]} is not one (use --scope adjacent)")
        runs.append(names)
        keeps.append(f.keep)
    specs = _run_specs(runs, keeps)
    cpath = split_block_name(specs[0].names[0])[0]
    arch, form = _architecture_of(source.architecture, source.config)
    if distill is not None and arch is not None and arch.experts_down is not None:
        raise LfgraphError(f"{arch.name} is a mixture of experts: the distilled maps train on dense projections only; "
                           "use --fuse calibrated or calibrated-map")
    if distill is not None:
        from .map_distillation import check_settings

        check_settings(distill, calibration)
    view = source.view(range(source.num_blocks))
    first = specs[0].index[0]
    blockwise_hook = None
    track = distill is not None and objective == "blockwise"
    start_states = None
    if states is not None:
        inputs, kept_states = states
        if first in kept_states and inputs.ids and torch.equal(torch.cat(inputs.ids), calibration):
            start_states = kept_states[first]
    state = calibration_state(view, calibration, 0.25, 4, track, start=start_states)
    if start_states is None:
        first_pos = 0
    else:
        first_pos = first
    steps = _steps(specs, cpath, source.num_blocks, "composite", 0)
    t0 = time.perf_counter()
    if track:
        from .blockwise_distillation import BlockwiseDistiller, BlockwiseSettings, check_blockwise

        settings = blockwise or BlockwiseSettings(trainable=distill.trainable if distill.trainable != "blocks" else "neighbors",
                                                  progress=progress)
        check_blockwise(settings)
        gone = {i for s in specs for i in s.index if i != s.keep}
        next_block = {s.keep: next((j for j in range(s.index[-1] + 1, source.num_blocks) if j not in gone), None) for s in specs}
        targets: dict[int, list[str]] = {}
        blockwise_hook = _TargetsFromLog(log, cpath, targets, BlockwiseDistiller(view, source, settings, targets, next_block))
    fit_runs(view, specs, state, steps, start=first_pos, original=source if track else None, log=log, cpath=cpath, refit=options["refit"],
             arch=arch, form=form, progress=progress, after_fit=blockwise_hook)
    gone = sorted(i for s in specs for i in s.index if i != s.keep)
    if distill is not None and objective == "logit":
        view = _logit_distill(source, view, specs, gone, calibration, distill, log, cpath)
    elif distill is not None:
        recs = blockwise_hook.distiller.records  # type: ignore[union-attr]
        log.add(PASS_NAME, "distill", cpath, [r.target for r in log.records if r.action == "refit"], objective="blockwise",
                trainable=blockwise_hook.distiller.settings.trainable, steps=blockwise_hook.distiller.settings.steps,  # type: ignore[union-attr]
                blocks=[r["block"] for r in recs], heldout_start=[r["heldout_start"] for r in recs],
                heldout_best=[r["heldout_best"] for r in recs], best_step=[r["best_step"] for r in recs],
                seconds=round(sum(r["seconds"] for r in recs), 3), trainable_params=max((r["trainable_params"] for r in recs), default=0))
    log_absorbed(log, specs, cpath, t0)
    return view


class _TargetsFromLog:
    """Before the block-wise distiller runs on a kept block, note which of its projections
    the refit just changed (the log's newest ``refit`` records): ``maps`` trains those."""

    def __init__(self, log: RewriteLog, cpath: str, targets: dict[int, list[str]], distiller: Any) -> None:
        self.log, self.cpath, self.targets, self.distiller = log, cpath, targets, distiller

    def __call__(self, spec: Any, kept: Any, state: Any, run_out: Any) -> None:
        prefix = f"{self.cpath}.{spec.keep}."
        self.targets[spec.keep] = [r.target[len(prefix):] for r in self.log.records
                                   if r.action == "refit" and r.target.startswith(prefix) and r.detail.get("part") != "post-norm scale"]
        self.distiller(spec, kept, state, run_out)


def _logit_distill(source: Any, view: Any, specs: list[Any], gone: list[int], calibration: torch.Tensor, distill: Any,
                   log: RewriteLog, cpath: str) -> Any:
    """The in-memory logit distillation on the compressed model and the original, both held
    in memory (read from the checkpoint); returns the view with the trained tensors."""
    from .calibrated_fusion import PASS_NAME, blocks_to_train
    from .map_distillation import distill_maps
    from ..models import CausalLMLogits

    kept = [i for i in range(source.num_blocks) if i not in set(gone)]
    refits = [r for r in log.records if r.action == "refit" and r.detail.get("part") != "post-norm scale"]
    student_hf = view.view(kept, view.overrides).to_module()
    teacher = CausalLMLogits(source.to_module()).eval()
    student = CausalLMLogits(student_hf).eval()
    new_index = {old: new for new, old in enumerate(kept)}
    stack = student_hf.get_submodule(source.stack_path)

    def moved(name: str) -> str:  # a layer of the uncompressed stack, by plan name -> its path in the student
        index, _, rest = name[len(cpath) + 1:].partition(".")
        return f"{cpath}.{new_index[int(index)]}.{rest}"

    projections = [student.get_submodule(moved(r.target)) for r in refits]
    by_old = {old: stack[new] for old, new in new_index.items()}
    full = [by_old.get(i) for i in range(source.num_blocks)]
    trained = blocks_to_train([b if b is not None else torch.nn.Identity() for b in full], [s.keep for s in specs], [s.index for s in specs],
                              distill.trainable)
    curve = distill_maps(student, teacher, projections, calibration, distill, blocks=trained)
    log.add(PASS_NAME, "distill", cpath, [r.target for r in log.records if r.action == "refit"], objective="logit",
            steps=curve["steps"], best_step=curve["best_step"], kl_start=curve.get("kl_start"), kl_best=curve.get("kl_best"),
            seconds=round(curve["seconds"], 3), trainable_params=curve["trainable_params"], sampled_windows=curve["sampled_windows"],
            trainable=distill.trainable, sampling_seconds=round(curve["sampling_seconds"], 3),
            cache_seconds=round(curve["cache_seconds"], 3), teacher_cache=curve["teacher_cache"], frozen_blocks=curve["frozen_blocks"])
    # what trained goes back into the view, in the stored dtype
    compressed = view.view(kept, view.overrides)
    for new, block in enumerate(stack):
        with compressed.open(new) as on_disk:
            state = dict(block.named_parameters())
            changed = [k for k, v in on_disk.named_parameters() if not torch.equal(v, state[k].detach())]
            if changed:
                with torch.no_grad():
                    for k in changed:
                        dict(on_disk.named_parameters())[k].copy_(state[k].detach())
                compressed.keep_changes(new, on_disk, changed)
    del teacher, student
    return view.view(range(source.num_blocks), compressed.overrides)
