"""The vocabulary of a compression recipe, and the default recipe per model family.

One word for one idea, the same in code, CLI, README and plan JSON:

- **mode**: what the rewrite does to the graph: ``merge`` (depth reduction: a run of
  blocks becomes one block) or ``tie`` (*sharing*: fused layers read one weight; depth
  stays).
- **selection** (``--select``): which blocks or layers are fused: by weight similarity
  (the paper's measures) or by activations (Block Influence, angular distance, SLEB).
- **fusion rule** (``--fuse``, plan key ``fuse``): how a fused run becomes one block:
  ``remove`` (keep one, delete the rest), ``mean`` (average), ``aligned-mean`` (average
  after neuron alignment) or ``calibrated`` (keep one and refit it on calibration data).
- **retraining mode** (``lfgraph.retrain``): how tied layers train during healing
  (the paper's mean, freeze, mix): a different idea from the fusion rule, with its own name.
"""

from __future__ import annotations

#: Selection criteria: weight similarity (the paper) and activation-based ones.
SELECTIONS = ("similarity", "block_influence", "angular", "sleb")
#: Fusion rules as the CLI names them (``aligned-mean`` is ``mean`` with neuron alignment).
FUSION_RULES = ("remove", "mean", "aligned-mean", "calibrated")
#: Selections that need calibration data (activations).
ACTIVATION_SELECTIONS = ("block_influence", "angular", "sleb")

#: The default (selection, fusion rule) per model family, from the measurements in README
#: ("Depth reduction"): causal LMs and the ResNet-style CNN do best with Block Influence
#: selection and the calibrated refit. BERT-style encoders are post-LayerNorm, which the
#: refit refuses, so they get ShortGPT-style deletion. Without calibration data only
#: weight similarity can select, and deleting the selected blocks beat averaging them on
#: both measured models.
DEFAULT_RECIPES = {
    "causal-lm": ("block_influence", "calibrated"),
    "encoder": ("block_influence", "remove"),
    "vision": ("block_influence", "calibrated"),
    "generic": ("similarity", "remove"),
}
#: ONNX sources carry no activations lfgraph can compute from PyTorch: weights only.
ONNX_RECIPE = ("similarity", "aligned-mean")


def default_recipe(family: str, mode: str, has_data: bool) -> tuple[str, str]:
    """(selection, fusion rule) used when the user names neither.

    ``has_data``: calibration data is at hand (text for language models, samples for
    others). ``tie`` always shares the mean weight: that is what tying means.
    """
    if mode == "tie":
        return "similarity", "mean"
    if family == "onnx":
        return ONNX_RECIPE
    recipe = DEFAULT_RECIPES.get(family, DEFAULT_RECIPES["generic"])
    return recipe if has_data else DEFAULT_RECIPES["generic"]


def split_fusion_rule(rule: str) -> tuple[str, bool]:
    """The plan's (``fuse``, ``align``) for a CLI fusion rule."""
    return ("mean", True) if rule == "aligned-mean" else (rule, False)


def describe(mode: str, select: str, fuse: str, metric: str, scope: str, is_default: bool, family: str) -> str:
    """One line naming the recipe, as the report prints it."""
    text = f"mode {mode}, select {select}"
    if select == "similarity":
        text += f" ({metric}, {scope})"
    text += f", fuse {fuse}"
    if is_default:
        text += " [default for tie]" if mode == "tie" else f" [default for {family} models]"
    return text

