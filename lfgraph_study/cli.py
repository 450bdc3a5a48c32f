"""``lfgraph-study`` command line: the study's sweep (:mod:`lfgraph_study.study`) under the
same rules as ``lfgraph`` (one error line and exit 2 for a user error, 130 on Ctrl-C)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lfgraph.cli import run_command
from lfgraph.options import Parser

from . import study


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lfgraph-study", description=(study.__doc__ or "").split("\n\n")[0].replace("``", ""))
    study.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
