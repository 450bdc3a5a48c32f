"""``lfgraph`` command line: analyze, plan, compress, verify.

Every user error (bad path, corrupt file, impossible target, unsupported model) ends with
one line on stderr that says what is wrong and what to do, and exit code 2; never a
traceback. Set ``LFGRAPH_DEBUG=1`` to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import LfgraphError

EPILOG = "MODEL is an alias (smollm2, minilm), a Hugging Face model folder, a .gguf file, or an .onnx file."


def _metric_names() -> list[str]:
    from .passes.metrics import METRICS

    return sorted(METRICS)


def _is_onnx(spec: str) -> bool:
    return spec.lower().endswith(".onnx")


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    from .pipeline import FUSIONS, SELECTIONS

    p.add_argument("--target", type=float, default=0.25, help="fraction to remove: of blocks (default) or of parameters (default 0.25)")
    p.add_argument("--target-kind", choices=["blocks", "params"], default="blocks", help="what --target counts (default blocks)")
    p.add_argument("--mode", choices=["merge", "tie"], default="merge", help="merge: remove blocks (shallower); tie: share weights (default merge)")
    p.add_argument("--select", choices=SELECTIONS, default=None, help="which blocks to fuse (default: best measured for the model family)")
    p.add_argument("--fuse", choices=FUSIONS, default=None, help="how fused blocks become one (default: best measured for the model family)")
    p.add_argument("--metric", choices=_metric_names(), default="bures", help="weight-similarity metric for --select similarity (default bures)")
    p.add_argument("--scope", choices=["adjacent", "global"], default="adjacent", help="fuse neighbours only, or any compatible pair (default adjacent)")
    p.add_argument("--calibration-text", default=None, help="text file for calibration (default: a part of the bundled corpus kept apart from evaluation)")
    p.add_argument("--calibration-windows", type=int, default=16, help="number of calibration windows (default 16)")
    p.add_argument("--calibration-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfgraph", description="Compress trained networks by layer fusion.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"lfgraph {__import__('lfgraph').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="show compatible groups, blocks and the most alike layer/block pairs", epilog=EPILOG)
    a.add_argument("model")
    a.add_argument("--metric", choices=_metric_names(), default="bures")
    a.add_argument("--scope", choices=["adjacent", "global"], default="global")
    a.add_argument("--top", type=int, default=10, help="how many ranked pairs to print (default 10)")
    a.add_argument("--plot", default=None, help="write a PNG of the block distance matrix and per-group heatmaps")

    p = sub.add_parser("plan", help="make a FusionPlan (JSON) for a target", epilog=EPILOG)
    p.add_argument("model")
    _add_plan_options(p)
    p.add_argument("-o", "--output", default=None, help="where to write the plan JSON")
    p.add_argument("--dry-run", action="store_true", help="print the plan without writing it")

    c = sub.add_parser("compress", help="rewrite the model, export ONNX, verify on ONNX Runtime", epilog=EPILOG)
    c.add_argument("model")
    _add_plan_options(c)
    c.add_argument("--plan", default=None, help="apply this plan instead of making one")
    c.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    c.add_argument("--eval-perplexity", type=int, default=0, metavar="N", help="held-out perplexity on N windows before/after (language models)")
    c.add_argument("--log", default=None, help="write the rewrite log (JSON) here, for the visualizer")
    c.add_argument("--quiet", action="store_true")

    v = sub.add_parser("verify", help="re-check an lfgraph ONNX file against the PyTorch model it came from", epilog=EPILOG)
    v.add_argument("onnx_file")
    v.add_argument("model", help="the original model the file was compressed from")
    v.add_argument("--rtol", type=float, default=1e-4)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except LfgraphError as e:
        print(f"lfgraph: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("lfgraph: interrupted; no output file was written", file=sys.stderr)
        return 130
    except Exception as e:  # an lfgraph bug or an unforeseen library failure
        if os.environ.get("LFGRAPH_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"lfgraph: error: unexpected {type(e).__name__}: {first[:300]} (run with LFGRAPH_DEBUG=1 for details and report it)", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "compress":
        return _compress(args)
    return _verify(args)


def _check_input(spec: str) -> None:
    from .models import ALIASES

    if spec not in ALIASES and not Path(spec).exists():
        raise LfgraphError(f"model {spec!r} not found: give a Hugging Face model folder, a .gguf or .onnx file, or one of {sorted(ALIASES)}")


def _analyze(args: argparse.Namespace) -> int:
    _check_input(args.model)
    graph, analysis = _graph_and_analysis(args.model, args.metric)
    print(graph.summary())
    print(f"\nmost alike layer pairs ({analysis.metric}, {args.scope}; score = distance / group median):")
    for score, a, b, _key in analysis.ranked_layer_pairs(args.scope)[: args.top]:
        print(f"  {score:8.4f}  {a}  ~  {b}")
    pairs = analysis.ranked_block_pairs(args.scope)
    if pairs:
        print(f"\nmost alike block pairs ({args.scope}):")
        for score, a, b in pairs[: args.top]:
            print(f"  {score:8.4f}  {a}  ~  {b}")
    if args.plot:
        from .plots import plot_analysis

        plot_analysis(analysis, args.plot, graph=graph)
        print(f"\nwrote {args.plot}")
    return 0


def _graph_and_analysis(spec: str, metric: str):  # type: ignore[no-untyped-def]
    from .passes.analysis import analyze

    if _is_onnx(spec):
        from .frontends.onnx_graph import build_layer_graph, load_onnx

        graph = build_layer_graph(load_onnx(spec), model_name=Path(spec).stem)
    else:
        from .pipeline import load, trace

        graph = trace(load(spec))
    return graph, analyze(graph, metric, progress=True)


def _plan(args: argparse.Namespace) -> int:
    _check_input(args.model)
    from .pipeline import plan_summary

    plan = _make_plan(args)
    print(plan_summary(plan))
    if args.dry_run or not args.output:
        if not args.dry_run:
            print(plan.to_json(), end="")
        return 0
    plan.save(args.output)
    print(f"wrote {args.output}")
    return 0


def _make_plan(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if _is_onnx(args.model):
        from .frontends.onnx_graph import build_layer_graph, load_onnx
        from .passes.planner import make_plan

        if args.select not in (None, "similarity") or args.fuse == "calibrated":
            raise LfgraphError("activation-based selection and calibrated fusion need the PyTorch model; ONNX files support --select similarity")
        graph = build_layer_graph(load_onnx(args.model), model_name=Path(args.model).stem)
        fuse = args.fuse or "aligned-mean"
        rule, align = ("mean", True) if fuse == "aligned-mean" else (fuse, False)
        if args.mode == "tie":
            rule, align = "mean", False
        return make_plan(graph, metric=args.metric, target=args.target, target_kind=args.target_kind, scope=args.scope,
                         mode=args.mode, fuse=rule, align=align, progress=True)
    from .pipeline import calibration_for, default_recipe, load, plan_model, trace

    model = load(args.model)
    graph = trace(model)
    select, fuse = default_recipe(model, args.mode)
    select, fuse = args.select or select, args.fuse or fuse
    calibration = None
    if select != "similarity" or fuse == "calibrated":
        calibration = calibration_for(model, args.calibration_text, args.calibration_windows, args.calibration_seq_len)
    return plan_model(model, graph, args.target, mode=args.mode, select=select, fuse=fuse, metric=args.metric,
                      scope=args.scope, target_kind=args.target_kind, calibration=calibration)


def _compress(args: argparse.Namespace) -> int:
    _check_input(args.model)
    if _is_onnx(args.model):
        return _compress_onnx(args)
    from .pipeline import compress

    report = compress(
        args.model, args.output, plan=args.plan, target=args.target, mode=args.mode, select=args.select,
        fuse=args.fuse, metric=args.metric, scope=args.scope, target_kind=args.target_kind,
        calibration_text=args.calibration_text, calibration_windows=args.calibration_windows,
        calibration_seq_len=args.calibration_seq_len, eval_perplexity=args.eval_perplexity, log_path=args.log,
        quiet=args.quiet,
    )
    print(report.table())
    return 0 if report.verify.ok else 1


def _compress_onnx(args: argparse.Namespace) -> int:
    from .onnx_pipeline import compress_onnx

    plan = None
    if args.plan:
        from .plan import FusionPlan

        plan = FusionPlan.load(args.plan)
    else:
        plan = _make_plan(args)
    report = compress_onnx(args.model, args.output, plan, log_path=args.log)
    print(report.table())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .export import verify_onnx
    from .pipeline import export_inputs, load, metadata_plan, rewrite, trace, verification_inputs

    if not Path(args.onnx_file).is_file():
        raise LfgraphError(f"ONNX file {args.onnx_file} does not exist")
    _check_input(args.model)
    plan = metadata_plan(args.onnx_file)
    model = load(args.model)
    graph = trace(model)
    calibration = None
    if plan.fuse == "calibrated":
        raise LfgraphError("verify re-runs the rewrite; a calibrated plan depends on calibration data: verify right after compress instead")
    compressed = rewrite(model, graph, plan, calibration=calibration).model
    _args, names, _axes = export_inputs(model)
    report = verify_onnx(args.onnx_file, compressed, verification_inputs(model, names), rtol=args.rtol)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
