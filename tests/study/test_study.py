"""``lfgraph-study``: the sweep, its outputs, the inflection point, the command and its option rules."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from cli_checks import one_line
from lfgraph_study import zoo
from lfgraph.errors import LfgraphError
from lfgraph.models import CausalLMLogits
from lfgraph_study.study import Track, inflection_point, licenses_text, lm_scores, run, summary_markdown, sweep, write_outputs


def test_inflection_point_finds_the_knee_of_an_exponential_rise() -> None:
    xs = [0.1, 0.2, 0.3, 0.4, 0.5]
    # log-loss rises slowly (slope 1) up to 0.3, then steeply (slope 20)
    ys = [math.exp(v) for v in (0.1, 0.2, 0.3, 2.3, 4.3)]
    assert inflection_point(xs, ys, 1.0) == pytest.approx(0.3)
    # a straight exponential (one rate) has no knee
    assert inflection_point(xs, [math.exp(2 * x) for x in xs], 1.0) is None
    # accuracy falling: higher is better
    acc = [0.9, 0.89, 0.88, 0.5, 0.2]
    assert inflection_point(xs, acc, 0.9, higher_is_worse=False) == pytest.approx(0.3)


def test_lm_scores_perplexity_and_agreement() -> None:
    model = CausalLMLogits(zoo.tiny_llama(layers=2)).eval()
    w = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    ppl, agree, top = lm_scores(model, w, None)
    with torch.no_grad():
        logits = model(w)[:, :-1]
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits.reshape(-1, 128), w[:, 1:].reshape(-1))))
    assert ppl == pytest.approx(expected, rel=1e-5) and agree == 1.0
    assert torch.equal(top, logits.argmax(-1))
    _, agree_self, _ = lm_scores(model, w, top)
    assert agree_self == 1.0
    _, agree_other, _ = lm_scores(model, w, (top + 1) % 128)  # a reference that never agrees
    assert agree_other == 0.0
    _, agree_half, _ = lm_scores(model, w, torch.where(torch.arange(top.shape[1]) % 2 == 0, top, (top + 1) % 128))
    assert agree_half == pytest.approx(8 / 15)


def test_licenses_text_is_read_and_missing_folder_is_an_error(tmp_path) -> None:
    (tmp_path / "A").write_text("alpha")
    (tmp_path / "B").symlink_to(tmp_path / "A")  # the same file once
    (tmp_path / "C").write_text("gamma")
    assert licenses_text(tmp_path) == "alpha\n\ngamma"
    with pytest.raises(LfgraphError, match="no licence texts"):
        licenses_text(tmp_path / "missing")


def _tiny_track() -> Track:
    model = CausalLMLogits(zoo.tiny_llama(layers=6)).eval()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    held = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    _, _, ref = lm_scores(model, held, None)

    def score(m: torch.nn.Module) -> dict[str, float]:
        ppl, agree, _ = lm_scores(m, held, ref)
        return {"ppl_x": ppl, "top1_x": agree}

    t = Track("tiny", model, calib, score, {"ppl_x": True, "top1_x": False}, {"model": "tiny"})
    t.original = score(model)
    return t


@pytest.mark.slow
def test_sweep_writes_tables_and_plots(tmp_path) -> None:
    track = _tiny_track()
    seen = []
    rows = sweep(track, ["shortgpt", "lfgraph", "lfgraph-map=lfgraph"], [0.17, 0.34], {"lfgraph-map": {"refit": "map"}},
                 log=lambda s: None, on_row=lambda r: seen.append(len(r)))
    assert seen == [1, 2, 3, 4, 5, 6]
    assert [r["method"] for r in rows] == ["shortgpt"] * 2 + ["lfgraph"] * 2 + ["lfgraph-map"] * 2
    assert [r["depth_fraction"] for r in rows[:2]] == [pytest.approx(1 / 6), pytest.approx(2 / 6)]
    # the option set reached its method: at 2/6 the default refits in full, lfgraph-map does not
    assert rows[3]["ppl_x"] != rows[5]["ppl_x"]
    paths = write_outputs(track, rows, tmp_path / "out")
    assert {p.name for p in paths} == {"study.json", "study.csv", "study.md", "study_ppl_x.png", "study_top1_x.png"}
    data = json.loads((tmp_path / "out" / "study.json").read_text())
    assert data["protocol"] == {"model": "tiny"} and len(data["rows"]) == 6
    table = list(csv.DictReader((tmp_path / "out" / "study.csv").open()))
    assert float(table[0]["ppl_x"]) == pytest.approx(rows[0]["ppl_x"])
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| lfgraph-map |" in md and "best peer" in md


def test_errors_are_rows_not_crashes(tmp_path) -> None:
    track = _tiny_track()
    rows = sweep(track, ["gromov"], [0.99 - 1e-9], log=lambda s: None)
    assert "error" in rows[0]
    with pytest.raises(LfgraphError, match="unknown method"):
        sweep(track, ["nope"], [0.2], log=lambda s: None)


def test_the_lfgraph_study_command(tiny_llama_folder, tmp_path) -> None:
    from lfgraph_study.cli import build_parser

    parser = build_parser()
    args = parser.parse_args([str(tiny_llama_folder), "--methods", "shortgpt", "lfgraph", "--targets", "0.17",
                              "--calib-windows", "4", "--calib-tokens", "32", "--eval-windows", "2", "--eval-tokens", "32",
                              "--out", str(tmp_path / "s")])
    assert run(args) == 0
    data = json.loads((tmp_path / "s" / "study.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"shortgpt", "lfgraph"}
    assert "licenses" in data["protocol"]["texts"]
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--methods", "nope"])
    with pytest.raises(SystemExit):  # the fraction rule of every --target(s) option
        parser.parse_args([str(tiny_llama_folder), "--targets", "1.5"])


def test_merge_studies_joins_rows_and_refuses_other_protocols(tmp_path) -> None:
    from lfgraph_study.study import merge_studies

    track = _tiny_track()
    write_outputs(track, sweep(track, ["shortgpt"], [0.17], log=lambda s: None), tmp_path / "a")
    write_outputs(track, sweep(track, ["gromov"], [0.17], log=lambda s: None), tmp_path / "b")
    merge_studies([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    rows = json.loads((tmp_path / "m" / "study.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["shortgpt", "gromov"]
    track.protocol = {"model": "other"}
    write_outputs(track, [], tmp_path / "c")
    with pytest.raises(LfgraphError, match="differ"):
        merge_studies([tmp_path / "a", tmp_path / "c"], tmp_path / "m2")


def test_vision_track_runs_depth_and_width_methods(tmp_path) -> None:
    from lfgraph_study.study import vision_track

    track = vision_track(steps=5, n_train=64, n_calib=32, n_test=64)
    rows = sweep(track, ["shortgpt", "lfgraph", "prune-global", "replaceme-lstsq"], [0.25], log=lambda s: None)
    by = {r["method"]: r for r in rows}
    assert by["shortgpt"]["depth_fraction"] == pytest.approx(2 / 8)  # 2 of 8 blocks (identity-skip ones only)
    assert 0.0 <= by["lfgraph"]["accuracy"] <= 1.0
    assert by["prune-global"]["weight_fraction"] == pytest.approx(0.25, abs=1e-3)
    assert "error" in by["replaceme-lstsq"]  # a CNN has no MLP down projection: an error row, not a crash


def test_sweep_heals_depth_methods_and_compares_healed_with_healed(tmp_path) -> None:
    track = _tiny_track()
    rows = sweep(track, ["shortgpt", "lfgraph", "prune-global"], [0.34], log=lambda s: None, heal_steps=4,
                 heal_options={"lr": 1e-3, "batch_size": 2})
    assert [r["method"] for r in rows] == ["shortgpt", "shortgpt+heal", "lfgraph", "lfgraph+heal", "prune-global"]
    for one, healed in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert healed["healed"] == 4 and healed["heal_cpu_s"] >= 0
        assert healed["removed"] == one["removed"]  # healing trains, it never changes the depth
        assert healed["ppl_x"] != one["ppl_x"]  # the healed model was trained and scored again
    md = summary_markdown(track, rows)
    assert "lfgraph / best peer (" in md and "lfgraph+heal / best peer (shortgpt+heal)" in md  # healed peers only


def test_vision_track_heals_without_labels(tmp_path) -> None:
    from lfgraph_study.study import vision_track

    track = vision_track(steps=5, n_train=64, n_calib=32, n_test=64)
    rows = sweep(track, ["shortgpt"], [0.25], log=lambda s: None, heal_steps=2)
    assert [r["method"] for r in rows] == ["shortgpt", "shortgpt+heal"]
    assert 0.0 <= rows[1]["accuracy"] <= 1.0


# --------------------------------------------------------------------------- lfgraph-study's file and number rules
# (the product's commands are checked in tests/test_file_safety.py)


def test_study_out_naming_a_file_is_refused(tiny_llama_folder, tmp_path, capsys):
    from lfgraph_study.cli import main

    f = tmp_path / "study.txt"
    f.write_text("keep me")
    one_line(capsys, main([str(tiny_llama_folder), "--out", str(f)]), "--out")
    assert f.read_text() == "keep me"


STUDY_NUMERIC = ["--targets", "--calib-windows", "--calib-tokens", "--eval-windows", "--eval-tokens", "--sleb-windows",
                 "--sleb-tokens", "--cnn-steps", "--lm-eval-limit", "--heal"]


@pytest.mark.parametrize("option", STUDY_NUMERIC)
def test_every_numeric_option_refuses_nan_and_negative_numbers(tiny_llama_folder, tmp_path, capsys, monkeypatch, option):
    from lfgraph_study.cli import main

    monkeypatch.setattr("lfgraph.models.load_model", lambda *a, **k: pytest.fail("loaded before the options were checked"))
    for value in ("nan", "-1", "inf"):
        one_line(capsys, main([str(tiny_llama_folder), f"{option}={value}"]), f"argument {option}")
    assert list(tmp_path.iterdir()) == []
