"""``lfgraph`` command line: one subcommand per capability, each a thin layer over the API.

``lfgraph --help`` is the map of the product. Every user error (bad path, corrupt file,
impossible target, unsupported model) ends with one line on stderr that names the stage,
what is wrong and what to do, and exit code 2; never a traceback. A failed check (the
written file does not compute what the rewritten model computes, or the quality gate
fails) is exit code 1 on every path. Ctrl-C is exit code 130 and leaves no output. Set
``LFGRAPH_DEBUG=1`` to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import LfgraphError
from .fileio import check_outputs, signals_as_interrupts
from .options import COUNT, FRACTION, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, SEQ_LEN, Parser, add_overwrite_option

EPILOG = "MODEL is an alias (smollm2, minilm), a Hugging Face model folder, a .gguf file, or an .onnx file."


def _metric_names() -> list[str]:
    from .passes.metrics import METRICS

    return sorted(METRICS)


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    from .registry import FUSION_RULE_REGISTRY, SELECTION_REGISTRY, choices_help

    p.add_argument("--target", type=FRACTION, default=0.25, help="fraction to remove: of blocks (default) or of parameters (default 0.25)")
    p.add_argument("--target-kind", choices=["blocks", "params"], default="blocks", help="what --target counts (default blocks)")
    p.add_argument("--mode", choices=["merge", "tie"], default="merge", help="merge: remove blocks (shallower); tie: share weights (default merge)")
    p.add_argument("--select", choices=list(SELECTION_REGISTRY), default=None,
                   help=choices_help("selection: which blocks to fuse (default: best measured for the model family)", SELECTION_REGISTRY))
    p.add_argument("--fuse", choices=list(FUSION_RULE_REGISTRY), default=None,
                   help=choices_help("fusion rule: how a fused run becomes one block (default: best measured for the model family)", FUSION_RULE_REGISTRY))
    p.add_argument("--metric", choices=_metric_names(), default=None, help="weight-similarity measure, for --select similarity (default bures)")
    p.add_argument("--scope", choices=["adjacent", "global"], default=None, help="fuse neighbours only, or any compatible pair, for --select similarity (default adjacent)")
    p.add_argument("--distill-trainable", choices=["maps", "neighbors", "blocks"], default=None,
                   help="what the distilling rules train with the maps: maps only, also the blocks around each cut, or every block (default: the rule's, neighbors for calibrated-distill)")
    p.add_argument("--calibration-text", default=None, help="text file (or folder of *.txt) to calibrate on (default: a part of the bundled corpus kept apart from evaluation)")
    p.add_argument("--calibration-tokens", default=None, metavar="FILE", help="token ids (.npy or .pt) to calibrate on, for models without a tokenizer")
    p.add_argument("--calibration-windows", type=COUNT, default=16, help="number of calibration windows (default 16)")
    p.add_argument("--calibration-seq-len", type=SEQ_LEN, default=256, help="tokens per calibration window (default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lfgraph", description="Compress trained networks by layer fusion and export a dense, shallower ONNX model.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"lfgraph {__import__('lfgraph').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("analyze", help="show compatible groups, blocks and the most alike layer/block pairs", epilog=EPILOG)
    a.add_argument("model")
    a.add_argument("--metric", choices=_metric_names(), default="bures")
    a.add_argument("--scope", choices=["adjacent", "global"], default="global")
    a.add_argument("--top", type=COUNT, default=10, help="how many ranked pairs to print (default 10)")
    a.add_argument("--plot", default=None, help="write a PNG of the block distance matrix and per-group heatmaps")
    add_overwrite_option(a)
    a.set_defaults(run=_analyze)

    p = sub.add_parser("plan", help="make a FusionPlan (JSON) for a target", epilog=EPILOG)
    p.add_argument("model")
    _add_plan_options(p)
    p.add_argument("-o", "--output", default=None, help="where to write the plan JSON")
    p.add_argument("--dry-run", action="store_true", help="print the plan without writing it")
    add_overwrite_option(p)
    p.set_defaults(run=_plan)

    c = sub.add_parser("compress", help="rewrite the model, write ONNX, verify it and measure the cost against the original", epilog=EPILOG)
    c.add_argument("model")
    _add_plan_options(c)
    c.add_argument("--plan", default=None, help="apply this plan instead of making one")
    c.add_argument("-o", "--output", required=True,
                   help="output .onnx file, or for causal LMs a folder (HF checkpoint + ONNX with KV cache + genai_config.json); written atomically")
    c.add_argument("--eval-windows", "--eval-perplexity", dest="eval_windows", type=OPTIONAL_COUNT, default=4, metavar="N",
                   help="held-out windows for the quality check of language models (default 4; 0 skips it)")
    c.add_argument("--eval-seq-len", type=SEQ_LEN, default=512, help="tokens per held-out window (default 512)")
    c.add_argument("--max-quality-loss", type=NON_NEGATIVE, default=None, metavar="X",
                   help="fail (exit 1, file kept and marked) when the quality loss is above X: relative perplexity increase "
                        "(LMs), 1 - embedding cosine (encoders), 1 - top-1 agreement (others)")
    c.add_argument("--rtol", type=POSITIVE, default=None, help="tolerance of the export check (default 1e-4)")
    c.add_argument("--log", default=None, help="write the rewrite log (JSON) here, for the visualizer")
    c.add_argument("--report", default=None, metavar="FILE", help="write the visualizer's page of this run (.html; .json for its data)")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--no-onnx", dest="onnx", action="store_false",
                   help="for a causal LM's folder: write the Hugging Face checkpoint only (no ONNX, no genai_config.json); "
                        "block by block, ONNX is otherwise written when ONNX Runtime can hold the model in the memory available")
    engine = c.add_mutually_exclusive_group()
    engine.add_argument("--stream", dest="engine", action="store_const", const="stream", default="auto",
                        help="compress a safetensors checkpoint folder block by block, one block in memory at a time (the default when "
                             "the in-memory estimate does not fit): the same recipes, plan and quality measure; writes the checkpoint in its "
                             "dtype, and ONNX by onnxruntime-genai's builder when ONNX Runtime can hold it")
    engine.add_argument("--in-memory", dest="engine", action="store_const", const="in-memory",
                        help="hold the model in memory (the default when the estimate says it fits)")
    c.add_argument("--device", default="cpu", help="where blocks are onloaded block by block: cpu (default) or cuda")
    c.add_argument("--distill-objective", choices=["logit", "blockwise"], default=None,
                   help="block by block, how the distilling rules train: logit distillation (holds the compressed model and the original), "
                        "or block-wise (each trained block reproduces the original's hidden states; one block in training at a time); "
                        "default: logit when it fits in memory")
    add_overwrite_option(c)
    from .retrain.cli import add_compress_options

    add_compress_options(c)
    c.set_defaults(run=_compress)

    v = sub.add_parser("verify", help="re-check an lfgraph ONNX file against the model (PyTorch or ONNX) it came from", epilog=EPILOG)
    v.add_argument("onnx_file")
    v.add_argument("model", help="the original model the file was compressed from")
    v.add_argument("--rtol", type=POSITIVE, default=1e-4)
    v.set_defaults(run=_verify)

    for name, add, run in _package_subcommands():
        add(sub)
        sub.choices[name].set_defaults(run=run)
    return parser


def _package_subcommands() -> list[tuple[str, Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]]:
    """(name, add_subcommand, run) of each package that brings its own subcommand."""
    from .deploy import cli as generate
    from .retrain import cli as heal
    from .visualize import command as visualize

    return [("heal", heal.add_subcommand, heal.run), ("generate", generate.add_subcommand, generate.run),
            ("visualize", visualize.add_subcommand, visualize.run)]


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv)[:1] == ["study"]:  # the subcommand before the study left the package
        print("lfgraph: error: the study is its own command now: lfgraph-study MODEL ... (package lfgraph_study; "
              "python -m lfgraph_study.cli from a checkout)", file=sys.stderr)
        return 2
    return run_command(build_parser, argv)


def run_command(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``build()``'s parser and run the chosen ``args.run`` under the rules
    of this module's docstring (one error line, exit codes, Ctrl-C); also ``lfgraph-study``'s."""
    try:
        with signals_as_interrupts():
            args = build().parse_args(argv)
            return args.run(args)
    except SystemExit as e:  # argparse: --help, --version, or an option error already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except LfgraphError as e:
        where = getattr(e, "stage", None)
        print(f"lfgraph: error: {where + ': ' if where else ''}{e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (fileio.Terminated)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"lfgraph: interrupted ({signal.Signals(signum).name}); nothing was left at the output paths", file=sys.stderr)
        return 128 + int(signum)
    except Exception as e:  # an lfgraph bug or an unforeseen library failure
        if os.environ.get("LFGRAPH_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"lfgraph: error: unexpected {type(e).__name__}: {first[:300]} (run with LFGRAPH_DEBUG=1 for details and report it)", file=sys.stderr)
        return 1


def _analyze(args: argparse.Namespace) -> int:
    from .pipeline import analyze_model, check_inputs

    check_inputs(args.model)
    check_outputs({"--plot": args.plot}, [args.model], args.overwrite)
    from .pipeline import weight_warnings

    _source, graph, analysis = analyze_model(args.model, args.metric, args.scope)
    print(graph.summary())
    for warning in weight_warnings(graph):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"\nmost alike layer pairs ({analysis.metric}, {args.scope}; score = distance / group median):")
    for score, a, b, _key in analysis.ranked_layer_pairs(args.scope)[: args.top]:
        print(f"  {score:8.4f}  {a}  ~  {b}")
    pairs = analysis.ranked_block_pairs(args.scope)
    if pairs:
        print(f"\nmost alike block pairs ({args.scope}):")
        for score, a, b in pairs[: args.top]:
            print(f"  {score:8.4f}  {a}  ~  {b}")
    if args.plot:
        from .visualize.plots import plot_analysis

        plot_analysis(analysis, args.plot, graph=graph)
        print(f"\nwrote {args.plot}")
    return 0


def _calibration(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .model_types import CalibrationOptions

    return CalibrationOptions(args.calibration_text, args.calibration_tokens, args.calibration_windows, args.calibration_seq_len)


def _plan(args: argparse.Namespace) -> int:
    from .pipeline import check_inputs, check_recipe, graph_of, plan_model, plan_summary, resolve_recipe

    check_inputs(args.model, calibration=_calibration(args))
    check_recipe(args.target, args.mode, args.select or "similarity", args.fuse or "remove", args.target_kind)
    check_outputs({"-o": None if args.dry_run else args.output},
                  [args.model, args.calibration_text, args.calibration_tokens], args.overwrite)
    source, graph = graph_of(args.model)
    options = _calibration(args)
    recipe = resolve_recipe(source, args.mode, args.select, args.fuse, args.target, args.target_kind, options, args.metric, args.scope)
    for note in recipe.notes:
        print(f"note: {note}", file=sys.stderr)
    calibration = source.calibration(options) if recipe.needs_calibration else None
    plan = plan_model(source, graph, args.target, mode=args.mode, select=recipe.select, fuse=recipe.fuse, metric=args.metric or "bures",
                      scope=args.scope or "adjacent", target_kind=args.target_kind, calibration=calibration,
                      distill_trainable=args.distill_trainable)
    print(plan_summary(plan))
    if args.dry_run or not args.output:
        if not args.dry_run:
            print(plan.to_json(), end="")
        return 0
    plan.save(args.output)
    print(f"wrote {args.output}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from .pipeline import compress
    from .retrain.cli import compress_heal_options

    heal = compress_heal_options(args)
    report = compress(
        args.model, args.output, plan=args.plan, target=args.target, mode=args.mode, select=args.select,
        fuse=args.fuse, metric=args.metric, scope=args.scope, target_kind=args.target_kind,
        calibration_text=args.calibration_text, calibration_tokens=args.calibration_tokens,
        calibration_windows=args.calibration_windows, calibration_seq_len=args.calibration_seq_len,
        eval_windows=args.eval_windows, eval_seq_len=args.eval_seq_len, max_quality_loss=args.max_quality_loss,
        log_path=args.log, report_path=args.report, heal_steps=heal.pop("steps"), heal_options=heal, rtol=args.rtol, quiet=args.quiet,
        distill_trainable=args.distill_trainable, overwrite=args.overwrite, onnx=args.onnx, engine=args.engine, device=args.device,
        distill_objective=args.distill_objective,
    )
    sys.stderr.flush()  # progress bars end before the table starts
    print(report.table())
    return report.exit_code


def _verify(args: argparse.Namespace) -> int:
    from .pipeline import check_inputs, verify

    if not Path(args.onnx_file).is_file():
        raise LfgraphError(f"ONNX file {args.onnx_file} does not exist")
    check_inputs(args.model)
    report = verify(args.onnx_file, args.model, rtol=args.rtol)
    print("\n".join(report.lines()))
    print("✓ the file computes what the plan applied to the model computes" if report.ok else "✗ FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
