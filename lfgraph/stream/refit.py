"""The calibrated fusion rule, streamed: each run's kept block refitted with at most two
blocks in memory.

This is :func:`lfgraph.passes.calibrated_fusion.calibrated_merge` (composite target, no
repair, no distillation) with the model's blocks read one at a time instead of held: the
same split of the windows into fitting and held-out batches, and the fit itself is the
in-memory pass's :func:`~lfgraph.passes.calibrated_fusion._fit_transformer_run`
(``RidgeStats`` in float64, ``choose_strength``, ``ridge_solve``), given the run's outputs
computed block by block.

The hidden states entering the first run are the selection pass's (it keeps the state
entering each block that could start a run, :func:`lfgraph.stream.select.score_blocks`),
regathered window by window into the refit's fitting and held-out batches
(:func:`lfgraph.stream.calibrate.regroup`): the blocks below the first run are not run
again. From there every block runs with the first run's call arguments, as the in-memory
pass runs them; a later run's input comes from the compressed model (the refitted kept
blocks and the blocks between the runs). The in-memory pass computes the first run's input
in its fitting and held-out batches instead of the selection's batches of consecutive
windows, and float32 matrix products may round differently with a different batch
composition: the refitted projections are promised to agree with the in-memory path's to
rounding (1e-5 of the largest magnitude), not bit for bit; on the models of
``tests/stream/test_equivalence.py`` (SmolLM2 included) they are still bit for bit.
Without the selection's states (``states=None``) the refit computes them from the
embeddings, the blocks below the first run running with their own per-layer arguments.

Memory: the hidden state of every calibration token three times (the frontier, the run's
running output, the run's output for the fit), one block being run plus the kept block,
and the fit's float64 statistics: with no more fitting tokens than the projection has inputs
(1024 tokens against 14336 inputs at 8B) the tokens as rows, solved in the dual form through
``n x n`` kernels; otherwise two ``in x in`` matrices (the fit's Gram matrix and one work
buffer for the shifted matrix and its factor) and the held-out tokens as rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..calibration import block_output
from ..errors import LfgraphError
from ..passes.base import RewriteLog
from ..passes.calibrated_fusion import (
    DEFAULT_LAMBDAS, PASS_NAME, _architecture, _Batch, _fit_transformer_run, _run_specs, _split_validation,
)
from ..passes.selection import Run
from .calibrate import regroup, stack_input
from .checkpoint import DTYPES
from .skeleton import LAYERS_PATH, Skeleton

#: The block container's path in the in-memory model (``CausalLMLogits`` wraps the Hugging
#: Face model as ``model``): plans and rewrite logs name blocks by it on both paths.
IN_MEMORY_CONTAINER = f"model.{LAYERS_PATH}"


@dataclass
class RefitResult:
    """Refitted tensors by checkpoint name (the in-memory model's float32 value cast to the
    stored dtype) and
    the rewrite log (one ``refit`` record per projection, one ``remove`` per absorbed block)."""

    changed: dict[str, torch.Tensor] = field(default_factory=dict)
    log: RewriteLog = field(default_factory=RewriteLog)
    #: blocks run to compute the runs' inputs and outputs (the kept blocks' refitted outputs not counted)
    blocks_run: int = 0
    seconds: float = 0.0


@torch.no_grad()
def refit_runs(
    skeleton: Skeleton,
    runs: Sequence[Run],
    ids: torch.Tensor,
    *,
    refit: str = "full",
    strengths: Sequence[float] = DEFAULT_LAMBDAS,
    token_weighting: str = "clip",
    clip: float = 4.0,
    val_fraction: float = 0.25,
    batch_size: int = 4,
    progress: Any = None,
    states: dict[int, list[torch.Tensor]] | None = None,
) -> RefitResult:
    """Refit each run's kept block (``Run.keep``) so that it alone maps the run's input to
    its output, on calibration windows ``ids`` ``(N, seq)``; options as
    :func:`~lfgraph.passes.calibrated_fusion.calibrated_merge`'s defaults.

    Runs must be disjoint runs of consecutive blocks. The checkpoint is only read;
    ``progress`` (a tqdm bar or None) advances once per block run.

    ``states``: the selection pass's hidden states entering blocks (``Scores.states``: block
    index -> one tensor per batch of ``batch_size`` consecutive windows of ``ids``); the
    refit takes the one entering its first run and empties the dict, so that the others are
    freed before the refit's own states are made. ``None``: computed from the embeddings,
    running the blocks below the first run.
    """
    t0 = time.perf_counter()
    result = RefitResult()
    if not runs:
        return result
    names = [[f"{IN_MEMORY_CONTAINER}.{i}" for i in r.blocks] for r in runs]
    specs = _run_specs(names, [f"{IN_MEMORY_CONTAINER}.{r.keep}" for r in runs])
    val_mask = _split_validation(ids.shape[0], val_fraction)
    first = specs[0].index[0]
    if states is not None:
        if first not in states:
            raise LfgraphError(f"internal error: the selection pass did not keep the hidden state entering block {first}, where the first run starts")
        start = states.pop(first)
        states.clear()
        inputs = regroup(skeleton, ids, [torch.nonzero(val_mask == v).flatten() for v in (False, True)], start, batch_size)
        del start
    else:
        inputs = stack_input(skeleton, [ids[val_mask == v] for v in (False, True)], batch_size)
    state = [_Batch(i, kw[first], x, None, g == 1) for i, kw, x, g in zip(inputs.ids, inputs.kwargs, inputs.hidden, inputs.group)]

    def run_block(i: int, xs: list[torch.Tensor], per_layer: bool, keep: bool = False) -> list[torch.Tensor]:
        block = skeleton.materialize(i)
        try:
            out = [block_output(block(x, **(kw[i] if per_layer else b.kwargs))) for x, kw, b in zip(xs, inputs.kwargs, state)]
        finally:
            if not keep:
                skeleton.release(i)
        result.blocks_run += 1
        if progress is not None:
            progress.update(1)
        return out

    if states is None:
        # below the first run the in-memory model runs whole: each layer gets its own arguments
        xs = [b.x for b in state]
        for i in range(first):
            xs = run_block(i, xs, per_layer=True)
        for b, x in zip(state, xs):
            b.x = x
    pos = first
    stack = list(skeleton.layers)
    arch, form = _architecture(skeleton.model)  # the family's refit target and block form, as in memory
    for spec in specs:
        xs = [b.x for b in state]
        for i in range(pos, spec.index[0]):
            xs = run_block(i, xs, per_layer=False)
        for b, x in zip(state, xs):
            b.x = x
        run_out = xs
        for i in spec.index:
            run_out = run_block(i, run_out, per_layer=False, keep=i == spec.keep)
        kept = skeleton.layers[spec.keep]
        try:
            stack[spec.keep] = kept
            before = len(result.log.records)
            _fit_transformer_run(stack, stack, spec, state, False, strengths, result.log, IN_MEMORY_CONTAINER, False,
                                 token_weighting, clip, None, None, refit, arch, form, run_outputs=run_out)
            del run_out
            for rec in result.log.records[before:]:
                proj = rec.target[len(f"{IN_MEMORY_CONTAINER}.{spec.keep}."):]
                for pname, p in kept.get_submodule(proj).named_parameters():
                    name = f"{LAYERS_PATH}.{spec.keep}.{proj}.{pname}"
                    # held until written, in the dtype it is stored in (the float32 value cast once)
                    result.changed[name] = p.detach().to(DTYPES[skeleton.ckpt.entry(name).dtype], copy=True)
            for b in state:
                b.x = block_output(kept(b.x, **b.kwargs))
        finally:
            skeleton.release(spec.keep)
        pos = spec.index[-1] + 1
    for s in specs:
        for i in s.index:
            if i != s.keep:
                result.log.add(PASS_NAME, "remove", f"{IN_MEMORY_CONTAINER}.{i}", [f"{IN_MEMORY_CONTAINER}.{s.keep}"], reason="absorbed by calibrated fit")
    result.seconds = time.perf_counter() - t0
    for r in result.log.records:
        if r.action == "refit":
            r.detail["seconds_total"] = round(result.seconds, 3)
    return result
