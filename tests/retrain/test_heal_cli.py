"""``lfgraph heal`` end to end on a tiny Llama folder: output, bad data, kill -9 and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lfgraph.errors import LfgraphError
from lfgraph.retrain.checkpoint import checkpoint_path
from lfgraph.retrain.cli import build_parser, main, run

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--seq-len", "32", "--windows", "16", "--quiet", "--select", "similarity", "--fuse", "remove"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def heal_cmd(folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lfgraph.retrain.cli", "heal", str(folder), "-o", str(out), *FAST, *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_cli_heals_and_writes_a_loadable_shallower_model(tiny_llama_folder: Path, tmp_path: Path) -> None:
    from lfgraph.models import load_model

    out = tmp_path / "healed"
    args = build_parser().parse_args(["heal", str(tiny_llama_folder), "-o", str(out), "--steps", "6", "--eval-every", "3",
                                      "--checkpoint-dir", str(tmp_path / "ck"), *FAST])
    assert run(args) == 0
    curve = json.loads((out / "heal.json").read_text())
    assert len(curve["train_loss"]) == 6 and [e[0] for e in curve["eval"]] == [3, 6]
    assert curve["plan"]["mode"] == "merge" and len(curve["plan"]["fusions"]) >= 1
    assert curve["config"]["lr"] == pytest.approx(1e-4)
    healed = load_model(str(out))
    assert healed.hf_model.config.num_hidden_layers == 6 - 2  # round(0.25 * 6) blocks removed
    original = load_model(str(tiny_llama_folder))
    assert checkpoint_path(tmp_path / "ck").is_file()
    # the written model is the trained one: not the one-shot rewrite, and it runs
    with torch.no_grad():
        logits = healed.module(original.example_inputs[0])
    assert logits.shape[-1] == original.module(original.example_inputs[0]).shape[-1]
    assert torch.isfinite(logits).all()


def test_cli_tie_with_a_retraining_mode(tiny_llama_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "tied"
    args = build_parser().parse_args(["heal", str(tiny_llama_folder), "-o", str(out), "--steps", "2", "--mode", "tie",
                                      "--retrain-mode", "freeze", "--seq-len", "32", "--windows", "16", "--quiet"])
    assert run(args) == 0
    curve = json.loads((out / "heal.json").read_text())
    tied = curve["tied_sets"]  # HF folders cannot share tensors: written untied, sets listed
    assert tied and all(len(names) >= 2 for names in tied)
    w = weights(out)
    for names in tied:
        assert all(torch.equal(w[names[0]], w[n]) for n in names[1:]), names


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--text", "EMPTY"], "is empty"),
        (["--text", "SHORT"], "fewer than one window"),
        (["--seq-len", "300"], "longer than the model takes (256 positions)"),
        (["--resume"], "needs --checkpoint-dir"),
    ],
)
def test_bad_data_is_one_line_and_exit_2(tiny_llama_folder: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Layer fusion.")
    extra = [{"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt")}.get(e, e) for e in extra]
    argv = ["heal", str(tiny_llama_folder), "-o", str(tmp_path / "o"), "--steps", "1", "--quiet",
            "--select", "similarity", "--fuse", "remove", "--seq-len", "32", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(LfgraphError):
        run(build_parser().parse_args(argv))


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_llama_folder: Path, tmp_path: Path) -> None:
    """Exact equality (torch.equal on every tensor) after kill -9 mid-run and --resume."""
    steps = ["--steps", "60", "--checkpoint-every", "5", "--lr", "1e-3"]
    ck = tmp_path / "ck"
    proc = subprocess.Popen(heal_cmd(tiny_llama_folder, tmp_path / "a", *steps, "--checkpoint-dir", str(ck)), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not checkpoint_path(ck).is_file():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted_at = torch.load(checkpoint_path(ck), weights_only=False)["step"]
    assert 5 <= interrupted_at < 60 and not (tmp_path / "a").exists()
    resumed = subprocess.run(heal_cmd(tiny_llama_folder, tmp_path / "a", *steps, "--checkpoint-dir", str(ck), "--resume"),
                             env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "a" / "heal.json").read_text())["resumed_from"] == interrupted_at
    # the uninterrupted reference runs in this process (same code, one thread as well)
    assert main(heal_cmd(tiny_llama_folder, tmp_path / "b", *steps)[3:]) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compress_heal_options_feed_heal_compressed(tiny_llama_folder: Path) -> None:
    """The flags compress gets (--heal STEPS, --heal-*) drive the same stage the CLI uses."""
    import argparse

    from lfgraph import pipeline
    from lfgraph.retrain.cli import add_compress_options, compress_heal_options, heal_compressed, training_windows

    p = argparse.ArgumentParser()
    add_compress_options(p)
    opts = compress_heal_options(p.parse_args(["--heal", "3", "--heal-trainable", "lora", "--heal-lr", "2e-3"]))
    assert opts["steps"] == 3 and opts["trainable"] == "lora" and opts["lr"] == 2e-3
    assert (opts.pop("windows"), opts.pop("seq_len")) == (128, 128)  # what training_windows reads, the defaults filled in
    model = pipeline.load(str(tiny_llama_folder))
    graph = pipeline.trace(model)
    plan = pipeline.plan_model(model, graph, 0.5, mode="merge", select="similarity", fuse="remove", progress=False)
    rewritten = pipeline.rewrite(model, graph, plan, progress=False).model
    one_shot = {k: v.clone() for k, v in rewritten.state_dict().items()}
    windows = training_windows(model.tokenizer, None, 8, 32, 256)
    healed, curve = heal_compressed(model, rewritten, plan, windows, progress=False, **opts)
    assert len(curve["train_loss"]) == 3 and curve["config"]["trainable"] == "lora" and curve["config"]["lr"] == 2e-3
    assert type(healed.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # adapters merged back
    assert any(not torch.equal(v, one_shot[k]) for k, v in healed.state_dict().items())
    json.dumps(curve)  # the report/visualizer get plain data


@pytest.mark.parametrize("flags", [["--heal-lr", "1e-3"], ["--heal-trainable", "lora", "--heal-windows", "8"], ["--heal-resume-if-present"]])
def test_a_heal_option_without_heal_is_refused_not_ignored(tiny_llama_folder: Path, tmp_path: Path, capsys, flags) -> None:
    """--heal-* says how --heal trains; without --heal it would do nothing: one line, exit 2,
    before the model is read, nothing written (issue 27: every option a path does not use)."""
    from lfgraph.cli import main

    out = tmp_path / "o"
    assert main(["compress", str(tiny_llama_folder), "-o", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--heal is not given" in err[0] and all(f in err[0] for f in flags if f.startswith("--"))
    assert not out.exists()
