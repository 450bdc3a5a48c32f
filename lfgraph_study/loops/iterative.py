"""The paper's iterative scheme for any rewrite: analyse → plan → rewrite → heal, repeated.

:func:`iterative_heal` follows a compression curriculum (:mod:`lfgraph_study.loops.schedule`,
uniform or exponential): at step ``s`` the model is re-traced, a plan brings it to the
cumulative target ``c_s`` (a share of the ORIGINAL blocks under ``merge``, of its parameters
under ``tie``), the plan is applied with the pipeline's rewrite, and the result is healed
by distillation from the original model. Optionally it stops at the inflection point, where
each further share removed starts to cost much more than the previous one did.

(The retraining modes mean/freeze/mix on tie sets train the sets *before* they are tied:
that scheme is :func:`lfgraph_study.loops.loop.iterative_compress`.)
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.retrain.heal import HealConfig, heal
from lfgraph.retrain.modes import install_retrain_mode
from .schedule import compression_schedule


@dataclass
class HealStep:
    """One step of :func:`iterative_heal` (step 0 = the input model).

    ``fraction``: the cumulative target; ``blocks``/``params``: the model after the step;
    ``one_shot``/``healed``: ``evaluate`` right after the rewrite and after healing;
    ``heal_loss``: the last training loss of the step.
    """

    step: int
    fraction: float
    blocks: int
    params: int
    one_shot: float | None
    healed: float | None
    heal_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unique_params(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def inflection(steps: list[HealStep], factor: float) -> bool:
    """True when the last step's damage rate (metric increase per share removed, healed
    metric) exceeds ``factor`` times the previous step's rate: the curve bends upward."""
    if len(steps) < 3 or any(s.healed is None for s in steps[-3:]):
        return False
    a, b, c = steps[-3:]
    prev = (b.healed - a.healed) / max(b.fraction - a.fraction, 1e-12)
    last = (c.healed - b.healed) / max(c.fraction - b.fraction, 1e-12)
    return last > factor * max(prev, 1e-12)


def iterative_heal(
    model: Any,
    final_target: float,
    data: Any,
    compression_steps: int = 3,
    schedule_kind: str = "exponential",
    heal_config: HealConfig | None = None,
    *,
    mode: str = "merge",
    select: str = "block_influence",
    fuse: str = "calibrated",
    calibration: torch.Tensor | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    stop_at_inflection: bool = False,
    inflection_factor: float = 2.0,
    progress: bool = True,
) -> tuple[nn.Module, list[HealStep]]:
    """Compress ``model`` (a :class:`~lfgraph.models.LoadedModel`) in ``compression_steps``
    rewrite-and-heal steps to ``final_target``.

    ``merge``: ``final_target`` is the share of the original blocks removed; each step removes
    ``round(c_s · N) − removed so far`` more (selection ``select``, fusion ``fuse``; they need
    ``calibration`` token windows when activation-based). ``tie``: the share of parameters,
    planned by weight similarity. Each step heals with ``heal_config`` (its ``plan`` is set per
    step) on ``data``, distilling from ``model.module``. With ``stop_at_inflection`` the scheme
    stops when :func:`inflection` fires and returns the model of the step before.

    Guarantees: ``model`` is not modified; returns the compressed, healed module (eval mode)
    and one :class:`HealStep` per step taken plus step 0 (after a stop at the inflection
    point the last record is the step that triggered it, whose model is discarded).
    """
    from lfgraph import pipeline
    from lfgraph.models import LoadedModel

    if mode not in ("merge", "tie"):
        raise LfgraphError(f"mode must be 'merge' or 'tie', got {mode!r}")
    fractions = compression_schedule(final_target, compression_steps, schedule_kind)
    base = heal_config or HealConfig()
    measure = (lambda m: float(evaluate(m.eval()))) if evaluate is not None else (lambda m: None)  # noqa: E731
    teacher = model.module
    graph0 = pipeline.trace(model)
    n0 = len(graph0.blocks)
    params0 = _unique_params(teacher)
    with torch.no_grad():
        m0 = measure(teacher)
    history = [HealStep(0, 0.0, n0, params0, m0, m0, None)]
    current = copy.deepcopy(teacher)
    previous = current
    for s, c in enumerate(fractions, start=1):
        loaded = LoadedModel(module=current.eval(), example_inputs=model.example_inputs, name=model.name, family=model.family,
                             tokenizer=model.tokenizer, hf_model=None, input_names=model.input_names, output_names=model.output_names)
        graph = pipeline.trace(loaded)
        if mode == "merge":
            n_now = len(graph.blocks)
            drop = round(c * n0) - (n0 - n_now)
            if drop < 1:
                continue  # this step's share rounds to no whole block
            target = drop / n_now
            plan = pipeline.plan_model(loaded, graph, target, mode="merge", select=select, fuse=fuse,
                                       calibration=calibration, progress=False)
        else:
            now = _unique_params(current)
            target = (now - (1.0 - c) * params0) / now
            if target <= 0:
                continue
            plan = pipeline.plan_model(loaded, graph, min(target, 1 - 1e-9), mode="tie", select="similarity", fuse="mean",
                                       target_kind="params", scope="global", progress=False)
        if mode == "merge":
            rewritten = pipeline.rewrite(loaded, graph, plan, calibration=calibration, progress=False).model
        else:
            # tie through the retraining-mode machinery: it makes every module that already
            # shares a weight (tied at an earlier step) follow the new tie, which the plain
            # rewrite does not (it re-ties only the named modules)
            rewritten = copy.deepcopy(current)
            sets = [[graph.node(n).ref or n for n in (f.keep, *f.absorb)] for f in plan.fusions]
            install_retrain_mode(rewritten, sets, "mean").finalize()
        with torch.no_grad():
            one_shot = measure(rewritten)
        cfg = replace(base, plan=plan, desc=f"step {s}/{len(fractions)} ({c:.0%})", progress=progress, resume=False)
        result = heal(rewritten, teacher, data, cfg)
        previous, current = current, result.model
        with torch.no_grad():
            healed = measure(current)
        blocks = len(graph.blocks) - (len(plan.absorbed) if mode == "merge" else 0)
        history.append(HealStep(s, c, blocks, _unique_params(current), one_shot, healed, result.losses[-1] if result.losses else None))
        if stop_at_inflection and inflection(history, inflection_factor):
            current = previous
            break
    return current.eval(), history


__all__ = ["HealStep", "inflection", "iterative_heal"]
