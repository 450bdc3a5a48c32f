"""The typed registries of selections and fusion rules: what the CLI offers is what they
hold, each entry declares what it needs, and the code that used to compare names reads them."""

from __future__ import annotations

import pytest
import torch

from lfgraph import cli, recipes, registry
from lfgraph.errors import LfgraphError
from lfgraph.passes import selection as selection_pass
from lfgraph.plan import FUSE_RULES
from lfgraph.registry import FUSION_RULE_REGISTRY, SELECTION_REGISTRY


def _choices(command: str, option: str) -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    action = next(a for a in sub._actions if option in a.option_strings)
    return list(action.choices), action.help


@pytest.mark.parametrize("command", ["plan", "compress", "heal"])
def test_cli_choices_and_help_are_the_registries(command):
    for option, reg in (("--select", SELECTION_REGISTRY), ("--fuse", FUSION_RULE_REGISTRY)):
        choices, help_text = _choices(command, option)
        assert choices == list(reg)
        assert all(f"{e.name}: {e.description}" in help_text.replace("%%", "%") for e in reg.values())


def test_the_vocabulary_tuples_are_the_registries():
    assert recipes.SELECTIONS == tuple(SELECTION_REGISTRY)
    assert recipes.FUSION_RULES == tuple(FUSION_RULE_REGISTRY)
    assert set(recipes.ACTIVATION_SELECTIONS) == {"block_influence", "angular", "sleb"}
    assert set(recipes.CALIBRATED_VARIANTS) == {"calibrated-map", "calibrated-distill", "calibrated-map-distill"}


def test_every_selection_declares_its_needs():
    for name, s in SELECTION_REGISTRY.items():
        assert s.name == name and s.description and "\n" not in s.description
        assert s.source_kinds and set(s.source_kinds) <= {registry.PYTORCH, registry.ONNX, registry.CHECKPOINT}
        assert s.modes and set(s.modes) <= {"merge", "tie"} and set(s.target_kinds) <= {"blocks", "params"}
        assert callable(s.runs) and s.runs is selection_pass.SELECTORS[name]  # the pass that selects
        # activations are computed from the PyTorch model, and need calibration data
        assert s.needs_activations == (s.source_kinds == (registry.PYTORCH, registry.CHECKPOINT))
        assert not s.needs_activations or s.needs_calibration
        # a selection that reads no activations plans the whole graph (tie and ONNX too)
        assert (s.plan is None) == s.needs_activations
        # --metric/--scope are the weight planner's options; the report names them where they applied
        assert s.parameters == (("metric", "scope") if s.plan is not None else ())
        line = recipes.describe("merge", name, "remove", "bures", "adjacent", False, "vision")
        assert ("(bures, adjacent)" in line) == bool(s.parameters)
    assert set(SELECTION_REGISTRY) == set(selection_pass.SELECTORS)


def test_sleb_budget_is_the_products_and_trims_language_model_calibration():
    budget = SELECTION_REGISTRY["sleb"].budget
    assert (budget.windows, budget.tokens) == (2, 64)
    assert all(s.budget is None for n, s in SELECTION_REGISTRY.items() if n != "sleb")
    from lfgraph import pipeline

    assert (pipeline.SLEB_WINDOWS, pipeline.SLEB_TOKENS) == (2, 64)
    ids = torch.zeros(16, 256, dtype=torch.long)
    assert tuple(budget.trim(ids).shape) == (2, 64)
    images = torch.zeros(8, 3, 4, 4)  # not token windows: used as given
    assert budget.trim(images) is images


def test_every_fusion_rule_declares_its_needs_and_its_plan_fields():
    for name, r in FUSION_RULE_REGISTRY.items():
        assert r.name == name and r.description
        assert r.plan_fuse in FUSE_RULES
        assert recipes.split_fusion_rule(name) == (r.plan_fuse, r.align)
        # the calibrated refit reads activations: calibration data, a model in memory or a checkpoint block by block
        assert r.needs_calibration == (r.plan_fuse == "calibrated")
        torch_kinds = (registry.PYTORCH, registry.CHECKPOINT)
        assert r.source_kinds == (torch_kinds if r.needs_calibration else (registry.PYTORCH, registry.ONNX, registry.CHECKPOINT))
        prov = recipes.refit_provenance(name)
        assert ("refit" in prov) == (r.refit is not None) and ("distill_steps" in prov) == r.distill
        if r.distill:
            assert prov["distill_trainable"] == r.distill_trainable
    # every fusion rule and selection applies to a checkpoint read block by block
    assert all(registry.CHECKPOINT in e.source_kinds for e in [*FUSION_RULE_REGISTRY.values(), *SELECTION_REGISTRY.values()])


def test_recipe_needs_calibration_reads_the_entries():
    from lfgraph.planning import Recipe

    for s in SELECTION_REGISTRY.values():
        for r in FUSION_RULE_REGISTRY.values():
            assert Recipe(s.name, r.name, False, []).needs_calibration == (s.needs_calibration or r.needs_calibration)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(LfgraphError, match="unknown selection 'x': choose one of similarity, block_influence"):
        registry.selection("x")
    with pytest.raises(LfgraphError, match="unknown fusion rule 'y': choose one of remove, mean"):
        registry.fusion_rule("y")
