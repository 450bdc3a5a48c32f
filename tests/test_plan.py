"""Plans that no rewrite can apply as written are refused when they are read (every path
reads them through ``FusionPlan.from_json``) and again when they are matched to a model
(``FusionPlan.check_matches``, called by every rewrite), naming the fusion in the plan's
words; a binary file given as a plan is one line too."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from lfgraph import models, pipeline  # noqa: F401  (imported before no_loading patches load_model)
from lfgraph.cli import main
from lfgraph.errors import LfgraphError
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.passes.rewrite_torch import apply_plan
from lfgraph.plan import Fusion, FusionPlan

import tiny_models as zoo
from cli_checks import one_line

L = "model.model.layers"


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def _plan_json(fusions, mode="merge", fuse="remove"):
    return json.dumps({"schema_version": 1, "mode": mode, "fuse": fuse, "provenance": {},
                       "fusions": [{"keep": k, "absorb": a, "unit": "block"} for k, a in fusions]})


@pytest.mark.parametrize("fusions,match", [
    ([(f"{L}.1", [f"{L}.2"]), (f"{L}.3", [f"{L}.2"])], f"fusions[1] names block {L}.2, which fusions[0] already names"),
    ([(f"{L}.1", [f"{L}.2"]), (f"{L}.2", [f"{L}.3"])], f"fusions[1] names block {L}.2, which fusions[0] already names"),
    ([(f"{L}.1", [f"{L}.2"]), (f"{L}.1", [f"{L}.2"])], "fusions[1] repeats fusions[0]"),
    ([(f"{L}.1", [f"{L}.2"]), (f"{L}.4", [f"{L}.5", f"{L}.4"])], f"fusions[1] absorbs its own kept block {L}.4"),
    ([(f"{L}.1", [f"{L}.2", f"{L}.2"])], f"fusions[0] absorbs {L}.2 twice"),
    ([(f"{L}.1", [])], "fusions[0] absorbs no block"),
])
def test_plans_that_cannot_be_applied_are_refused_before_loading(tiny_llama_folder, tmp_path, capsys, no_loading, fusions, match):
    before = _digest(tiny_llama_folder)
    plan = tmp_path / "plan.json"
    plan.write_text(_plan_json(fusions))
    out = tmp_path / "out.onnx"
    one_line(capsys, main(["compress", str(tiny_llama_folder), "--plan", str(plan), "-o", str(out)]), match)
    assert _digest(tiny_llama_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # nothing written beside the output


@pytest.mark.parametrize("flags", [["--select", "angular"], ["--fuse", "remove", "--metric", "kl"], ["--stream", "--scope", "global"]])
def test_planning_options_beside_a_plan_are_refused_not_ignored(tiny_llama_folder, tmp_path, capsys, no_loading, flags):
    """A plan from file says which blocks fuse and how; --select/--fuse/--metric/--scope would
    be ignored beside it, on either path (issue 27): one line naming them, before loading."""
    plan = tmp_path / "plan.json"
    plan.write_text(_plan_json([(f"{L}.1", [f"{L}.2"])]))
    named = [f for f in flags if f != "--stream" and f.startswith("--")]
    err = one_line(capsys, main(["compress", str(tiny_llama_folder), "--plan", str(plan), "-o", str(tmp_path / "o"), *flags]),
                   "the plan from file already says which blocks fuse and how")
    assert all(f in err for f in named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


@pytest.mark.parametrize("command", ["plan", "compress"])
def test_metric_or_scope_for_a_selection_that_does_not_take_them_is_refused(tiny_llama_folder, tmp_path, capsys, command):
    """--metric/--scope belong to --select similarity; with another selection they would be
    ignored (issue 27): one line naming the selection that takes them, nothing written."""
    out = tmp_path / "o"
    err = one_line(capsys, main([command, str(tiny_llama_folder), "--select", "angular", "--metric", "kl", "-o", str(out)]),
                   "--metric applies to --select similarity only, and --select is angular")
    assert "drop --metric" in err and not out.exists()


def test_a_block_the_model_does_not_have_is_named(tiny_llama_folder, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(_plan_json([(f"{L}.1", [f"{L}.9"])]))
    one_line(capsys, main(["compress", str(tiny_llama_folder), "--plan", str(plan), "-o", str(tmp_path / "o.onnx"), "--quiet"]),
             f"fusions[0] names block '{L}.9', which this model does not have")
    assert not (tmp_path / "o.onnx").exists()


def test_a_plan_absorbing_its_kept_block_never_removes_it():
    """Before: keep 1, absorb [1, 2] removed blocks 1 and 2 (a model one block too shallow,
    exit 0). A plan built in code, never read from JSON, is checked by the rewrite itself."""
    model = zoo.randomize_batchnorm(zoo.ResNetCNN(stages=((8, 4),)))
    g = build_layer_graph(model, (torch.randn(2, 3, 16, 16),))
    blocks = [b.name for b in g.removable_blocks()]
    plan = FusionPlan([Fusion(keep=blocks[0], absorb=[blocks[0], blocks[1]])], mode="merge", fuse="remove")
    with pytest.raises(LfgraphError, match=rf"fusions\[0\] absorbs its own kept block {blocks[0]}"):
        apply_plan(model, g, plan)
    ok = FusionPlan([Fusion(keep=blocks[0], absorb=[blocks[1]])], mode="merge", fuse="remove")
    assert len(apply_plan(model, g, ok).model.get_submodule(blocks[0].rpartition(".")[0])) == len(blocks) - 1


def test_layer_names_of_a_tie_plan_are_matched_too():
    model = zoo.MLP()
    g = build_layer_graph(model, (torch.randn(2, 16),))
    plan = FusionPlan([Fusion(keep=g.nodes[1].name, absorb=["net.99"], unit="layer", align=False)], mode="tie")
    with pytest.raises(LfgraphError, match=r"fusions\[0\] names layer 'net.99'"):
        apply_plan(model, g, plan)


@pytest.mark.parametrize("content", ["random", "safetensors"])
def test_a_binary_file_given_as_plan_is_one_line(tiny_llama_folder, tmp_path, capsys, no_loading, content):
    plan = tmp_path / "plan.json"
    plan.write_bytes(os.urandom(4096) if content == "random" else (tiny_llama_folder / "model.safetensors").read_bytes())
    one_line(capsys, main(["compress", str(tiny_llama_folder), "--plan", str(plan), "-o", str(tmp_path / "o.onnx")]),
             f"plan file {plan} is not a text file")


def test_a_safetensors_header_small_enough_to_read_as_text_is_not_a_plan(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(f))  # header length < 128: its 8 bytes are valid UTF-8 (NULs)
    f.read_bytes().decode("utf-8")
    with pytest.raises(LfgraphError, match="is not a text file"):
        FusionPlan.load(f)
