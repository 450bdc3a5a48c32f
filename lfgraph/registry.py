"""Typed registries of the two recipe choices: **selections** (``--select``: which blocks or
layers are fused) and **fusion rules** (``--fuse``: how a fused run becomes one block).

One entry per name says what the choice is (a line the CLI's help prints), what it needs
(calibration data, activations from the PyTorch model, which source kinds, which modes and
target kinds), its parameters or budget, and the code that runs it. The CLI's choices and
help, the option checks, :func:`lfgraph.recipes.split_fusion_rule` /
:func:`~lfgraph.recipes.refit_provenance` and the planner read these entries instead of
comparing names. The vocabulary itself (the words ``selection``, ``fusion rule``) is
:mod:`lfgraph.recipes`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import LfgraphError
from .passes import selection as _selection
from .passes.map_distillation import DEFAULT_TRAINABLE
from .passes.planner import make_plan

#: Source kinds (``Source.kind``): a model in memory, an ONNX graph, a checkpoint read block by block.
PYTORCH, ONNX, CHECKPOINT = "pytorch", "onnx", "checkpoint"


@dataclass(frozen=True)
class Budget:
    """A calibration budget: at most ``windows`` windows of ``tokens`` tokens each (language
    models' 2-D token batches; other calibration data is used as given)."""

    windows: int
    tokens: int

    def trim(self, calibration: Any) -> Any:
        if getattr(calibration, "dim", None) is not None and calibration.dim() == 2:
            return calibration[: self.windows, : self.tokens]
        return calibration


@dataclass(frozen=True)
class Selection:
    """One ``--select`` choice.

    ``runs``: ``fn(module, blocks, calibration, n_drop, **options) -> list[Run]``
    (:mod:`lfgraph.passes.selection`), the block runs to fuse. ``plan``: a whole-graph
    planner (:func:`lfgraph.passes.planner.make_plan`) for selections that read weights
    only; it plans ``tie`` and parameter targets and ONNX graphs too, and is used instead of
    ``runs`` when set. ``budget``: the calibration this selection reads at most (it runs
    the model many times)."""

    name: str
    description: str
    runs: Callable[..., Any]
    needs_calibration: bool
    needs_activations: bool
    source_kinds: tuple[str, ...]
    modes: tuple[str, ...] = ("merge",)
    target_kinds: tuple[str, ...] = ("blocks",)
    plan: Callable[..., Any] | None = None
    budget: Budget | None = None
    #: the options it takes (``--metric``, ``--scope``); the others ignore them
    parameters: tuple[str, ...] = ()


@dataclass(frozen=True)
class FusionRule:
    """One ``--fuse`` choice, and what it writes into a plan: ``plan_fuse`` (the plan's
    ``fuse``: ``remove``, ``mean`` or ``calibrated``, which the rewrite passes of
    :mod:`lfgraph.passes` apply), ``align`` (neuron alignment before averaging), ``refit``
    (``"map"``: the calibrated refit limited to a square map) and ``distill`` (a second
    stage of logit distillation, training ``distill_trainable`` by default)."""

    name: str
    description: str
    plan_fuse: str
    needs_calibration: bool
    source_kinds: tuple[str, ...]
    align: bool = False
    refit: str | None = None
    distill: bool = False
    distill_trainable: str | None = None

    @property
    def is_calibrated_variant(self) -> bool:
        """The ``calibrated`` rule with a limited or distilled refit."""
        return self.plan_fuse == "calibrated" and (self.refit is not None or self.distill)


#: SLEB scores every remaining block at every step (layers² forward passes); for language
#: models this budget (2 windows of 64 tokens) took 80-380 s on CPU.
SLEB_BUDGET = Budget(windows=2, tokens=64)

_ACTIVATIONS = dict(needs_calibration=True, needs_activations=True, source_kinds=(PYTORCH, CHECKPOINT))

SELECTION_REGISTRY: dict[str, Selection] = {s.name: s for s in (
    Selection("similarity", "fuse the blocks (or layers) whose weights are most alike (no data needed)",
              _selection.similarity, needs_calibration=False, needs_activations=False, source_kinds=(PYTORCH, ONNX, CHECKPOINT),
              modes=("merge", "tie"), target_kinds=("blocks", "params"), plan=make_plan,
              parameters=("metric", "scope")),
    Selection("block_influence", "drop the blocks that change their input least (ShortGPT's Block Influence)",
              _selection.block_influence, **_ACTIVATIONS),
    Selection("angular", "drop the contiguous run whose input and output are closest in angle (Gromov et al.)",
              _selection.angular, **_ACTIVATIONS),
    Selection("sleb", "greedily drop the block whose removal raises the calibration loss least (SLEB)",
              _selection.sleb, budget=SLEB_BUDGET, **_ACTIVATIONS),
)}

_ANY = (PYTORCH, ONNX, CHECKPOINT)
_TORCH = (PYTORCH, CHECKPOINT)

FUSION_RULE_REGISTRY: dict[str, FusionRule] = {r.name: r for r in (
    FusionRule("remove", "keep one block of each run, delete the rest", "remove", needs_calibration=False,
               source_kinds=_ANY),
    FusionRule("mean", "average the run's weights", "mean", needs_calibration=False, source_kinds=_ANY),
    FusionRule("aligned-mean", "average the run's weights after neuron alignment", "mean", needs_calibration=False,
               source_kinds=_ANY, align=True),
    FusionRule("calibrated", "keep one block and refit its output projection on calibration data", "calibrated",
               needs_calibration=True, source_kinds=_TORCH),
    FusionRule("calibrated-map", "the calibrated refit limited to a square map on the projection's output (ReplaceMe)",
               "calibrated", needs_calibration=True, source_kinds=_TORCH, refit="map"),
    FusionRule("calibrated-distill", "the calibrated refit, then its maps (and the blocks around each cut) trained by "
               "logit distillation from the original", "calibrated", needs_calibration=True, source_kinds=_TORCH,
               distill=True, distill_trainable=DEFAULT_TRAINABLE),
    FusionRule("calibrated-map-distill", "the square-map refit, then the maps trained by logit distillation from the original",
               "calibrated", needs_calibration=True, source_kinds=_TORCH, refit="map", distill=True, distill_trainable="maps"),
)}


def selection(name: str) -> Selection:
    """The registry entry of selection ``name``; one line naming the choices otherwise."""
    entry = SELECTION_REGISTRY.get(name)
    if entry is None:
        raise LfgraphError(f"unknown selection {name!r}: choose one of {', '.join(SELECTION_REGISTRY)}")
    return entry


def fusion_rule(name: str) -> FusionRule:
    """The registry entry of fusion rule ``name``; one line naming the choices otherwise."""
    entry = FUSION_RULE_REGISTRY.get(name)
    if entry is None:
        raise LfgraphError(f"unknown fusion rule {name!r}: choose one of {', '.join(FUSION_RULE_REGISTRY)}")
    return entry


def choices_help(what: str, registry: dict[str, Any]) -> str:
    """An option's help: ``what``, then each entry's name and line (``%`` escaped for argparse)."""
    text = what + ": " + "; ".join(f"{e.name}: {e.description}" for e in registry.values())
    return text.replace("%", "%%")
