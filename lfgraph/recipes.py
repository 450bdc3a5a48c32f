"""The vocabulary of a compression recipe, and the default recipe per model family.

One word for one idea, the same in code, CLI, README and plan JSON:

- **mode**: what the rewrite does to the graph: ``merge`` (depth reduction: a run of
  blocks becomes one block) or ``tie`` (*sharing*: fused layers read one weight; depth
  stays).
- **selection** (``--select``): which blocks or layers are fused: by weight similarity
  (the paper's measures) or by activations (Block Influence, angular distance, SLEB).
- **fusion rule** (``--fuse``, plan key ``fuse``): how a fused run becomes one block:
  ``remove`` (keep one, delete the rest), ``mean`` (average), ``aligned-mean`` (average
  after neuron alignment), ``calibrated`` (keep one and refit its output projection on
  calibration data), ``calibrated-map`` (the same refit limited to a square map on the
  projection's output, ReplaceMe's capacity; plan ``fuse: calibrated``, ``refit: map``);
  ``calibrated-distill`` and ``calibrated-map-distill`` add a second stage: a square map on
  each refitted projection trained by logit distillation from the original on the
  calibration windows plus windows the original samples from calibration prompts (plan
  ``distill_steps: N``, ``distill_sampled_windows: K``, ``distill_trainable: maps``,
  ``neighbors``: also the blocks around each cut, or ``blocks``: also every block;
  ``--distill-trainable`` chooses).
- **retraining mode** (``lfgraph.retrain``): how tied layers train during healing
  (the paper's mean, freeze, mix): a different idea from the fusion rule, with its own name.
"""

from __future__ import annotations

from typing import Any

from .errors import LfgraphError
from .passes.map_distillation import DEFAULT_SAMPLED_WINDOWS, DEFAULT_STEPS, DISTILL_TRAINABLE
from .registry import FUSION_RULE_REGISTRY, SELECTION_REGISTRY, fusion_rule

#: Selection criteria: weight similarity (the paper) and activation-based ones
#: (:data:`lfgraph.registry.SELECTION_REGISTRY` says what each needs).
SELECTIONS = tuple(SELECTION_REGISTRY)
#: Fusion rules as the CLI names them (``aligned-mean`` is ``mean`` with neuron alignment).
FUSION_RULES = tuple(FUSION_RULE_REGISTRY)
#: Fusion rules that are the ``calibrated`` rule with a limited or distilled refit.
CALIBRATED_VARIANTS = tuple(r.name for r in FUSION_RULE_REGISTRY.values() if r.is_calibrated_variant)
#: Selections that need calibration data (activations).
ACTIVATION_SELECTIONS = tuple(s.name for s in SELECTION_REGISTRY.values() if s.needs_activations)

#: The default (selection, fusion rule) per model family, from the measurements in README
#: ("Depth reduction") and docs/study: the ResNet-style CNN does best with Block Influence
#: selection and the calibrated refit. BERT-style encoders are post-LayerNorm, which the
#: refit refuses, so they get ShortGPT-style deletion. Without calibration data only
#: weight similarity can select, and deleting the selected blocks beat averaging them on
#: both measured models. Causal LMs depend on the target: see ``CAUSAL_LM_BANDS``.
DEFAULT_RECIPES = {
    "causal-lm": ("block_influence", "calibrated-distill"),
    "encoder": ("block_influence", "remove"),
    "vision": ("block_influence", "calibrated"),
    "generic": ("similarity", "remove"),
}
#: Causal LMs by the fraction of blocks removed: (largest fraction, (selection, fusion
#: rule)), first match wins. Measured on SmolLM2-135M (docs/study): angular selection (one
#: contiguous run) is best up to 20% and at 50%, where Block Influence's scattered blocks
#: collapse; Block Influence is best at 30%. The full refit beats the square map at every
#: level, and the distilled map improves on the closed form at every level measured
#: (more so with windows sampled from the original added to its training windows).
CAUSAL_LM_BANDS = (
    (0.2, ("angular", "calibrated-distill")),
    (0.35, ("block_influence", "calibrated-distill")),
    (1.0, ("angular", "calibrated-distill")),
)
#: ONNX sources carry no activations lfgraph can compute from PyTorch: weights only.
ONNX_RECIPE = ("similarity", "aligned-mean")


def default_recipe(family: str, mode: str, has_data: bool, target: float | None = None, target_kind: str = "blocks",
                   architecture: Any = None) -> tuple[str, str]:
    """(selection, fusion rule) used when the user names neither.

    ``has_data``: calibration data is at hand (text for language models, samples for
    others). ``tie`` always shares the mean weight: that is what tying means. Causal LMs
    with a target in blocks get the recipe of their band in ``CAUSAL_LM_BANDS``. An
    ``architecture`` (:mod:`lfgraph.architectures`) whose ``default_fuse`` is set replaces
    the fusion rule of a data-driven recipe (a family the task's default cannot run on).
    """
    select, fuse = _task_recipe(family, mode, has_data, target, target_kind)
    if mode == "merge" and has_data and getattr(architecture, "default_fuse", None):
        fuse = architecture.default_fuse
    return select, fuse


def _task_recipe(family: str, mode: str, has_data: bool, target: float | None, target_kind: str) -> tuple[str, str]:
    if mode == "tie":
        return "similarity", "mean"
    if family == "onnx":
        return ONNX_RECIPE
    if not has_data:
        return DEFAULT_RECIPES["generic"]
    if family == "causal-lm" and target is not None and target_kind == "blocks":
        for upper, recipe in CAUSAL_LM_BANDS:
            if target <= upper + 1e-9:
                return recipe
    return DEFAULT_RECIPES.get(family, DEFAULT_RECIPES["generic"])


def distills(plan: Any) -> bool:
    """Whether applying ``plan`` trains (a ``-distill`` rule: its provenance records steps)."""
    return plan.fuse == "calibrated" and int(plan.provenance.get("distill_steps", 0) or 0) > 0


def split_fusion_rule(rule: str) -> tuple[str, bool]:
    """The plan's (``fuse``, ``align``) for a CLI fusion rule (``calibrated-map`` and
    ``calibrated-distill`` are ``calibrated`` with ``refit``/``distill_steps`` in the plan's
    provenance, see :func:`refit_provenance`)."""
    entry = FUSION_RULE_REGISTRY.get(rule)
    return (entry.plan_fuse, entry.align) if entry is not None else (rule, False)


def describe(mode: str, select: str, fuse: str, metric: str, scope: str, is_default: bool, family: str) -> str:
    """One line naming the recipe, as the report prints it."""
    text = f"mode {mode}, select {select}"
    entry = SELECTION_REGISTRY.get(select)
    if entry is not None and entry.parameters:  # the options it takes (similarity's metric and scope)
        text += f" ({metric}, {scope})"
    text += f", fuse {fuse}"
    if is_default:
        text += " [default for tie]" if mode == "tie" else f" [default for {family} models]"
    return text


def refit_provenance(rule: str, distill_trainable: str | None = None) -> dict[str, object]:
    """What a plan's provenance records for a calibrated variant (empty for other rules).
    ``distill_trainable`` replaces the rule's own trainable set (``-distill`` rules only)."""
    entry = FUSION_RULE_REGISTRY.get(rule)
    if entry is None:  # a plan file's own fuse (remove, mean, calibrated): nothing to add
        entry = fusion_rule("remove")
    if distill_trainable is not None and not entry.distill:
        distilling = ", ".join(r.name for r in FUSION_RULE_REGISTRY.values() if r.distill)
        raise LfgraphError(f"--distill-trainable applies to the distilling rules ({distilling}), not --fuse {rule}")
    if distill_trainable is not None and distill_trainable not in DISTILL_TRAINABLE:
        raise LfgraphError(f"--distill-trainable must be one of {list(DISTILL_TRAINABLE)}, got {distill_trainable!r}")
    out: dict[str, object] = {}
    if entry.refit is not None:
        out["refit"] = entry.refit
    if entry.distill:
        out["distill_steps"] = DEFAULT_STEPS
        out["distill_sampled_windows"] = DEFAULT_SAMPLED_WINDOWS
        # the map-only rule keeps ReplaceMe's capacity in its second stage too
        out["distill_trainable"] = distill_trainable or entry.distill_trainable
    return out
