"""``compress --stream`` on the command line, and the estimate that refuses a run that cannot fit."""

from __future__ import annotations

import pytest

from lfgraph.cli import main
from lfgraph.stream import estimate as stream_estimate
from lfgraph.stream.checkpoint import Checkpoint

from stream_helpers import save_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("stream-cli") / "model", "llama", layers=6, sharded=True)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_estimate_refuses_a_model_that_cannot_fit(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stream_estimate, "available_memory", lambda: 100 << 20)
    out = tmp_path / "out"
    code = main(["compress", str(folder), "-o", str(out), "--stream", "--quiet", "--calibration-windows", "4", "--calibration-seq-len", "32"])
    assert code == 2
    line = _one_error_line(capsys)
    assert "GB is available" in line and "--fuse remove" in line and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_stream_writes_a_checkpoint(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", str(folder), "-o", str(out), "--stream", "--quiet", "--select", "angular", "--fuse", "remove",
                 "--calibration-windows", "4", "--calibration-seq-len", "32"])
    assert code == 0
    assert "6 -> 4" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file() and (out / "plan.json").is_file()


@pytest.mark.parametrize("extra,words", [
    (["-o", "{tmp}/out.onnx"], "not ONNX"),
    (["-o", "{tmp}/out", "--fuse", "calibrated-distill"], "--fuse calibrated"),
    (["-o", "{tmp}/out", "--select", "sleb"], "block_influence or angular"),
    (["-o", "{tmp}/out", "--heal", "5"], "--heal is not available with --stream"),
])
def test_cli_stream_refuses_with_one_line(folder, tmp_path, capsys, extra, words):
    code = main(["compress", str(folder), "--stream", "--quiet", *[a.format(tmp=tmp_path) for a in extra]])
    assert code == 2
    assert words in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_estimate_grows_with_the_calibration_and_the_refit(folder):
    ckpt = Checkpoint(folder)
    rates = {"float32": 1e10, "float64": 5e9}
    small = stream_estimate.estimate(ckpt, n_drop=2, select="block_influence", fuse="remove", windows=4, seq_len=32, rates=rates)
    more = stream_estimate.estimate(ckpt, n_drop=2, select="block_influence", fuse="remove", windows=64, seq_len=128, rates=rates)
    refit = stream_estimate.estimate(ckpt, n_drop=2, select="block_influence", fuse="calibrated", windows=4, seq_len=32, rates=rates)
    assert small.peak_bytes < more.peak_bytes and small.seconds < more.seconds
    assert small.peak_bytes < refit.peak_bytes and small.seconds < refit.seconds
    assert "peak memory" in small.summary()
