"""The CLI end to end on a tiny Hugging Face model folder, and its handling of bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lfgraph.cli import main


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_analyze_prints_groups_and_ranked_pairs(tiny_llama_folder, capsys):
    assert main(["analyze", str(tiny_llama_folder), "--metric", "ca", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 blocks (6 with identity skip)" in out
    assert "linear:mlp.down_proj:64x128" in out
    assert out.count("  ~  ") == 6  # 3 layer pairs + 3 block pairs


@pytest.mark.slow
def test_plan_compress_verify_end_to_end(tiny_llama_folder, tmp_path, capsys):
    before = _digest(tiny_llama_folder)
    plan_path = tmp_path / "plan.json"
    args = ["plan", str(tiny_llama_folder), "--target", "0.34", "--select", "similarity", "--fuse", "aligned-mean",
            "--metric", "bures", "--scope", "adjacent", "-o", str(plan_path)]
    assert main(args) == 0
    plan = json.loads(plan_path.read_text())
    assert plan["mode"] == "merge" and plan["fuse"] == "mean"
    assert sum(len(f["absorb"]) for f in plan["fusions"]) == 2
    # the same options give a byte-identical plan
    again = tmp_path / "plan2.json"
    assert main(args[:-1] + [str(again)]) == 0
    assert again.read_bytes() == plan_path.read_bytes()

    out = tmp_path / "small.onnx"
    log = tmp_path / "rewrite.json"
    capsys.readouterr()
    assert main(["compress", str(tiny_llama_folder), "--plan", str(plan_path), "-o", str(out), "--log", str(log), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "blocks" in table and "6" in table and "4" in table
    assert "✓ the file computes what the rewritten model computes" in table and "quality vs the original" in table
    assert json.loads(log.read_text())[0]["pass_name"] == "merge"
    assert main(["verify", str(out), str(tiny_llama_folder)]) == 0
    assert "✓ logits" in capsys.readouterr().out
    assert _digest(tiny_llama_folder) == before  # the input is never modified


@pytest.mark.slow
def test_compress_with_calibrated_default_recipe(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "cal.onnx"
    assert main(["compress", str(tiny_llama_folder), "--target", "0.34", "-o", str(out), "--quiet",
                 "--calibration-windows", "4", "--calibration-seq-len", "32"]) == 0
    table = capsys.readouterr().out
    assert "select block_influence" in table and "fuse calibrated" in table and "[default for causal-lm models]" in table
    assert "✓ the file computes what the rewritten model computes" in table and "quality vs the original" in table


@pytest.mark.slow
def test_tie_mode_on_an_encoder(tiny_bert_folder, tmp_path, capsys):
    out = tmp_path / "bert.onnx"
    assert main(["compress", str(tiny_bert_folder), "--mode", "tie", "--target", "0.2", "--target-kind", "params",
                 "--scope", "global", "-o", str(out), "--quiet"]) == 0
    assert "✓ the file computes what the rewritten model computes" in capsys.readouterr().out


def _one_line_error(capsys, code, match):
    err = capsys.readouterr().err.strip()
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("lfgraph: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert match in errors[0]


def test_the_study_is_its_own_command(capsys):
    _one_line_error(capsys, main(["study", "cnn"]), "lfgraph-study")


def test_missing_model_path(capsys, tmp_path):
    _one_line_error(capsys, main(["analyze", str(tmp_path / "nope")]), "not found")


def test_folder_that_is_not_a_model(capsys, tmp_path):
    _one_line_error(capsys, main(["analyze", str(tmp_path)]), "neither a Hugging Face model folder")


@pytest.mark.parametrize("target", ["0", "1.2", "-0.5"])
def test_target_out_of_range(tiny_llama_folder, capsys, target):
    _one_line_error(capsys, main(["plan", str(tiny_llama_folder), "--select", "similarity", "--target", target]), "out of range")


def test_output_folder_missing(tiny_llama_folder, capsys, tmp_path):
    code = main(["compress", str(tiny_llama_folder), "-o", str(tmp_path / "no" / "x.onnx"), "--quiet"])
    _one_line_error(capsys, code, "does not exist")


def test_plan_for_another_model_is_refused(tiny_llama_folder, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema_version": 1, "mode": "merge", "fuse": "mean", "fusions": [],
                                "provenance": {"model_fingerprint": "0123456789abcdef"}}))
    code = main(["compress", str(tiny_llama_folder), "--plan", str(plan), "-o", str(tmp_path / "x.onnx"), "--quiet"])
    _one_line_error(capsys, code, "fingerprint")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_interrupted_compress_leaves_no_output(tiny_llama_folder, tmp_path, monkeypatch, capsys):
    import lfgraph.export as export

    out = tmp_path / "x.onnx"
    out.write_bytes(b"old result")

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.onnx, "save_model", crash)
    assert main(["compress", str(tiny_llama_folder), "--select", "similarity", "--fuse", "remove", "-o", str(out), "--quiet", "--overwrite"]) == 130
    assert out.read_bytes() == b"old result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]
