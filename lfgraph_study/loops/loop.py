"""Retraining loops: one retraining round for fixed fused sets, and iterative compression.

:func:`retrain` installs a retraining mode on the fused sets, trains with one objective and
one optimizer for every mode (the modes differ only in their parametrizations and hooks),
and ties the sets at the end. :func:`iterative_compress` is the paper's scheme (1): at each
compression step it plans the next fusions on the current model with the planner, retrains
under the chosen retraining mode, ties, and repeats, following a compression curriculum
(:mod:`lfgraph_study.loops.schedule`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.retrain.modes import FusedSet, install_retrain_mode, unique_parameter_count
from lfgraph.retrain.objectives import Objective, make_objective
from .schedule import compression_schedule

#: What retraining updates: every parameter, or (the paper's scheme (2)) only the fused sets.
TRAINABLE = ("all", "fused")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _endless(data: Iterable[Any]) -> Iterator[Any]:
    """Cycle over ``data`` (a list, DataLoader or any re-iterable), forever."""
    while True:
        n = 0
        for batch in data:
            n += 1
            yield batch
        if n == 0:
            raise LfgraphError(
                "the training data yielded no batches (a used-up generator?): pass a list of batches or a DataLoader"
            )


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _train(
    model: nn.Module,
    fused_sets: Sequence[FusedSet],
    mode: str,
    data: Iterable[Any],
    steps: int,
    objective: Callable[..., torch.Tensor],
    teacher: nn.Module | None,
    lr: float,
    progress: bool,
    trainable: str,
    weight_decay: float,
    mode_options: dict[str, Any] | None,
    desc: str,
) -> list[float]:
    """Install ``mode``, train ``steps`` steps, finalize; return the per-step losses."""
    handle = install_retrain_mode(model, fused_sets, mode, **(mode_options or {}))
    paused: list[nn.Parameter] = []
    if trainable == "fused":
        params = handle.trainable_parameters()
        keep = {id(p) for p in params}
        # no gradients for the rest of the network: only the fused sets learn
        paused = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
        for p in paused:
            p.requires_grad_(False)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    device = _device_of(model)
    was_training = model.training
    if teacher is not None:
        teacher.eval()
    bar = None
    try:
        if steps > 0 and params:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            model.train()
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=steps, desc=desc, leave=False)
            batches = _endless(data)
            for _ in range(steps):
                batch = _to_device(next(batches), device)
                loss = objective(model, batch, teacher)
                if not torch.isfinite(loss.detach()):
                    raise LfgraphError(f"retraining diverged (loss {loss.item()}): lower the learning rate (lr={lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        handle.finalize()
        for p in paused:
            p.requires_grad_(True)
        model.train(was_training)
    return losses


def _check_common(data: Any, steps: int, lr: float, trainable: str, objective: Callable[..., torch.Tensor], teacher: nn.Module | None) -> None:
    if data is None:
        raise LfgraphError("retraining needs data: pass data=<a list or DataLoader of batches>")
    if int(steps) != steps or steps < 0:
        raise LfgraphError(f"steps must be a non-negative integer, got {steps!r}")
    if not lr > 0:
        raise LfgraphError(f"lr must be > 0, got {lr}")
    if trainable not in TRAINABLE:
        raise LfgraphError(f"trainable={trainable!r} is not one of {list(TRAINABLE)}")
    if isinstance(objective, Objective) and objective.needs_teacher and teacher is None:
        raise LfgraphError(f"objective {objective.name!r} distills from a teacher: pass teacher=<the original model>")


def _tail_mean(losses: list[float]) -> float | None:
    """Mean of the last tenth of the losses (at least one): the loss the round ended at."""
    if not losses:
        return None
    k = max(1, len(losses) // 10)
    return sum(losses[-k:]) / k


def retrain(
    model: nn.Module,
    fused_sets: Sequence[FusedSet],
    mode: str = "mean",
    data: Iterable[Any] | None = None,
    steps: int = 100,
    objective: str | Objective | Callable[..., torch.Tensor] = "task",
    teacher: nn.Module | None = None,
    lr: float = 1e-3,
    progress: bool = True,
    *,
    trainable: str = "all",
    weight_decay: float = 0.0,
    temperature: float | None = None,
    alpha: float | None = None,
    mode_options: dict[str, Any] | None = None,
) -> nn.Module:
    """Retrain ``model`` with ``fused_sets`` under fusion ``mode``, then tie each set.

    Expects: ``fused_sets`` as in :func:`~lfgraph.retrain.modes.install_retrain_mode`
    (may be empty: plain fine-tuning); ``data`` a re-iterable of batches (see
    :mod:`lfgraph.retrain.objectives`), cycled for ``steps`` AdamW steps; ``objective``
    ``"task"``, ``"distill"`` (needs ``teacher``), ``"mixed"`` (``alpha`` share of
    distillation), an ``Objective`` or a callable ``(model, batch, teacher) -> loss``.
    ``trainable="fused"`` updates only the fused sets (the paper's scheme (2)).

    Guarantees: ``model`` is modified in place and returned, in the train/eval state it
    came in; every fused set shares one ``nn.Parameter`` per weight/bias (also if training
    fails part way). The teacher is only run, never modified.
    """
    objective = make_objective(objective, temperature, alpha)
    _check_common(data, steps, lr, trainable, objective, teacher)
    _train(model, fused_sets, mode, data, steps, objective, teacher, lr, progress, trainable, weight_decay, mode_options, f"retrain ({mode})")
    return model


@dataclass
class CompressionRecord:
    """One compression step of :func:`iterative_compress` (step 0 is the input model).

    ``fraction``: the cumulative share of parameters the schedule asked to remove;
    ``achieved``: the share actually removed (``1 − params / params_before``);
    ``fused``: layers absorbed at this step; ``loss``: mean training loss over the last
    tenth of the step's retraining; ``metric``: ``evaluate(model)`` after the step.
    """

    step: int
    fraction: float
    achieved: float
    params: int
    fused: int
    retrain_steps: int
    loss: float | None
    metric: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def iterative_compress(
    model: nn.Module,
    example_inputs: Sequence[Any],
    data: Iterable[Any],
    final_fraction: float,
    compression_steps: int = 3,
    steps_per_compression: int | Sequence[int] = 100,
    mode: str = "mean",
    metric: str = "bures",
    schedule_kind: str = "exponential",
    objective: str | Objective | Callable[..., torch.Tensor] = "task",
    teacher: nn.Module | None = None,
    *,
    lr: float = 1e-3,
    scope: str = "global",
    evaluate: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
    trainable: str = "all",
    temperature: float | None = None,
    alpha: float | None = None,
    mode_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, list[CompressionRecord]]:
    """Compress ``model`` by layer fusion in ``compression_steps`` steps with retraining.

    At step ``s`` the cumulative target ``c_s`` comes from
    :func:`~lfgraph_study.loops.schedule.compression_schedule` (``final_fraction`` = share of
    the model's parameters to remove, the planner's ``target_kind="params"``); the current
    model's ``LayerGraph`` is built, the planner (``make_plan(..., mode="tie")``) picks the
    fusions that bring the unique-parameter count to ``(1 − c_s)`` of the original, the
    fused sets are retrained for ``steps_per_compression`` steps (an int, or one count per
    step, e.g. from :func:`~lfgraph_study.loops.schedule.retraining_steps`) under fusion
    ``mode`` and tied.

    Expects ``model(*example_inputs)`` to run (for tracing). With a distilling objective and
    no ``teacher`` a frozen copy of the input model is the teacher.
    Guarantees: the input model is not modified; returns the compressed model (in eval
    mode) and one :class:`CompressionRecord` per step (plus step 0, the input).
    """
    from lfgraph.frontends.torch_fx import build_layer_graph
    from lfgraph.passes.planner import make_plan

    objective = make_objective(objective, temperature, alpha)
    fractions = compression_schedule(final_fraction, compression_steps, schedule_kind)
    if isinstance(steps_per_compression, int):
        step_counts = [steps_per_compression] * compression_steps
    else:
        step_counts = [int(s) for s in steps_per_compression]
        if len(step_counts) != compression_steps:
            raise LfgraphError(
                f"steps_per_compression has {len(step_counts)} entries for {compression_steps} compression steps: give one per step"
            )
    if isinstance(objective, Objective) and objective.needs_teacher and teacher is None:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    for count in step_counts:
        _check_common(data, count, lr, trainable, objective, teacher)
    work = copy.deepcopy(model)
    params0 = unique_parameter_count(work)

    def measure() -> float | None:
        if evaluate is None:
            return None
        work.eval()
        with torch.no_grad():
            return float(evaluate(work))

    history = [CompressionRecord(0, 0.0, 0.0, params0, 0, 0, None, measure())]
    for s, (fraction, count) in enumerate(zip(fractions, step_counts), start=1):
        current = unique_parameter_count(work)
        # the planner's target is a share of the CURRENT model's parameters
        step_target = (current - (1.0 - fraction) * params0) / current
        fused_sets: list[list[str]] = []
        if step_target > 0:
            work.eval()
            graph = build_layer_graph(work, example_inputs)
            plan = make_plan(
                graph, metric=metric, target=min(step_target, 1 - 1e-9), target_kind="params",
                scope=scope, mode="tie", fuse="mean", align=False,
            )
            fused_sets = [[graph.node(f.keep).ref or f.keep, *(graph.node(a).ref or a for a in f.absorb)] for f in plan.fusions]
        losses = _train(
            work, fused_sets, mode, data, count, objective, teacher, lr, progress, trainable, 0.0, mode_options,
            f"step {s}/{compression_steps} ({fraction:.0%}, {mode})",
        )
        params = unique_parameter_count(work)
        history.append(
            CompressionRecord(
                step=s, fraction=fraction, achieved=1.0 - params / params0, params=params,
                fused=sum(len(f) - 1 for f in fused_sets), retrain_steps=count, loss=_tail_mean(losses), metric=measure(),
            )
        )
    work.eval()
    return work, history


__all__ = ["TRAINABLE", "CompressionRecord", "iterative_compress", "retrain"]
