"""``lfgraph compress`` on a checkpoint folder block by block: the engine's choice (both
ways, and forced), the estimate that refuses a run that cannot fit, the options the path
refuses by name, ONNX by onnxruntime-genai's builder and its check."""

from __future__ import annotations

import pytest

from lfgraph import estimate
from lfgraph.blocks import CheckpointBlocks
from lfgraph.cli import main

from blocks_helpers import save_folder

FAST = ["--quiet", "--calibration-windows", "4", "--calibration-seq-len", "32", "--eval-windows", "1", "--eval-seq-len", "32"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("blocks-cli") / "model", "llama", layers=6, sharded=True)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("lfgraph: error")]
    assert len(err) == 1, err
    return err[0]


def test_the_engine_holds_a_model_that_fits_and_streams_one_that_does_not(folder, tmp_path, monkeypatch, capsys):
    """Auto: in memory when the in-memory estimate fits, block by block when it does not;
    the table says which (the source kind) and why (the estimate's line)."""
    monkeypatch.setattr(estimate, "available_memory", lambda: 64 << 30)
    assert main(["compress", str(folder), "-o", str(tmp_path / "held"), "--fuse", "remove", "--no-onnx", *FAST[1:]]) == 0
    out = capsys.readouterr().out
    assert "engine: the model held in memory" in out and "(pytorch)" in out
    n = estimate.parameter_count(folder)
    monkeypatch.setattr(estimate, "available_memory", lambda: estimate.in_memory_peak(n) - 1)
    monkeypatch.setattr("lfgraph.sources.load_model", lambda *a, **k: pytest.fail("loaded in memory although it cannot fit"))
    assert main(["compress", str(folder), "-o", str(tmp_path / "streamed"), "--fuse", "remove", "--no-onnx", *FAST[1:]]) == 0
    out = capsys.readouterr().out
    assert "engine: block by block from the checkpoint" in out and "would not fit" in out and "(checkpoint)" in out
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()


def test_in_memory_is_refused_when_it_cannot_fit(folder, tmp_path, monkeypatch, capsys):
    n = estimate.parameter_count(folder)
    monkeypatch.setattr(estimate, "available_memory", lambda: estimate.in_memory_peak(n) - 1)
    monkeypatch.setattr("lfgraph.sources.load_model", lambda *a, **k: pytest.fail("loaded although it cannot fit"))
    assert main(["compress", str(folder), "-o", str(tmp_path / "o"), "--in-memory", *FAST]) == 2
    line = _one_error_line(capsys)
    assert "would not fit" in line and "leave out --in-memory" in line and list(tmp_path.iterdir()) == []


def test_the_block_estimate_refuses_a_run_that_cannot_fit(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(estimate, "available_memory", lambda: 100 << 20)
    code = main(["compress", str(folder), "-o", str(tmp_path / "out"), "--stream", *FAST])
    assert code == 2
    line = _one_error_line(capsys)
    assert "GB is available" in line and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,words", [
    (["-o", "{tmp}/out.onnx"], "not a lone .onnx file"),
    (["-o", "{tmp}/out", "--heal", "5"], "--heal is not available block by block"),
    (["-o", "{tmp}/out", "--mode", "tie"], "--mode tie is not available block by block"),
])
def test_what_the_block_path_cannot_do_is_refused_before_the_work(folder, tmp_path, capsys, extra, words, monkeypatch):
    monkeypatch.setattr(CheckpointBlocks, "open", lambda *a, **k: pytest.fail("a block was read"))
    code = main(["compress", str(folder), "--stream", "--quiet", *[a.format(tmp=tmp_path) for a in extra]])
    assert code == 2
    assert words in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_stream_is_refused_for_what_is_not_a_checkpoint(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["compress", str(gguf), "-o", str(tmp_path / "o"), "--stream", "--quiet"]) == 2
    assert "a GGUF file is compressed in memory" in _one_error_line(capsys)


def test_the_estimate_grows_with_the_calibration_the_refit_and_the_distillation(folder):
    source = CheckpointBlocks(folder)
    rates = {"float32": 1e10, "float64": 5e9}
    kw = dict(n_drop=2, select="block_influence", objective=None, rates=rates, eval_windows=1, eval_seq_len=32)
    small = estimate.blocks_estimate(source, fuse="remove", windows=4, seq_len=32, **kw)
    more = estimate.blocks_estimate(source, fuse="remove", windows=64, seq_len=128, **kw)
    refit = estimate.blocks_estimate(source, fuse="calibrated", windows=4, seq_len=32, **kw)
    assert small.peak_bytes < more.peak_bytes and small.seconds < more.seconds
    assert sum(small.phases["selection"].values()) < sum(refit.phases["selection"].values()) and small.seconds < refit.seconds
    # the refit starts from the selection pass's states: those entering blocks 0 .. L - n - 1
    # are kept beside the pass's own two (6 blocks, 2 dropped, hidden 64)
    act = 4 * 32 * 64 * 4
    assert (small.phases["selection"]["hidden states"], refit.phases["selection"]["hidden states"]) == (2 * act, (2 + 6 - 2) * act)
    kw["objective"] = "blockwise"
    blockwise = estimate.blocks_estimate(source, fuse="calibrated-distill", windows=4, seq_len=32, **kw)
    assert "distillation (block-wise)" in blockwise.phases and blockwise.flops["distillation"] > 0
    assert "peak memory" in small.summary()


@pytest.mark.slow
def test_onnx_matches_the_checkpoint_and_a_failed_check_goes_aside(folder, tmp_path, monkeypatch, capsys):
    """The builder's ONNX computes the written checkpoint's prefill (rel <= 1e-4, against a
    block-by-block forward of the checkpoint and against transformers); a check that fails
    leaves the requested path absent and the folder at OUT.failed/, exit code 1."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from lfgraph.deploy import genai_builder

    out = tmp_path / "out"
    assert main(["compress", str(folder), "-o", str(out), "--stream", *FAST]) == 0
    text = capsys.readouterr().out
    assert "model.onnx: onnxruntime-genai's builder" in text and (out / "genai_config.json").is_file()
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits.detach()
    torch.testing.assert_close(genai_builder.streamed_logits(out, ids), ref, rtol=1e-4, atol=1e-4)
    rel, _ = genai_builder.check_onnx(out, ids)
    assert rel <= 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in session.get_inputs()][:2] == ["input_ids", "attention_mask"]

    monkeypatch.setattr(genai_builder, "check_onnx", lambda folder, ids: (1.0, 0.0))
    bad = tmp_path / "bad"
    assert main(["compress", str(folder), "-o", str(bad), "--stream", "--fuse", "remove", *FAST]) == 1
    assert not bad.exists() and (tmp_path / "bad.failed" / "model.onnx").is_file()


def test_auto_writes_onnx_only_when_onnx_runtime_can_hold_it():
    from lfgraph.deploy.genai_builder import onnx_peak_bytes, wants_onnx

    GB = 1 << 30
    assert onnx_peak_bytes(8_000_000_000, 16 * GB) > 30 * GB  # float32 8B: ONNX Runtime holds 32e9 bytes
    assert wants_onnx("auto", 1_000_000_000, 2 * GB, available=20 * GB)[0]
    write, why = wants_onnx("auto", 8_000_000_000, 16 * GB, available=20 * GB)
    assert not write and "checkpoint only" in why and "20.0 GB is available" in why
    assert not wants_onnx("none", 1000, 1000, available=20 * GB)[0]


def test_a_checkpoint_without_tokenizer_files_gets_no_onnx_and_says_why(tmp_path, capsys):
    """The builder reads the tokenizer before writing anything: without tokenizer files the
    folder holds the checkpoint alone and the report says why (no failure after the work)."""
    import numpy as np

    src = save_folder(tmp_path / "model", "llama", layers=4, sharded=False)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 100, 4 * 32))
    code = main(["compress", str(src), "-o", str(tmp_path / "out"), "--stream", "--fuse", "remove", "--calibration-tokens", str(ids),
                 "--quiet", "--calibration-windows", "4", "--calibration-seq-len", "32"])
    assert code == 0
    assert "no tokenizer files" in capsys.readouterr().out
    assert not (tmp_path / "out" / "model.onnx").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_the_quality_gate_holds_back_a_streamed_checkpoint_that_fails_it(folder, tmp_path, capsys):
    """``--max-quality-loss`` on the block path: the measure is the report's (held-out
    perplexity block by block); a run above it exits 1 and its folder goes aside."""
    out = tmp_path / "out"
    code = main(["compress", str(folder), "--stream", "--fuse", "remove", "--no-onnx", "--max-quality-loss", "1e-9", "-o", str(out), *FAST])
    table = capsys.readouterr().out
    assert code == 1 and not out.exists() and (tmp_path / "out.failed" / "model.safetensors.index.json").is_file()
    assert "held-out perplexity" in table
    assert main(["compress", str(folder), "--stream", "--fuse", "remove", "--no-onnx", "--max-quality-loss", "100", "-o", str(out), *FAST]) == 0
    assert (out / "config.json").is_file()


def test_the_page_of_a_streamed_run_shows_the_plan_and_the_quality(folder, tmp_path):
    """``--report`` for a checkpoint run: the page is built from the checkpoint's layer graph
    (weights read lazily), with the plan's removed blocks and the quality rows."""
    import json

    page = tmp_path / "page.json"
    code = main(["compress", str(folder), "--stream", "--fuse", "calibrated", "--no-onnx", "-o", str(tmp_path / "out"),
                 "--report", str(page), *FAST])
    assert code == 0
    data = json.loads(page.read_text())
    absorbed = {a for f in data["fusions"] for a in f["absorb"]}
    fates = {f"model.model.layers.{r['index']}": r["fate"]
             for r in data["rows"] if r["kind"] == "block"}
    assert absorbed and all(fates[a] == "removed" for a in absorbed) and sum(v == "removed" for v in fates.values()) == len(absorbed)
    assert data["counts"]["refitted"] == len(data["fusions"])
    assert any(row[0] == "held-out perplexity" for row in data["table"])
    html = tmp_path / "page.html"
    assert main(["compress", str(folder), "--stream", "--fuse", "calibrated", "--no-onnx", "-o", str(tmp_path / "out2"),
                 "--report", str(html), *FAST]) == 0
    assert html.read_text().lstrip().lower().startswith("<!doctype html") and "held-out perplexity" in html.read_text()


@pytest.mark.parametrize("extra,words", [
    (["--in-memory", "--distill-objective", "blockwise"], "--distill-objective blockwise trains block by block"),
    (["--in-memory", "--device", "cuda"], "--device cuda onloads blocks"),
    (["--stream", "--fuse", "remove", "--distill-objective", "logit"], "--fuse remove does not distil"),
    (["--stream", "--device", "gpu0"], "is not a torch device"),
    (["--stream", "--device", "meta"], "cpu or cuda only"),
    (["--stream", "--fuse", "calibrated-distill", "--distill-objective", "blockwise", "--distill-trainable", "blocks"],
     "--distill-trainable blocks trains every block above a cut through the logits"),
])
def test_what_only_the_block_path_uses_is_refused_elsewhere(folder, tmp_path, capsys, extra, words, monkeypatch):
    """Options a path does not use are refused on it, not ignored, and a device torch cannot
    use is refused (before anything loads)."""
    monkeypatch.setattr("lfgraph.sources.load_model", lambda *a, **k: pytest.fail("loaded before the options were checked"))
    assert main(["compress", str(folder), "-o", str(tmp_path / "out"), "--no-onnx", *extra, *FAST]) == 2
    assert words in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_cuda_is_refused_in_one_line_where_there_is_none(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["compress", str(folder), "-o", str(tmp_path / "out"), "--stream", "--device", "cuda", "--no-onnx", *FAST]) == 2
    assert "no CUDA device is available" in _one_error_line(capsys)


def test_rtol_is_the_streamed_export_checks_tolerance(folder, tmp_path, capsys):
    """Before: ``--stream --rtol 0.5`` was silently ignored."""
    assert main(["compress", str(folder), "--stream", "--fuse", "remove", "--no-onnx", "--rtol", "0.5", "-o", str(tmp_path / "out"), *FAST[1:]]) == 0
    table = capsys.readouterr().out
    assert "rtol 0.5)" in table and "rtol 0.0001" not in table


def test_the_estimate_after_the_plan_counts_the_blocks_that_train(folder, tmp_path):
    """The budget before the plan is the selection's worst case; once the plan exists the
    estimate is made again for its runs: its distillation work is that of the blocks the
    block-wise objective then trained, one by one."""
    from lfgraph import pipeline

    r = pipeline.compress(str(folder), tmp_path / "out", target=0.34, select="block_influence", engine="stream", distill_objective="blockwise",
                          calibration_windows=4, calibration_seq_len=32, eval_windows=0, onnx=False, quiet=True)
    record = next(rec.detail for rec in r.log.records if rec.action == "distill")
    one = estimate.blocks_estimate(CheckpointBlocks(folder), n_drop=2, select="block_influence", fuse="calibrated-distill",
                                   objective="blockwise", windows=4, seq_len=32, eval_windows=0, trained=1, rates={"float32": 1.0})
    assert len(record["blocks"]) >= 1 and "plan budget" in r.stage_seconds
    assert r.estimate.flops["distillation"] == pytest.approx(len(record["blocks"]) * one.flops["distillation"])


def test_stream_refuses_an_encoder_by_its_reason(tiny_bert_folder, tmp_path, capsys):
    """An encoder folder is a checkpoint but not a causal language model: --stream says so in
    one line (issue 27: GPT-2 used to be refused with a reason that was not the reason)."""
    assert main(["compress", str(tiny_bert_folder), "--stream", "-o", str(tmp_path / "out"), *FAST]) == 2
    assert "not a causal language model" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()
