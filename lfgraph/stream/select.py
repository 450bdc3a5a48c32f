"""Selection scores accumulated while the calibration windows pass the stack block by block.

One pass over the blocks, one block computing at a time: each block's output for every
batch is computed from its input, then the block is released. On the way:

- Block Influence (ShortGPT) of block ``i``: ``1 - cos(input_i, output_i)`` summed per
  batch, divided by the token count, as :func:`lfgraph.passes.selection.block_influence_scores`;
- Gromov et al.'s angular distance of the run starting at ``l`` of ``n`` blocks:
  ``arccos(cos(x_l, x_{l+n})) / pi``, as :func:`lfgraph.passes.selection.angular_distances`
  (the inputs of the last ``n`` blocks are kept to compare with).

Both use the in-memory module's cosine (:func:`lfgraph.passes.selection._cosine`, float64)
on the same batches in the same order, so the scores, and the runs that
:func:`lfgraph.passes.selection.runs_from_order` / :func:`~lfgraph.passes.selection.runs_from_angular`
make from them, are the in-memory path's.

The pass also does the work that would otherwise need the blocks again: with a
:class:`~lfgraph.stream.fingerprint.BlockHasher` each block's linear layers are hashed for
the model fingerprint (in a background thread while the block computes), and when a
calibrated refit follows the hidden states entering the blocks a run can start at are kept
(``keep_states``; references to the states the pass computes, not copies), for the refit to
start from (:func:`lfgraph.stream.refit.refit_runs`). The next block is read in a
background thread while one computes (two blocks in memory, as while a run is refitted).
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibration import block_output
from ..errors import LfgraphError
from ..passes.selection import Run, _check_n, _cosine, _tokens, runs_from_angular, runs_from_order
from .calibrate import StackInput
from .fingerprint import BlockHasher
from .skeleton import Skeleton

#: Selections the streaming path computes (the others need the whole model or its weights graph).
STREAM_SELECTIONS = ("block_influence", "angular")


@dataclass
class Scores:
    """What one pass accumulated: Block Influence per block, angular distance per start."""

    block_influence: dict[int, float] = field(default_factory=dict)
    angular: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    #: block index -> the hidden state entering it (one tensor per batch), for the blocks asked for
    states: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@torch.no_grad()
def score_blocks(skeleton: Skeleton, inputs: StackInput, select: str, n_drop: int, progress: Any = None, *,
                 keep_states: int = 0, hasher: BlockHasher | None = None, prefetch: bool = True) -> Scores:
    """Run every block on ``inputs`` (block by block) and accumulate the scores ``select``
    needs (``n_drop`` is the angular run length). ``inputs.hidden`` is not modified;
    ``progress`` (a tqdm bar or None) is advanced once per block.

    ``keep_states``: keep the hidden states entering blocks ``0 .. keep_states - 1`` in
    ``Scores.states`` (references to the pass's own tensors: no copy). ``hasher``: each
    block's linear layers are hashed for the fingerprint while the block computes.
    ``prefetch``: block ``i + 1`` is read from the checkpoint (and cast to float32) in a
    background thread while block ``i`` computes: one block more in memory."""
    import time

    if select not in STREAM_SELECTIONS:
        raise LfgraphError(f"the streaming path selects by {' or '.join(STREAM_SELECTIONS)}, not {select!r}: use the in-memory path (without --stream)")
    t0 = time.perf_counter()
    L = skeleton.num_layers
    bi = dict.fromkeys(range(L), 0.0)
    starts = [l for l in range(L) if l + n_drop <= L] if select == "angular" else []
    ang = dict.fromkeys(starts, 0.0)
    count = sum(_tokens(h).shape[0] for h in inputs.hidden)
    x = list(inputs.hidden)
    # angular compares x_l with x_{l+n}: keep the last n + 1 states (history[0] is x_l for l = i + 1 - n)
    history: deque[list[torch.Tensor]] = deque([x], maxlen=n_drop + 1 if select == "angular" else 1)
    states: dict[int, list[torch.Tensor]] = {}
    # the next block is read (and cast to float32) in a background thread while this one computes
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfgraph-read") if prefetch else None
    following: Future | None = reader.submit(skeleton.read_block, 0) if reader is not None else None
    try:
        for i in range(L):
            if i < keep_states:
                states[i] = x
            if hasher is not None:
                hasher.wait()  # the previous block's tensors are let go before the next read starts
            block = skeleton.materialize(i, state=following.result() if following is not None else None)
            following = reader.submit(skeleton.read_block, i + 1) if reader is not None and i + 1 < L else None
            try:
                if hasher is not None:
                    hasher.submit(i, block)
                y = [block_output(block(h, **kw[i])) for h, kw in zip(x, inputs.kwargs)]
            finally:
                skeleton.release(i)
            x = _scores_step(i, x, y, bi, ang, history, select, n_drop)
            if progress is not None:
                progress.update(1)
    finally:
        if reader is not None:
            reader.shutdown(wait=True, cancel_futures=True)
        if hasher is not None:
            hasher.wait()
    return Scores({i: s / count for i, s in bi.items()}, {l: s / count for l, s in ang.items()}, count, time.perf_counter() - t0, states)


def _scores_step(i: int, x: list[torch.Tensor], y: list[torch.Tensor], bi: dict[int, float], ang: dict[int, float],
                 history: deque, select: str, n_drop: int) -> list[torch.Tensor]:
    """Add block ``i``'s contributions (input ``x``, output ``y``) to the scores; returns ``y``."""
    for h, out in zip(x, y):
        if h.shape != out.shape:
            raise LfgraphError(f"block {i} changes the shape of its input: it cannot be dropped")
        bi[i] += float((1.0 - _cosine(h, out)).sum())
    history.append(y)
    l = i + 1 - n_drop
    if select == "angular" and l >= 0:
        for start, out in zip(history[0], y):
            cos = _cosine(start, out).clamp(-1.0, 1.0)
            ang[l] += float((torch.arccos(cos) / math.pi).sum())
    return y


def select_runs(scores: Scores, select: str, num_layers: int, n_drop: int) -> list[Run]:
    """The runs the in-memory selection makes from the same scores: Block Influence drops
    the ``n_drop`` lowest (ties: lower index); angular the closest contiguous run."""
    idx = list(range(num_layers))
    _check_n(n_drop, idx)
    if select == "block_influence":
        order = sorted(idx, key=lambda i: (scores.block_influence[i], i))
        return runs_from_order(order, idx, n_drop, scores.block_influence)
    return runs_from_angular(scores.angular, idx, n_drop)
