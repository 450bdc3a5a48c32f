"""lfgraph sets OpenMP's wait policy to passive before torch loads OpenMP (spinning threads
stall every parallel region on a shared machine), and leaves an explicit setting alone."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = "import os, lfgraph, torch; print(os.environ['OMP_WAIT_POLICY'])"


def _policy(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_passive_by_default_and_an_explicit_policy_wins() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy(env) == "PASSIVE"
    assert _policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
