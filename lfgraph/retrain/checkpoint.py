"""Healing checkpoints: one file, written atomically, that a resumed run continues from.

A checkpoint holds the model and optimizer state (full, unsharded), the scheduler, every
process's RNG states, the data position (micro-batches consumed), the loss curve so far and
the best held-out state. ``kill -9`` at any moment leaves either the previous checkpoint or
the new one, never a half-written file (:func:`lfgraph.fileio.atomic_path`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LfgraphError
from ..fileio import MARKER, atomic_path, mark_folder

CHECKPOINT_NAME = "heal-checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(folder: str | Path) -> Path:
    return Path(folder) / CHECKPOINT_NAME


def save(folder: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``folder``'s checkpoint file atomically; return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(folder)
    # the marker first: a checkpoint never exists without it, even when the writer is killed
    # between the two (a later run may then resume or replace it without --overwrite)
    if not (folder / MARKER).is_file():
        mark_folder(folder)
    with atomic_path(target) as tmp:
        torch.save(payload, tmp)
    return target


def load(folder: str | Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``folder``, or ``None`` when there is none.

    Raises ``LfgraphError`` when it was written by a run with other settings
    (``fingerprint``: steps, lr, batch size, seed, … must match for an exact resume).
    """
    path = checkpoint_path(folder)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a foreign or damaged file (atomic writes never leave half files)
        raise LfgraphError(f"cannot read the checkpoint {path}: {str(e).splitlines()[0]}: delete it to start over") from None
    theirs = payload.get("fingerprint", {})
    diff = sorted(k for k in set(fingerprint) | set(theirs) if fingerprint.get(k) != theirs.get(k))
    if diff:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} in the checkpoint, {fingerprint.get(k)!r} now" for k in diff)
        raise LfgraphError(f"the checkpoint {path} is from a run with other settings ({detail}): resume with the same settings or use another --checkpoint-dir")
    return payload


__all__ = ["CHECKPOINT_NAME", "checkpoint_path", "load", "rng_state", "save", "set_rng_state"]
