"""Merge study runs of one model (e.g. methods run in two processes) into one table and
plots: ``python tools/study_merge.py OUT RUN_DIR [RUN_DIR ...]``."""

from __future__ import annotations

import sys
from pathlib import Path

from lfgraph_study.study import merge_studies

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for p in merge_studies([Path(a) for a in sys.argv[2:]], Path(sys.argv[1])):
        print(p)
