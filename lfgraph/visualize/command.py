"""``lfgraph visualize``: the report page (or its data, or Model Explorer overlays) from files.

    lfgraph visualize MODEL --plan plan.json [--log rewrite.json] -o report.html
    lfgraph visualize MODEL OUT_DIR -o report.html            # OUT_DIR holds plan.json, rewrite.json
    lfgraph visualize MODEL --plan compressed.onnx -o report.json --format json
    lfgraph visualize model.onnx --plan plan.json --log rewrite.json -o overlay.json --format model-explorer

The coordinator's ``cli.py`` calls :func:`add_subcommand` and :func:`run`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import LfgraphError
from . import FORMATS, load_log, write_report
from ..fileio import check_outputs
from ..onnx_io import metadata_plan
from ..options import add_overwrite_option
from ..plan import FusionPlan

#: File names looked for in an OUT_DIR.
DIR_FILES = {"plan": ("plan.json",), "log": ("rewrite.json", "rewrite-log.json", "log.json"),
             "scores": ("scores.json",), "report": ("report.json",)}


def add_subcommand(subparsers: Any) -> None:
    """Register ``visualize`` on an ``argparse`` subparsers object."""
    from ..passes.metrics import METRICS
    from .scores import CRITERIA

    v = subparsers.add_parser(
        "visualize", help="a self-contained HTML page of what a plan did to a model (or JSON, or Model Explorer overlays)",
        description="Show a rewrite: original and rewritten model side by side, distance heatmaps, selection scores, "
                    "before/after table, rewrite log. One HTML file, no network needed to open it.",
        epilog="MODEL is the original model (alias, Hugging Face folder, .gguf or .onnx). OUT_DIR is a folder holding "
               "plan.json and rewrite.json (optional: scores.json {criterion: {block: score}}, report.json "
               "{\"table\": [[name, before, after, ratio], ...], \"loss_curve\": [[step, loss], ...], \"healed\": [block, ...]}).")
    v.add_argument("model", help="the original model the plan was made for")
    v.add_argument("out_dir", nargs="?", default=None, help="a folder with plan.json and rewrite.json (instead of --plan/--log)")
    v.add_argument("--plan", default=None, help="plan JSON (lfgraph plan -o), or an ONNX file written by lfgraph compress (plan read from its metadata)")
    v.add_argument("--log", default=None, help="rewrite log JSON (lfgraph compress --log); without it the page shows what the plan asks for")
    v.add_argument("-o", "--output", required=True, help="output file")
    v.add_argument("--format", choices=FORMATS, default=None,
                   help="html (default; .json output defaults to json), json (the page's data) or model-explorer "
                        "(node-data overlays keyed by the original ONNX node names; a second file NAME.score.json "
                        "holds the block scores when there are any)")
    v.add_argument("--metric", choices=sorted(METRICS), default=None,
                   help="metric of the distance heatmaps (default: the plan's, else euclidean)")
    v.add_argument("--no-heatmaps", action="store_true", help="skip the distance analysis (faster on large models)")
    v.add_argument("--scores", default=None, help="selection scores JSON {criterion: {block name: score}}")
    v.add_argument("--compute-scores", default=None, metavar="CRITERIA",
                   help=f"compute selection scores on calibration data (comma-separated: {', '.join(CRITERIA)}; PyTorch models)")
    v.add_argument("--title", default="", help="page heading")
    add_overwrite_option(v)
    v.set_defaults(run=run)


def _find(folder: Path, kind: str) -> Path | None:
    return next((folder / n for n in DIR_FILES[kind] if (folder / n).is_file()), None)


def _read_json(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise LfgraphError(f"{what} {p} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LfgraphError(f"{what} {p} is not valid JSON ({e})") from None


def _load_plan(spec: str) -> FusionPlan:
    if spec.lower().endswith(".onnx"):
        if not Path(spec).is_file():
            raise LfgraphError(f"ONNX file {spec} does not exist")
        return metadata_plan(spec)
    return FusionPlan.load(spec)


def _original_of(compressed: str) -> str:
    """The original model of an lfgraph ONNX file, from its metadata (``lfgraph.source_spec``)."""
    from ..onnx_io import read_metadata

    meta = read_metadata(compressed)
    if "lfgraph.plan" not in meta:
        raise LfgraphError(f"{compressed} has no lfgraph plan in its metadata: give the plan with --plan, or an OUT_DIR holding plan.json")
    spec = meta.get("lfgraph.source_spec")
    if not spec:
        raise LfgraphError(f"{compressed} does not name its original model (written by an older lfgraph): "
                           f"give it, lfgraph visualize ORIGINAL --plan {compressed} -o PAGE")
    from ..sources import check_model_spec

    try:
        check_model_spec(spec)
    except LfgraphError:
        raise LfgraphError(f"the original of {compressed}, {spec}, is not there any more: give it, "
                           f"lfgraph visualize ORIGINAL --plan {compressed} -o PAGE") from None
    return spec


def run(args: argparse.Namespace) -> int:
    """Run ``lfgraph visualize``; returns 0. User errors raise ``LfgraphError`` (the CLI prints one line, exit 2)."""
    plan_path, log_path, scores_path, report_path = args.plan, args.log, args.scores, None
    if args.out_dir:
        folder = Path(args.out_dir)
        if not folder.is_dir():
            raise LfgraphError(f"{folder} is not a folder: give a folder holding plan.json (and rewrite.json), or use --plan")
        plan_path = plan_path or _find(folder, "plan")
        log_path = log_path or _find(folder, "log")
        scores_path = scores_path or _find(folder, "scores")
        report_path = _find(folder, "report")
    outputs = {"-o": args.output}
    if (args.format or "") == "model-explorer":
        outputs["the score overlay"] = str(Path(args.output).with_name(Path(args.output).stem + ".score.json"))
    # a run folder's files are inputs; the page may be written beside them
    check_outputs(outputs, [args.model, plan_path, log_path, scores_path, report_path], args.overwrite)
    model = args.model
    if not plan_path and str(model).lower().endswith(".onnx") and Path(model).is_file():
        # a compressed file alone: its plan is in its metadata, its original is named there too
        plan_path, model = model, _original_of(model)
    if not plan_path:
        raise LfgraphError("no plan: give --plan plan.json (or compressed.onnx), or an OUT_DIR holding plan.json")
    fmt = args.format or ("json" if args.output.lower().endswith(".json") else "html")
    plan = _load_plan(str(plan_path))
    log = load_log(log_path) if log_path else None
    scores = _read_json(scores_path, "scores file") if scores_path else None
    report = _read_json(report_path, "report file") if report_path else {}
    from ..sources import OnnxSource, TorchSource, open_source

    source = open_source(model)
    graph = source.graph()
    plan.check_applies_to(graph.fingerprint())
    analysis = None
    if not args.no_heatmaps:
        from ..passes.analysis import analyze

        metric = args.metric or plan.provenance.get("metric") or "euclidean"
        print(f"visualize: {metric} distances of {len(graph.nodes)} layers", flush=True)
        analysis = analyze(graph, metric, progress=True)
    if args.compute_scores:
        if not isinstance(source, TorchSource):
            raise LfgraphError("--compute-scores runs the model: give the PyTorch model (alias or folder), not an ONNX file")
        from ..model_types import CalibrationOptions
        from .scores import selection_scores

        calibration = source.calibration(CalibrationOptions(windows=4, seq_len=128))
        scores = {**(scores or {}), **selection_scores(source.model.module, graph, calibration, args.compute_scores.split(","))}
    original_onnx = None
    if fmt == "model-explorer":
        # overlays are keyed by the original graph's node names: the file itself, or the cached export
        original_onnx = source.path if isinstance(source, OnnxSource) else source.original_file(quiet=False)
    written = write_report(args.output, graph, plan, log, analysis=analysis, scores=scores,
                           table=[tuple(r) for r in report["table"]] if "table" in report else None,
                           loss_curve=[tuple(p) for p in report.get("loss_curve", [])], healed=report.get("healed"), title=args.title,
                           format=fmt, original_onnx=original_onnx)
    for p in written:
        print(f"visualize: wrote {p}")
    return 0
