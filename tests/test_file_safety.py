"""A user's files are never lost, and bad input is refused before it does harm (issue 19).

Every case checks what a user would: the exit code, one line on stderr (no traceback), the
inputs byte for byte afterwards, and nothing left beside the output.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from lfgraph import fileio
from lfgraph.cli import main

from cli_checks import one_line as _one_line

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--select", "similarity", "--fuse", "remove", "--eval-windows", "0", "--quiet"]


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def _staging_left(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if fileio.STAGING in p.name]


@pytest.fixture
def model_copy(tiny_llama_folder, tmp_path) -> Path:
    """A tiny Llama folder the test may point outputs at (its digest is checked after)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_folder, folder)
    return folder


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("case", ["output is the input folder", "output inside the input folder", "output contains the input"])
def test_output_that_would_touch_the_input_is_refused(model_copy, tmp_path, capsys, case):
    out = {"output is the input folder": model_copy, "output inside the input folder": model_copy / "small",
           "output contains the input": tmp_path}[case]
    before = _digest(model_copy)
    line = _one_line(capsys, main(["compress", str(model_copy), "-o", str(out), *FAST]), "input")
    assert "-o" in line
    assert _digest(model_copy) == before and not (model_copy / "small").exists()


def test_log_and_plan_onto_an_input_are_refused(model_copy, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", str(model_copy), "--select", "similarity", "--fuse", "remove", "-o", str(plan)]) == 0
    capsys.readouterr()
    before = plan.read_bytes()
    _one_line(capsys, main(["compress", str(model_copy), "--plan", str(plan), "--log", str(plan), "-o", str(tmp_path / "o.onnx"), "--quiet"]), "--log")
    _one_line(capsys, main(["plan", str(model_copy), "-o", str(model_copy / "config.json")]), "inside the input")
    text = tmp_path / "cal.txt"
    text.write_text("some text " * 50)
    _one_line(capsys, main(["plan", str(model_copy), "--calibration-text", str(text), "-o", str(text)]), "is an input")
    assert plan.read_bytes() == before and text.read_text() == "some text " * 50


@pytest.mark.slow
def test_foreign_output_folder_needs_overwrite_and_keeps_the_users_other_files(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "model.onnx").write_bytes(b"my own model")
    before = _digest(out)
    _one_line(capsys, main(["compress", str(tiny_llama_folder), "-o", str(out), *FAST]), "--overwrite")
    assert _digest(out) == before
    # with --overwrite only the files lfgraph writes are replaced
    assert main(["compress", str(tiny_llama_folder), "-o", str(out), *FAST, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "model.onnx").read_bytes() != b"my own model" and fileio.written_by_lfgraph(out / "model.onnx")
    marker = json.loads((out / fileio.MARKER).read_text())
    assert "model.onnx" in marker["files"] and "notes.txt" not in marker["files"]
    assert not _staging_left(tmp_path)
    # lfgraph's own folder is replaced again without --overwrite, the user's file still kept
    assert main(["compress", str(tiny_llama_folder), "-o", str(out), *FAST]) == 0
    assert (out / "notes.txt").read_text() == "my notes"


def test_foreign_output_files_need_overwrite(tiny_llama_folder, tmp_path, capsys):
    for name in ("o.onnx", "log.json", "page.html"):
        (tmp_path / name).write_text("the user's file")
    args = ["compress", str(tiny_llama_folder), "-o", str(tmp_path / "o.onnx"), *FAST]
    _one_line(capsys, main(args), "-o")
    (tmp_path / "o.onnx").unlink()
    _one_line(capsys, main(args + ["--log", str(tmp_path / "log.json")]), "--log")
    _one_line(capsys, main(args + ["--report", str(tmp_path / "page.html")]), "--report")
    assert (tmp_path / "log.json").read_text() == (tmp_path / "page.html").read_text() == "the user's file"


@pytest.mark.slow
def test_lfgraphs_own_outputs_are_replaced_without_overwrite(tiny_llama_folder, tmp_path):
    """lfgraph's own outputs (ONNX, log, page) are recognised and replaced on the next run
    without --overwrite."""
    args = ["compress", str(tiny_llama_folder), "-o", str(tmp_path / "o.onnx"), *FAST]
    full = args + ["--log", str(tmp_path / "log.json"), "--report", str(tmp_path / "page.html")]
    assert main(full) == 0
    assert all(fileio.written_by_lfgraph(tmp_path / n) for n in ("o.onnx", "log.json", "page.html"))
    assert main(full) == 0


def test_heal_output_onto_an_existing_file_is_refused(tiny_llama_folder, tmp_path, capsys):
    f = tmp_path / "result"
    f.write_text("keep me")
    _one_line(capsys, main(["heal", str(tiny_llama_folder), "-o", str(f), "--steps", "1"]), "existing file")
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_output_folders_that_cannot_be_written_are_refused_before_loading(tiny_llama_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lfgraph.sources.load_model", lambda *a, **k: pytest.fail("loaded before the output check"))
    parent_is_file = tmp_path / "file"
    parent_is_file.write_text("x")
    _one_line(capsys, main(["compress", str(tiny_llama_folder), "-o", str(parent_is_file / "o.onnx"), *FAST]), "is a file")
    # /proc refuses new files even to root, for whom permission bits mean nothing
    _one_line(capsys, main(["compress", str(tiny_llama_folder), "-o", "/proc/o.onnx", *FAST]), "cannot write")


# --------------------------------------------------------------------------- signals and staging


@pytest.mark.parametrize("target", ["lfgraph.sources.TorchSource.graph", "lfgraph.sources.TorchSource.rewrite",
                                    "lfgraph.sources.TorchSource.write",
                                    pytest.param("lfgraph.outputs.alternating_latency", marks=pytest.mark.slow)])
def test_sigterm_at_each_stage_leaves_nothing(tiny_llama_folder, tmp_path, capsys, monkeypatch, target):
    def terminate(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        pytest.fail("SIGTERM did not interrupt")

    monkeypatch.setattr(target, terminate)
    code = main(["compress", str(tiny_llama_folder), "-o", str(tmp_path / "o.onnx"), *FAST])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM and "SIGTERM" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the CLI's only while it runs


@pytest.mark.slow
def test_sigterm_to_a_real_process_while_it_writes(tiny_llama_folder, tmp_path):
    out = tmp_path / "deploy"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lfgraph.cli", "compress", str(tiny_llama_folder), "-o", str(out), *FAST],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not _staging_left(tmp_path):
        time.sleep(0.02)
    assert proc.poll() is None, "finished before its staging folder was seen"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == [], (err, list(tmp_path.iterdir()))


@pytest.mark.slow
def test_stale_staging_of_a_killed_run_is_removed_next_time(tiny_llama_folder, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f".o.onnx{fileio.STAGING}{dead.pid}-0000abcd"
    stale.mkdir()
    (stale / "o.onnx").write_bytes(b"x" * 1000)
    alive = tmp_path / f".o.onnx{fileio.STAGING}{os.getppid()}-0000beef"  # a live process's: left alone
    alive.mkdir()
    assert main(["compress", str(tiny_llama_folder), "-o", str(tmp_path / "o.onnx"), *FAST]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and f"removed {stale}" in err and "interrupted run" in err
    assert alive.exists()


# --------------------------------------------------------------------------- failed checks


@pytest.mark.slow
def test_failed_export_check_leaves_the_requested_path_alone(tiny_llama_folder, tmp_path, capsys, monkeypatch):
    from lfgraph import outputs
    from lfgraph.onnx_io import read_metadata
    from lfgraph.verify import OutputCheck, VerifyReport

    monkeypatch.setattr(outputs.OnnxFileOutput, "check", lambda *a, **k: VerifyReport(
        provider="test", reference="test", outputs=[OutputCheck("logits", 1.0, 1.0, False, "forced failure")]))
    out = tmp_path / "o.onnx"
    code = main(["compress", str(tiny_llama_folder), "-o", str(out), *FAST])
    table = capsys.readouterr().out
    assert code == 1 and not out.exists()
    failed = tmp_path / "o.failed.onnx"
    assert str(failed) in table and read_metadata(failed)["lfgraph.check"].startswith("FAILED: the file does not compute")


# --------------------------------------------------------------------------- loading


def _broken(tiny_llama_folder: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case.replace(" ", "-")
    shutil.copytree(tiny_llama_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    if case == "config deeper than the weights":
        cfg["num_hidden_layers"] += 2
    elif case == "missing tensor":
        weights.pop("model.layers.2.mlp.up_proj.weight")
    elif case == "intermediate size":
        cfg["intermediate_size"] += 8
    elif case == "missing shard":
        (folder / "model.safetensors").unlink()
        names = sorted(weights)
        half = len(names) // 2
        save_file({k: weights[k] for k in names[:half]}, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return folder
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("case,match", [("config deeper than the weights", "missing from the checkpoint"),
                                        ("missing tensor", "model.layers.2.mlp.up_proj.weight"),
                                        ("intermediate size", "mlp.down_proj.weight: checkpoint [64, 128], config [64, 136]"),
                                        ("missing shard", "model-00002-of-00002.safetensors")])
def test_weights_that_disagree_with_the_config_are_refused(tiny_llama_folder, tmp_path, capsys, case, match):
    folder = _broken(tiny_llama_folder, tmp_path, case)
    before = _digest(folder)
    _one_line(capsys, main(["compress", str(folder), "-o", str(tmp_path / "o.onnx"), *FAST]), match)
    assert _digest(folder) == before and not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------- data


def test_binary_text_is_refused_for_calibration_and_healing(tiny_llama_folder, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    _one_line(capsys, main(["compress", str(tiny_llama_folder), "--calibration-text", str(binary), "-o", str(tmp_path / "o.onnx")]), "weights.bin")
    st = tiny_llama_folder / "model.safetensors"
    _one_line(capsys, main(["heal", str(tiny_llama_folder), "--text", str(st), "-o", str(tmp_path / "h"), "--steps", "1"]), "not a UTF-8 text")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text\x00with a NUL")
    _one_line(capsys, main(["plan", str(tiny_llama_folder), "--calibration-text", str(nul)]), "NUL")
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "h").exists()


def test_token_ids_outside_the_vocabulary_are_refused(tiny_llama_folder, tmp_path, capsys):
    vocab = json.loads((tiny_llama_folder / "config.json").read_text())["vocab_size"]
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(4000, dtype=np.int64) % (vocab + 5))
    _one_line(capsys, main(["compress", str(tiny_llama_folder), "--calibration-tokens", str(ids), "--select", "block_influence",
                            "--fuse", "remove", "-o", str(tmp_path / "o.onnx"), "--quiet"]), f"vocabulary of {vocab}")


def test_empty_prompt_is_refused(tmp_path, capsys):
    _one_line(capsys, main(["generate", str(tmp_path), "--prompt", "   "]), "empty")


def test_plan_field_typo_is_named_in_the_plans_words(tiny_llama_folder, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema_version": 1, "mode": "merge", "fuse": "remove",
                                "fusions": [{"keep": "model.layers.1", "absorbs": ["model.layers.2"]}]}))
    line = _one_line(capsys, main(["compress", str(tiny_llama_folder), "--plan", str(plan), "-o", str(tmp_path / "o.onnx")]), "'absorbs'")
    assert "did you mean 'absorb'" in line and "__init__" not in line


def test_resume_without_a_checkpoint_is_an_error(tiny_llama_folder, tmp_path, capsys):
    from lfgraph.retrain.cli import resume_mode

    empty = tmp_path / "ckpt"
    _one_line(capsys, main(["heal", str(tiny_llama_folder), "-o", str(tmp_path / "h"), "--resume", "--checkpoint-dir", str(empty)]),
              "no checkpoint")
    _one_line(capsys, main(["compress", str(tiny_llama_folder), "-o", str(tmp_path / "o.onnx"), "--heal", "2", "--heal-resume",
                            "--heal-checkpoint-dir", str(empty)]), "--heal-resume")
    assert resume_mode(False, True, str(empty)) is False  # --resume-if-present: start afresh
    empty.mkdir()
    (empty / "heal-checkpoint.pt").write_bytes(b"")
    assert resume_mode(False, True, str(empty)) is True and resume_mode(True, False, str(empty)) is True


# --------------------------------------------------------------------------- numbers


NUMERIC = {
    "compress": ["--target", "--calibration-windows", "--calibration-seq-len", "--eval-windows", "--eval-seq-len",
                 "--max-quality-loss", "--rtol", "--heal", "--heal-lr", "--heal-batch-size", "--heal-seq-len",
                 "--heal-windows", "--heal-eval-every"],
    "plan": ["--target", "--calibration-windows", "--calibration-seq-len"],
    "analyze": ["--top"],
    "heal": ["--steps", "--lr", "--batch-size", "--accumulation", "--seq-len", "--windows", "--temperature",
             "--hidden-weight", "--warmup", "--clip", "--lora-rank", "--eval-every", "--eval-windows",
             "--checkpoint-every", "--seed", "--target"],
    "generate": ["--max-new-tokens"],
    "verify": ["--rtol"],
}


def _argv(command: str, option: str, value: str, folder: Path, tmp: Path) -> list[str]:
    head = {"compress": ["compress", str(folder), "-o", str(tmp / "o.onnx")], "plan": ["plan", str(folder)],
            "analyze": ["analyze", str(folder)], "heal": ["heal", str(folder), "-o", str(tmp / "h")],
            "generate": ["generate", str(tmp), "--prompt", "hi"],
            "verify": ["verify", str(tmp / "o.onnx"), str(folder)]}[command]
    return [*head, f"{option}={value}"]


@pytest.mark.parametrize("command,option", [(c, o) for c, opts in NUMERIC.items() for o in opts])
def test_every_numeric_option_refuses_nan_and_negative_numbers(tiny_llama_folder, tmp_path, capsys, monkeypatch, command, option):
    monkeypatch.setattr("lfgraph.sources.load_model", lambda *a, **k: pytest.fail("loaded before the options were checked"))
    monkeypatch.setattr("lfgraph.models.load_model", lambda *a, **k: pytest.fail("loaded before the options were checked"))
    for value in ("nan", "-1", "inf"):
        _one_line(capsys, main(_argv(command, option, value, tiny_llama_folder, tmp_path)), f"argument {option}")
    assert list(tmp_path.iterdir()) == []


def test_the_same_idea_has_the_same_rule_in_the_api(tiny_llama_folder, tmp_path):
    from lfgraph import pipeline
    from lfgraph.errors import LfgraphError

    for kwargs in ({"rtol": -1.0}, {"max_quality_loss": math.nan}, {"eval_windows": -1}, {"heal_steps": -5}):
        with pytest.raises(LfgraphError, match="out of range"):
            pipeline.compress(str(tiny_llama_folder), tmp_path / "o.onnx", **kwargs)


# --------------------------------------------------------------------------- the README's promises


@pytest.mark.slow
def test_model_without_tokenizer_gets_the_weights_only_recipe(tiny_llama_folder, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_folder / f, folder / f)
    assert main(["compress", str(folder), "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "select similarity" in table and "fuse remove" in table
    assert "no calibration data" in table and "weights-only recipe" in table


def test_visualize_draws_a_compressed_onnx_alone(tiny_llama_folder, tmp_path, capsys):
    onnx_file = tmp_path / "o.onnx"
    assert main(["compress", str(tiny_llama_folder), "-o", str(onnx_file), *FAST]) == 0
    page = tmp_path / "page.html"
    assert main(["visualize", str(onnx_file), "-o", str(page), "--no-heatmaps"]) == 0
    html = page.read_text()
    assert fileio.GENERATOR_TAG in html and "model.layers" in html


def test_gguf_of_an_architecture_transformers_cannot_read(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), arch="notanarch")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = _digest(path)
    _one_line(capsys, main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--quiet"]), "notanarch")
    assert _digest(path) == before and not (tmp_path / "o.onnx").exists()


def test_heal_teacher_and_student_without_tokenizer(tiny_llama_folder, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_folder / f, folder / f)
    _one_line(capsys, main(["heal", str(folder), "--teacher", str(folder), "-o", str(tmp_path / "h"), "--steps", "1"]), "tokenizer")
    assert not (tmp_path / "h").exists()


def test_encoder_with_more_layers_in_its_weights_than_its_config(tiny_bert_folder, tmp_path, capsys):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    (folder / "config.json").write_text(json.dumps(cfg))
    _one_line(capsys, main(["compress", str(folder), "-o", str(tmp_path / "o.onnx"), *FAST]), "not expected by the config")


def test_lfgraphs_signature_is_recognised_and_nothing_else(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import onnx
    from onnx import helper

    from lfgraph.onnx_io import add_metadata
    from lfgraph.passes.base import RewriteLog
    from lfgraph.plan import Fusion, FusionPlan

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    FusionPlan([Fusion("b1", ["b2"])], mode="merge", fuse="remove").save(ours / "plan.json")
    log = RewriteLog()
    log.add("merge", "remove", "b2", ["b1"])
    (ours / "log.json").write_text(log.to_json())
    (theirs / "plan.json").write_text(json.dumps({"fusions": "mine"}))
    (theirs / "log.json").write_text(json.dumps([{"action": "buy milk"}]))
    (ours / "page.html").write_text(f"<html><head>{fileio.GENERATOR_TAG}</head></html>")
    (theirs / "page.html").write_text("<html><head><title>lfgraph notes</title></head></html>")
    for folder, meta in ((ours, fileio.png_metadata()), (theirs, None)):
        fig = plt.figure()
        fig.savefig(folder / "plot.png", metadata=meta)
        plt.close(fig)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    for folder, meta in ((ours, {"lfgraph.version": "0"}), (theirs, {"author": "me"})):
        m = helper.make_model(graph)
        add_metadata(m, meta)
        onnx.save(m, folder / "m.onnx")
    (theirs / "notes.txt").write_text("lfgraph")
    for name in ("plan.json", "log.json", "page.html", "plot.png", "m.onnx"):
        assert fileio.written_by_lfgraph(ours / name), name
        assert not fileio.written_by_lfgraph(theirs / name), name
    assert not fileio.written_by_lfgraph(theirs / "notes.txt") and not fileio.written_by_lfgraph(theirs)


def test_a_model_that_cannot_fit_in_memory_is_refused_before_loading(tiny_llama_folder, tmp_path, capsys, monkeypatch):
    from lfgraph import estimate

    monkeypatch.setattr("lfgraph.sources.load_model", lambda *a, **k: pytest.fail("loaded although it cannot fit"))
    n = estimate.parameter_count(tiny_llama_folder)
    from safetensors import safe_open

    with safe_open(str(tiny_llama_folder / "model.safetensors"), "pt") as st:
        stored = sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    assert n == stored  # the count from the config is the checkpoint's
    monkeypatch.setattr(estimate, "available_memory", lambda: estimate.in_memory_peak(n) - 1)
    # it would be compressed block by block, which writes a folder: a lone .onnx is refused before anything loads
    _one_line(capsys, main(["compress", str(tiny_llama_folder), "-o", str(tmp_path / "o.onnx"), *FAST]), "give a folder for -o")
    line = _one_line(capsys, main(["compress", str(tiny_llama_folder), "-o", str(tmp_path / "o"), "--in-memory", *FAST]), "--in-memory")
    assert "would not fit" in line and list(tmp_path.iterdir()) == []


def test_no_onnx_writes_a_checked_checkpoint_folder(tiny_llama_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ckpt"
    assert main(["compress", str(tiny_llama_folder), "-o", str(out), "--no-onnx", *FAST]) == 0
    table = capsys.readouterr().out
    assert "checkpoint (safetensors)" in table and "the written checkpoint, reloaded" in table and "--no-onnx" in table
    names = {p.name for p in out.iterdir()}
    assert "model.onnx" not in names and {"config.json", "model.safetensors", "plan.json", "lfgraph.json", fileio.MARKER} <= names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4  # 6 blocks, a quarter rounds to 2
    _one_line(capsys, main(["compress", str(tiny_llama_folder), "-o", str(tmp_path / "x.onnx"), "--no-onnx", *FAST]), "--no-onnx")


def test_sighup_is_handled_like_sigterm(tiny_llama_folder, tmp_path, capsys, monkeypatch):
    def hang_up(*a, **k):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)
        pytest.fail("SIGHUP did not interrupt")

    monkeypatch.setattr("lfgraph.sources.TorchSource.write", hang_up)
    code = main(["compress", str(tiny_llama_folder), "-o", str(tmp_path / "o.onnx"), *FAST])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGHUP and "SIGHUP" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_reached_through_a_link_into_the_input_is_refused(model_copy, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(model_copy)
    before = _digest(model_copy)
    _one_line(capsys, main(["compress", str(model_copy), "-o", str(link / "small"), *FAST]), "inside the input")
    assert _digest(model_copy) == before


@pytest.mark.slow
def test_a_checkpoint_folder_resumed_from_is_an_input(tiny_llama_folder, tmp_path, capsys):
    """A run killed right after its first checkpoint (before any marker, in older versions)
    is resumed, never refused as a folder lfgraph did not write."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "heal-checkpoint.pt").write_bytes(b"not a checkpoint")
    line = _one_line(capsys, main(["heal", str(tiny_llama_folder), "-o", str(tmp_path / "h"), "--steps", "2", "--seq-len", "32",
                                   "--windows", "8", "--resume", "--checkpoint-dir", str(ck)]), "checkpoint")
    assert "--overwrite" not in line and "cannot read the checkpoint" in line


# --------------------------------------------------------------------------- empty paths and model files left beside the output


@pytest.mark.parametrize("argv", [
    ["analyze", ""], ["plan", "", "-o", "{tmp}/p.json"], ["plan", "{model}", "-o", ""], ["compress", "", "-o", "{tmp}/o.onnx"],
    ["compress", "{model}", "-o", ""], ["compress", "{model}", "--stream", "-o", ""], ["compress", "", "--stream", "-o", "{tmp}/d"],
    ["verify", "", "{model}"], ["verify", "{tmp}/o.onnx", ""], ["heal", "", "-o", "{tmp}/h"], ["heal", "{model}", "-o", ""],
    ["generate", "", "--prompt", "hi"], ["visualize", "", "-o", "{tmp}/p.html"], ["visualize", "{model}", "-o", ""],
    ["analyze", "{model}", "--plot", ""], ["compress", "{model}", "-o", "{tmp}/o.onnx", "--report", ""],
])
def test_an_empty_path_is_refused_on_every_subcommand(model_copy, tmp_path, capsys, argv):
    """``""`` names no file: before, ``Path("")`` was the current folder (``-o ""`` wrote
    there, or failed with an unexpected error)."""
    before = _digest(model_copy)
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.replace("{tmp}", str(out)).replace("{model}", str(model_copy)) for a in argv]
    _one_line(capsys, main(argv), "is empty")
    assert _digest(model_copy) == before and list(out.iterdir()) == []


def test_an_empty_path_is_refused_by_the_api(tiny_llama_folder, tmp_path):
    from lfgraph import pipeline
    from lfgraph.errors import LfgraphError
    with pytest.raises(LfgraphError, match="-o is empty"):
        pipeline.compress(str(tiny_llama_folder), "")
    with pytest.raises(LfgraphError, match="MODEL is empty"):
        pipeline.compress("", str(tmp_path / "o.onnx"))
    with pytest.raises(LfgraphError, match="-o is empty"):
        pipeline.compress(str(tiny_llama_folder), "", engine="stream")
    assert list(tmp_path.iterdir()) == []


def _no_heavy_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the heavy work started before the output folder was checked")

    monkeypatch.setattr("lfgraph.passes.selection.stack_scores", refuse)
    monkeypatch.setattr("lfgraph.stages.Trace.run", refuse)


def _users_folder(path: Path, names: list[str]) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    for name in names:
        (path / name).write_bytes(b"the user's old weights " + name.encode())
    return path


@pytest.mark.parametrize("sharded,old", [
    (True, ["model.safetensors"]),
    (False, ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
    (False, ["pytorch_model.bin"]),
    (False, ["model.onnx", "genai_config.json"]),  # written without ONNX: onnxruntime-genai would run the old model
])
def test_streaming_over_a_users_folder_never_leaves_their_weights_to_be_loaded(tmp_path, capsys, monkeypatch, sharded, old):
    """Before: the old ``model.safetensors`` stayed beside the new shards and index, and
    transformers loads ``model.safetensors`` first: the user got the old model, exit 0."""
    from blocks.blocks_helpers import save_folder

    src = save_folder(tmp_path / "src", layers=4, sharded=sharded)
    out = _users_folder(tmp_path / "deploy", old)
    before = _digest(out)
    _no_heavy_work(monkeypatch)
    line = _one_line(capsys, main(["compress", str(src), "--stream", "--no-onnx", "--overwrite", "--fuse", "remove",
                                   "--quiet", "-o", str(out)]), "model files lfgraph did not write")
    assert all(name in line for name in old) and "notes.txt" not in line
    assert _digest(out) == before and not _staging_left(tmp_path)


def test_in_memory_deploy_folder_over_a_users_folder_with_other_weights(tiny_llama_folder, tmp_path, capsys, monkeypatch):
    old = ["model.onnx", "pytorch_model.bin", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    out = _users_folder(tmp_path / "deploy", old)
    before = _digest(out)
    _no_heavy_work(monkeypatch)
    line = _one_line(capsys, main(["compress", str(tiny_llama_folder), "--no-onnx", "--overwrite", "-o", str(out), *FAST]),
                     "model files lfgraph did not write")
    assert all(name in line for name in old)
    assert _digest(out) == before and not _staging_left(tmp_path)


def test_transformers_loads_model_safetensors_over_an_index(tmp_path):
    """Why an old ``model.safetensors`` must never stay beside new shards (transformers 5.x)."""
    import torch
    from transformers import AutoModelForCausalLM

    from blocks.blocks_helpers import save_folder

    new = save_folder(tmp_path / "new", layers=2, sharded=True, seed=1)
    old = save_folder(tmp_path / "old", layers=2, seed=2)
    shutil.copyfile(old / "model.safetensors", new / "model.safetensors")
    got = AutoModelForCausalLM.from_pretrained(new).model.norm.weight
    want = load_file(str(old / "model.safetensors"))["model.norm.weight"]
    assert torch.equal(got, want)


def test_commit_refuses_old_shards_the_new_ones_do_not_replace(tmp_path):
    from lfgraph.errors import LfgraphError

    target = _users_folder(tmp_path / "deploy", [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)])
    staged = tmp_path / "staged"
    staged.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json", "config.json"):
        (staged / name).write_text("new")
    before = _digest(target)
    with pytest.raises(LfgraphError, match="model-00001-of-00003.safetensors, model-00002-of-00003.safetensors"):
        fileio.commit_folder(staged, target)
    assert _digest(target) == before
    # files lfgraph wrote there before are its own: replaced, never refused
    (staged / "model-00003-of-00003.safetensors").unlink(missing_ok=True)
    (target / fileio.MARKER).write_text(json.dumps({"lfgraph": "0", "files": [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]}))
    fileio.commit_folder(staged, target)
    assert (target / "model-00001-of-00002.safetensors").read_text() == "new" and (target / "notes.txt").read_text() == "my notes"
    assert not (target / "model-00001-of-00003.safetensors").exists()  # lfgraph's old shard, removed
