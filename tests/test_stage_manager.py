"""The one orchestrator: the StageManager's contract (requirements, order, timing, labels,
progress) and the stage lists compress builds for a Source and for a with-past ONNX decoder."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lfgraph import stages as compress_stages
from lfgraph.errors import LfgraphError
from lfgraph.passes.manager import Stage, StageManager, StageOrderError


@dataclass
class Toy:
    x: int | None = None
    y: int | None = None
    ran: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


class MakeX(Stage):
    name, provides = "make-x", ("x",)

    def message(self, s):
        return "making x"

    def run(self, s):
        s.ran.append(self.name)
        time.sleep(0.02)
        s.x = 1


class MakeY(Stage):
    name, requires, provides = "make-y", ("x",), ("y",)

    def run(self, s):
        s.ran.append(self.name)
        s.y = s.x + 1


class NeedsY(Stage):
    name, requires = "needs-y", ("y",)

    def run(self, s):
        s.ran.append(self.name)


def test_a_missing_requirement_names_the_stage_and_the_field():
    state = Toy()
    manager = StageManager([MakeX(), NeedsY()])
    with pytest.raises(StageOrderError) as e:
        manager.run(state)
    message = str(e.value)
    assert "'needs-y'" in message and "requires y" in message and "make-x" in message
    assert state.ran == ["make-x"]  # refused before it ran
    with pytest.raises(StageOrderError, match="'needs-y' requires y"):
        StageManager([MakeX(), NeedsY()]).check()  # the same, without running anything
    StageManager([MakeX(), MakeY(), NeedsY()]).check()


def test_stages_run_in_order_and_each_is_timed(capsys):
    state = Toy()
    lines: list[str] = []
    manager = StageManager([MakeX(), MakeY(), NeedsY()], progress=lines.append)
    assert manager.run(state) is state
    assert state.ran == ["make-x", "make-y", "needs-y"] and state.y == 2
    assert [t.name for t in manager.timings] == ["make-x", "make-y", "needs-y"]
    assert list(state.stage_seconds) == ["make-x", "make-y", "needs-y"]
    assert manager.timings[0].seconds >= 0.02 and state.stage_seconds["make-x"] == manager.timings[0].seconds
    assert lines == ["making x"]  # stages without a message print nothing


def test_a_stage_that_does_not_provide_what_it_promised_is_refused():
    class Broken(Stage):
        name, provides = "broken", ("x",)

        def run(self, s):
            pass

    with pytest.raises(StageOrderError, match="'broken' ran but did not provide x"):
        StageManager([Broken()]).run(Toy())


def test_user_errors_carry_the_stage_label_and_the_failed_stage_is_timed():
    class Fails(Stage):
        name, label = "verify", "write"

        def run(self, s):
            raise LfgraphError("no good")

    state = Toy()
    manager = StageManager([MakeX(), Fails()])
    with pytest.raises(LfgraphError) as e:
        manager.run(state)
    assert e.value.stage == "write"
    assert list(state.stage_seconds) == ["make-x", "verify"]


def test_duplicate_stage_names_are_refused():
    with pytest.raises(StageOrderError, match="unique"):
        StageManager([MakeX(), MakeX()])


# --------------------------------------------------------------------------- compress's lists


def _state(tmp_path: Path, **options) -> compress_stages.CompressState:
    return compress_stages.CompressState(spec=str(tmp_path / "model.onnx"), out=tmp_path / "out.onnx", **options)


OPTIONS = ["spec", "out"]  # what compress's state starts with


def test_every_requirement_of_the_source_list_is_provided_earlier(tmp_path):
    state = _state(tmp_path, heal_steps=3, log_path=str(tmp_path / "log.json"), report_path=str(tmp_path / "page.html"))
    stages = compress_stages.build_stages(state, decoder=False)
    names = [s.name for s in stages]
    assert names == ["options", "load", "trace", "plan", "rewrite", "heal", "staging", "write", "verify", "size", "quality",
                     "time", "finish", "log", "report", "page"]
    StageManager(stages).check(OPTIONS)
    # optional stages only where their options ask for them
    plain = [s.name for s in compress_stages.build_stages(_state(tmp_path), decoder=False)]
    assert "heal" not in plain and "log" not in plain and "page" not in plain and "estimate" not in plain


def test_a_checkpoint_folder_is_estimated_before_loading(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    names = [s.name for s in compress_stages.build_stages(compress_stages.CompressState(spec=str(tmp_path), out=tmp_path / "o"))]
    assert names[:3] == ["options", "estimate", "load"]


def test_the_onnx_decoder_list_shares_options_staging_finish_and_report(tmp_path):
    decoder = compress_stages.build_stages(_state(tmp_path), decoder=True)
    assert [s.name for s in decoder] == ["options", "load", "plan", "staging", "write", "verify", "quality", "time", "finish", "report"]
    StageManager(decoder).check(OPTIONS)
    source = compress_stages.build_stages(_state(tmp_path), decoder=False)
    kinds = {s.name: type(s) for s in source}
    shared = {n for n, k in ((s.name, type(s)) for s in decoder) if kinds.get(n) is k}
    assert shared == {"options", "staging", "finish", "report"}
    # the decoder's own variants keep the labels users see
    assert {s.name: s.label or s.name for s in decoder if s.name in ("verify", "quality", "time")} == dict.fromkeys(("verify", "quality", "time"), "write")


def test_a_file_that_is_not_a_decoder_gets_the_source_list(tmp_path):
    assert not compress_stages.is_decoder_with_past(str(tmp_path / "missing.onnx"))
    assert not compress_stages.is_decoder_with_past(str(tmp_path))
    assert compress_stages.build_stages(_state(tmp_path))[1].name == "load"
    assert type(compress_stages.build_stages(_state(tmp_path))[1]) is compress_stages.Load


def test_compress_reports_the_time_of_every_stage_it_ran(tmp_path):
    import torch

    import tiny_models as zoo
    from lfgraph import pipeline
    from lfgraph.models import wrap_module

    torch.manual_seed(0)
    cnn = wrap_module(zoo.ResNetCNN(stages=((8, 3),)), (torch.randn(1, 3, 16, 16),), family="vision")
    report = pipeline.compress(cnn, tmp_path / "cnn.onnx", target=0.34, select="similarity", fuse="remove", quiet=True)
    assert report.exit_code == 0
    assert list(report.stage_seconds) == ["options", "load", "trace", "plan", "rewrite", "staging", "write", "verify", "size",
                                          "quality", "time", "finish", "report"]
    assert all(v >= 0 for v in report.stage_seconds.values())
    assert sum(report.stage_seconds.values()) <= report.seconds + 1e-3
    assert report.to_dict()["stage_seconds"] == report.stage_seconds
