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
    text = capsys.readouterr().out
    assert "6 -> 4" in text
    assert (out / "model.safetensors.index.json").is_file() and (out / "plan.json").is_file()
    # ONNX by onnxruntime-genai's builder (a tiny model fits), checked against the checkpoint
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    assert "export check: prefill logits vs the checkpoint" in text and "✓" in text


@pytest.mark.parametrize("extra,words", [
    (["-o", "{tmp}/out.onnx"], "not a lone .onnx file"),
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
    # the refit starts from the selection pass's states: the states entering blocks 0 .. L - n - 1
    # are counted, beside the pass's own two (6 blocks, 2 dropped, 64 hidden)
    act = 4 * 32 * 64 * 4
    assert (small.parts["hidden states"], refit.parts["hidden states"]) == (2 * act, (6 - 2 + 2) * act)
    angular = stream_estimate.estimate(ckpt, n_drop=2, select="angular", fuse="calibrated", windows=4, seq_len=32, rates=rates)
    assert angular.parts["hidden states"] == (6 + 1) * act


@pytest.mark.slow
def test_stream_onnx_matches_the_checkpoint_and_a_failed_check_goes_aside(folder, tmp_path, monkeypatch):
    """The builder's ONNX computes the written checkpoint's prefill (rel <= 1e-4, measured
    against a block-by-block forward of the checkpoint and against transformers); a check
    that fails leaves the requested path absent and the folder at OUT.failed/, exit code 1."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from lfgraph.stream import compress_checkpoint
    from lfgraph.stream import onnx as stream_onnx

    out = tmp_path / "out"
    report = compress_checkpoint(folder, out, fuse="calibrated", calibration_windows=4, calibration_seq_len=32, progress=False)
    assert report.exit_code == 0 and report.onnx is not None and report.onnx.check_rel <= stream_onnx.CHECK_RTOL
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits.detach()
    torch.testing.assert_close(stream_onnx.streamed_logits(out, ids), ref, rtol=1e-4, atol=1e-4)
    rel, _ = stream_onnx.check_onnx(out, ids)
    assert rel <= 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in session.get_inputs()][:2] == ["input_ids", "attention_mask"]
    assert {o.name for o in session.get_outputs()} >= {"logits", "present.0.key", "present.0.value"}

    monkeypatch.setattr(stream_onnx, "check_onnx", lambda folder, ids: (1.0, 0.0))
    bad = tmp_path / "bad"
    report = compress_checkpoint(folder, bad, fuse="remove", calibration_windows=2, calibration_seq_len=16, progress=False)
    assert report.exit_code == 1 and not bad.exists() and (tmp_path / "bad.failed" / "model.onnx").is_file()


def test_auto_writes_onnx_only_when_onnx_runtime_can_hold_it():
    from lfgraph.stream.onnx import onnx_peak_bytes, wants_onnx

    GB = 1 << 30
    assert onnx_peak_bytes(8_000_000_000, 16 * GB) > 30 * GB  # float32 8B: ONNX Runtime holds 32e9 bytes
    assert wants_onnx("auto", 1_000_000_000, 2 * GB, available=20 * GB)[0]
    write, why = wants_onnx("auto", 8_000_000_000, 16 * GB, available=20 * GB)
    assert not write and "checkpoint only" in why and "20.0 GB is available" in why
    assert not wants_onnx("none", 1000, 1000, available=20 * GB)[0]
    assert wants_onnx("fp32", 8_000_000_000, 16 * GB, available=1 * GB)[0]


def test_a_checkpoint_without_tokenizer_files_gets_no_onnx_and_says_why(tmp_path):
    """The builder reads the tokenizer before writing anything: without tokenizer files
    ``auto`` writes the checkpoint alone and says why (it does not fail after the work), and
    ``fp32`` is refused before any weight is read."""
    import numpy as np

    from lfgraph.errors import LfgraphError
    from lfgraph.stream import compress_checkpoint

    src = save_folder(tmp_path / "model", "llama", layers=4, sharded=False)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 100, 4 * 32))
    report = compress_checkpoint(src, tmp_path / "out", fuse="remove", calibration_tokens=str(ids), calibration_windows=4,
                                 calibration_seq_len=32, progress=False)
    assert report.exit_code == 0 and report.onnx is None and "no tokenizer files" in report.onnx_reason
    assert not (tmp_path / "out" / "model.onnx").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(LfgraphError, match="no tokenizer files"):
        compress_checkpoint(src, tmp_path / "out2", fuse="remove", calibration_tokens=str(ids), calibration_windows=4,
                            calibration_seq_len=32, progress=False, onnx="fp32")
    assert not (tmp_path / "out2").exists()
