"""``lfgraph compress MODEL_FOLDER -o OUT_FOLDER --stream``: the command line of the streaming path.

A thin layer over :func:`lfgraph.stream.compress_checkpoint`; options of ``compress`` that
the streaming path does not have are refused with one line (exit 2) before any weight is read.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LfgraphError
from .api import compress_checkpoint

#: ``compress`` options the streaming path does not take: (attribute, its value when unused, option, why).
_UNSUPPORTED = (
    ("plan", None, "--plan", "the streaming path makes its own plan"),
    ("heal", 0, "--heal", "healing trains the whole model in memory"),
    ("report", None, "--report", "the page needs the whole model"),
    ("log", None, "--log", "the rewrite log of the streaming path is in the report object of the Python API"),
    ("max_quality_loss", None, "--max-quality-loss", "the streaming path does not measure quality"),
    ("distill_trainable", None, "--distill-trainable", "the distilling rules are not streamed"),
    ("metric", None, "--metric", "it applies to --select similarity, which the streaming path does not do"),
    ("scope", None, "--scope", "it applies to --select similarity, which the streaming path does not do"),
)


def compress_stream(args: argparse.Namespace) -> int:
    """Run ``compress --stream`` from parsed arguments; returns the exit code (0)."""
    for attr, unused, option, why in _UNSUPPORTED:
        if getattr(args, attr, unused) not in (unused, None):
            raise LfgraphError(f"{option} is not available with --stream: {why}")
    if args.mode != "merge":
        raise LfgraphError("--stream removes blocks: use --mode merge")
    if args.target_kind != "blocks":
        raise LfgraphError("--stream takes a fraction of blocks: use --target-kind blocks")
    report = compress_checkpoint(
        args.model, args.output, target=args.target, select=args.select or "block_influence", fuse=args.fuse or "calibrated",
        calibration_text=args.calibration_text, calibration_tokens=args.calibration_tokens,
        calibration_windows=args.calibration_windows, calibration_seq_len=args.calibration_seq_len, progress=not args.quiet,
        overwrite=args.overwrite, onnx="auto" if args.onnx else "none",
    )
    sys.stderr.flush()
    print(report.table())
    return report.exit_code
