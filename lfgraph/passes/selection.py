"""Selection criteria: which runs of consecutive blocks to fuse, for a number of blocks to drop.

Selection and fusion are independent choices. A selector returns :class:`Run` objects: a
run is a list of consecutive block indices ``[i, i+1, ..., j]`` plus the one block it keeps;
fusing it (by any rule: ``remove``, ``mean``, ``calibrated``) leaves one block where the run
was, so a run drops ``len(run) - 1`` blocks. Criteria:

- ``block_influence`` (ShortGPT, Men et al. 2024): BI of a block is
  ``1 - cos(input, output)`` averaged over tokens; the ``n`` lowest are dropped.
- ``angular`` (Gromov et al. 2024): the contiguous run of ``n`` blocks ``l .. l+n-1`` whose
  input and output are closest in angular distance ``arccos(cos(x_l, x_{l+n})) / pi``
  (averaged over tokens) is dropped.
- ``sleb`` (Song et al. 2024): greedily drop the block whose removal raises the calibration
  loss least (next-token NLL for language models; otherwise agreement with the original
  model: cross-entropy to its predicted classes, or squared error of its output),
  re-scoring on the already-pruned model at every step.
- ``similarity``: the core's weight-similarity planner (adjacent pairs by a weight metric,
  default Bures), which needs no data.

Criteria that drop single blocks (BI, SLEB) give runs made of the dropped blocks plus the
neighbour that absorbs them (the one below, or above at the bottom of a stack); consecutive
dropped blocks share one run. All criteria that read activations stream them batch by batch
through forward hooks, so memory holds one batch's hidden states, never the whole set.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import LfgraphError
from ..graph import LayerGraph
from ..plan import Fusion, FusionPlan
from .block_stack import split_block_name


@dataclass
class Run:
    """Consecutive blocks (indices into their container) fused into the one at ``keep``."""

    blocks: list[int]
    keep: int
    score: float = 0.0

    @property
    def absorb(self) -> list[int]:
        return [b for b in self.blocks if b != self.keep]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _stack(module: nn.Module, blocks: Sequence[str]) -> tuple[str, list[nn.Module], list[int]]:
    """(container path, every block module of the container, indices of ``blocks`` in it)."""
    if not blocks:
        raise LfgraphError("no blocks to select from: the model has no removable blocks")
    parts = [split_block_name(b) for b in blocks]
    containers = {c for c, _ in parts}
    if len(containers) != 1:
        raise LfgraphError(f"selection works on one stack of blocks at a time, got blocks from {sorted(containers)}")
    cpath = containers.pop()
    return cpath, list(module.get_submodule(cpath)), sorted(i for _, i in parts)


def _tokens(h: torch.Tensor) -> torch.Tensor:
    """A hidden state as ``(tokens, features)``: channels are the features of a feature map."""
    if h.dim() == 4:
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    return h.reshape(-1, h.shape[-1])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _tokens(a).double(), _tokens(b).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def _segments(allowed: Sequence[int]) -> list[list[int]]:
    """Maximal runs of consecutive indices in ``allowed``."""
    out: list[list[int]] = []
    for i in sorted(allowed):
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def runs_from_dropped(dropped: Sequence[int], allowed: Sequence[int], scores: dict[int, float] | None = None) -> list[Run]:
    """Group dropped block indices into runs, each with the neighbour that keeps them.

    A maximal group of consecutive dropped blocks is absorbed by the block just below it
    (or just above it at the bottom of its segment of ``allowed`` blocks). Raises
    ``LfgraphError`` when a whole segment would be dropped (nothing left to keep).
    """
    drop = set(dropped)
    allowed_set = set(allowed)
    if not drop <= allowed_set:
        raise LfgraphError(f"blocks {sorted(drop - allowed_set)} cannot be dropped (not removable)")
    runs: list[Run] = []
    for group in _segments(sorted(drop)):
        below, above = group[0] - 1, group[-1] + 1
        if below in allowed_set and below not in drop:
            runs.append(Run([below, *group], keep=below))
        elif above in allowed_set and above not in drop:
            runs.append(Run([*group, above], keep=above))
        else:
            raise LfgraphError(f"dropping blocks {group} leaves no neighbouring block to keep: lower the target")
    runs.sort(key=lambda r: r.blocks[0])
    # a run absorbed upwards can touch the next run's kept block: join them
    merged: list[Run] = []
    for r in runs:
        if merged and merged[-1].blocks[-1] >= r.blocks[0]:
            prev = merged[-1]
            blocks = sorted(set(prev.blocks) | set(r.blocks))
            kept = [b for b in blocks if b not in drop]
            merged[-1] = Run(blocks, keep=kept[0])
        else:
            merged.append(r)
    if scores:
        for r in merged:
            r.score = float(sum(scores.get(b, 0.0) for b in r.absorb))
    return merged


def _check_n(n_drop: int, allowed: Sequence[int]) -> None:
    if n_drop < 1:
        raise LfgraphError(f"the number of blocks to drop must be at least 1, got {n_drop}")
    if n_drop > len(allowed) - len(_segments(allowed)):
        raise LfgraphError(
            f"cannot drop {n_drop} of {len(allowed)} removable blocks (each stack keeps at least one): lower the target"
        )


# ---------------------------------------------------------------------------------------
# criteria
# ---------------------------------------------------------------------------------------


def _as_source(model: Any, blocks: Sequence[str] | Sequence[int]) -> tuple[Any, list[int]]:
    """(block source, indices of ``blocks`` in its stack) for a model in memory (its
    blocks held: :class:`~lfgraph.blocks.HeldBlocks`) or a block source (blocks named as
    its plans name them, or given as indices)."""
    from ..blocks import BlockSource, HeldBlocks

    if isinstance(model, BlockSource):
        idx = sorted(b if isinstance(b, int) else split_block_name(b)[1] for b in blocks)
        if not idx:
            raise LfgraphError("no blocks to select from: the model has no removable blocks")
        return model, idx
    cpath, _, idx = _stack(model, blocks)  # type: ignore[arg-type]
    return HeldBlocks(model, cpath), idx


@dataclass
class StackScores:
    """What one pass of the calibration windows through the stack accumulated: Block
    Influence per block, angular distance per run start, the positions scored, and the
    hidden states entering the blocks asked for (block index -> one tensor per batch)."""

    block_influence: dict[int, float]
    angular: dict[int, float]
    tokens: int
    states: dict[int, list[torch.Tensor]]


@torch.no_grad()
def stack_scores(source: Any, inputs: Any, idx: Sequence[int], n: int = 0, *, angular: bool = False, keep: Sequence[int] = (),
                 observe: Callable[[int, nn.Module], None] | None = None, progress: Any = None) -> StackScores:
    """Run ``inputs`` (a :class:`~lfgraph.blocks.StackInput`) through ``source``'s stack block
    by block and accumulate Block Influence of the blocks ``idx`` (``1 - cos(input,
    output)`` summed over every token or spatial position) and, with ``angular``, Gromov et
    al.'s distance ``arccos(cos(x_l, x_{l+n})) / pi`` of every run of ``n`` blocks of
    ``idx``; both divided by the positions scored. Runs only the blocks the scores need.

    ``keep``: the hidden states entering these blocks are kept (references, no copies);
    ``observe(i, block)`` sees each block while it is in memory (the fingerprint hashes a
    checkpoint's blocks there); ``progress`` (a tqdm bar) advances once per block. The
    source is only read."""
    allowed = set(idx)
    starts = [l for l in idx if all(l + k in allowed for k in range(n))] if angular else []
    bi = dict.fromkeys(idx, 0.0)
    ang = dict.fromkeys(starts, 0.0)
    count = sum(_tokens(h).shape[0] for h in inputs.hidden)
    stop = max([max(idx)] + [l + n - 1 for l in starts]) + 1
    memory = getattr(source, "memory", None)
    remember = memory.wanted(inputs) if memory is not None else set()
    keep = set(keep) | remember
    x = list(inputs.hidden)
    history: deque[list[torch.Tensor]] = deque([x], maxlen=n + 1 if angular else 1)
    states: dict[int, list[torch.Tensor]] = {}
    for i, block in source.blocks(range(stop)):
        if i in keep:
            states[i] = x
        if observe is not None:
            observe(i, block)
        y = [calls[i](block, h) for h, calls in zip(x, inputs.calls)]
        if i in allowed:
            for h, out in zip(x, y):
                if h.shape != out.shape:
                    raise LfgraphError(f"block {source.block_name(i)} changes the shape of its input: it cannot be dropped")
                bi[i] += float((1.0 - _cosine(h, out)).sum())
        history.append(y)
        l = i + 1 - n
        if l in ang:
            for start, out in zip(history[0], y):
                ang[l] += float((torch.arccos(_cosine(start, out).clamp(-1.0, 1.0)) / math.pi).sum())
        x = y
        if progress is not None:
            progress.update(1)
    if remember:
        memory.store(inputs, {i: states[i] for i in remember if i in states})  # type: ignore[union-attr]
    return StackScores({i: v / count for i, v in bi.items()}, {l: v / count for l, v in ang.items()}, count, states)


def _inputs(source: Any, calibration: Any, batch_size: int) -> Any:
    """The stack's input for the calibration windows (``calibration``: token ids or samples,
    or a :class:`~lfgraph.blocks.StackInput` already made)."""
    from ..blocks import StackInput

    return calibration if isinstance(calibration, StackInput) else source.stack_input([calibration], batch_size)


def block_influence_scores(module: Any, blocks: Sequence[str], calibration: Any, batch_size: int = 4) -> dict[int, float]:
    """Block Influence of each named block: ``1 - cos(input, output)`` averaged over every
    token (every spatial position of a feature map) of ``calibration``. Keys are indices
    into the blocks' container. ``module``: a model in memory or a block source; it is
    only run, not modified."""
    source, idx = _as_source(module, blocks)
    return stack_scores(source, _inputs(source, calibration, batch_size), idx).block_influence


def block_influence(module: Any, blocks: Sequence[str], calibration: Any, n_drop: int, *, batch_size: int = 4, **_: Any) -> list[Run]:
    """ShortGPT: drop the ``n_drop`` blocks of lowest Block Influence (ties: lower index)."""
    source, idx = _as_source(module, blocks)
    _check_n(n_drop, idx)
    scores = block_influence_scores(source, idx, calibration, batch_size)
    order = sorted(idx, key=lambda i: (scores[i], i))
    return runs_from_order(order, idx, n_drop, scores)


def runs_from_order(order: Sequence[int], allowed: Sequence[int], n_drop: int, scores: dict[int, float] | None = None) -> list[Run]:
    """Runs that drop the first ``n_drop`` blocks of ``order`` (best first), skipping any
    block whose segment of ``allowed`` blocks would otherwise be left empty."""
    segment_of = {i: k for k, seg in enumerate(_segments(allowed)) for i in seg}
    left = {k: len(seg) for k, seg in enumerate(_segments(allowed))}
    dropped: list[int] = []
    for i in order:
        if len(dropped) == n_drop:
            break
        if left[segment_of[i]] > 1:
            dropped.append(i)
            left[segment_of[i]] -= 1
    return runs_from_dropped(dropped, allowed, scores)


def angular_distances(module: Any, blocks: Sequence[str], calibration: Any, n: int, batch_size: int = 4) -> dict[int, float]:
    """Gromov et al.'s distance for every start ``l`` of a run of ``n`` named blocks:
    ``arccos(cos(x_l, x_{l+n})) / pi`` averaged over tokens, where ``x_l`` is the input of
    block ``l`` (``x_{l+n}`` the output of block ``l+n-1``). Only runs made entirely of the
    named blocks are scored. ``module``: a model in memory or a block source."""
    source, idx = _as_source(module, blocks)
    return stack_scores(source, _inputs(source, calibration, batch_size), idx, n, angular=True).angular


def angular(module: Any, blocks: Sequence[str], calibration: Any, n_drop: int, *, batch_size: int = 4, **_: Any) -> list[Run]:
    """Gromov et al.: drop the contiguous ``n_drop`` blocks with the smallest angular
    distance between their input and output (one run, plus its keeping neighbour)."""
    source, idx = _as_source(module, blocks)
    _check_n(n_drop, idx)
    dist = angular_distances(source, idx, calibration, n_drop, batch_size)
    return runs_from_angular(dist, idx, n_drop)


def runs_from_angular(dist: dict[int, float], allowed_blocks: Sequence[int], n_drop: int) -> list[Run]:
    """Gromov et al.'s one run from the angular distances ``dist`` (start -> distance, as
    :func:`angular_distances` gives them): the closest start whose dropped blocks keep a
    neighbour, plus that neighbour. Raises ``LfgraphError`` when no start has one."""
    idx = sorted(allowed_blocks)
    # a start is usable only when a neighbour of the dropped run remains to keep it
    allowed = set(idx)
    usable = {l: d for l, d in dist.items() if (l - 1) in allowed or (l + n_drop) in allowed}
    if not usable:
        raise LfgraphError(f"no run of {n_drop} consecutive removable blocks has a neighbour to keep it: lower the target")
    best = min(usable, key=lambda l: (usable[l], l))
    runs = runs_from_dropped(list(range(best, best + n_drop)), idx)
    runs[0].score = usable[best]
    return runs


def _objective(calibration: torch.Tensor, out: torch.Tensor) -> str:
    """``nll`` when the model maps token ids to next-token logits; otherwise agreement with
    the original model: ``ce`` (cross-entropy to its softmax) for class scores ``(N, C)``,
    ``mse`` for anything else (e.g. an encoder's hidden states)."""
    if not calibration.is_floating_point() and out.dim() == 3 and out.shape[-1] > int(calibration.max()):
        return "nll"
    return "ce" if out.dim() == 2 else "mse"


def _loss(out: torch.Tensor, batch: torch.Tensor, reference: torch.Tensor | None, objective: str) -> float:
    """The summed calibration loss of one batch under ``objective`` (see :func:`_objective`)."""
    if objective == "nll":
        logits = out[:, :-1].reshape(-1, out.shape[-1]).float()
        return float(nn.functional.cross_entropy(logits, batch[:, 1:].reshape(-1), reduction="sum"))
    assert reference is not None
    if objective == "ce":
        target = torch.softmax(reference.float(), dim=-1)
        return float(-(target * torch.log_softmax(out.float(), dim=-1)).sum())
    return float((out.float() - reference.float()).pow(2).sum())


@torch.no_grad()
def sleb_order(
    module: Any, blocks: Sequence[str], calibration: torch.Tensor, n_drop: int, *, batch_size: int = 4,
    progress: bool = False, on_step: Callable[[int, int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """SLEB's greedy removal order: ``n_drop`` pairs ``(block index, calibration loss of the
    model without it and the blocks before it in the list)``.

    Greedy steps are nested, so the first ``k`` entries are SLEB's choice for ``k`` blocks.
    Each step is one pass over the blocks still in the model (one block in memory at a
    time: ``module`` may be a block source): the current model's hidden state advances
    block by block, and so does, from the point where it skips its candidate, the hidden
    state of the model without each candidate; each candidate's loss is then the model's
    head on its state. Use a small calibration budget (a few hundred tokens: the states
    of every candidate are held). ``on_step(step, block, loss)`` is called after each step.
    Nothing is modified."""
    source, idx = _as_source(module, blocks)
    _check_n(n_drop, idx)
    segments = _segments(idx)
    segment_of = {i: k for k, seg in enumerate(segments) for i in seg}
    left = {k: len(seg) for k, seg in enumerate(segments)}
    inputs = _inputs(source, calibration, batch_size)
    with source.head() as head:
        base = list(inputs.hidden)
        for i, block in source.blocks():
            base = [calls[i](block, h) for h, calls in zip(base, inputs.calls)]
        references = [head(h, ids) for h, ids in zip(base, inputs.ids)]
        objective = _objective(calibration, references[0])
        current = list(range(source.num_blocks))  # blocks still in the model
        order: list[tuple[int, float]] = []
        steps: Any = range(n_drop)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="sleb", leave=False)
        for step in steps:
            candidates = [i for i in current if i in segment_of and left[segment_of[i]] > 1]
            x = list(inputs.hidden)
            skipping: dict[int, list[torch.Tensor]] = {}  # candidate -> state of the model without it
            for k, block in source.blocks(current):
                if k in candidates:
                    skipping[k] = x
                for j in skipping:
                    if j != k:
                        skipping[j] = [calls[k](block, h) for h, calls in zip(skipping[j], inputs.calls)]
                x = [calls[k](block, h) for h, calls in zip(x, inputs.calls)]
            loss = {j: sum(_loss(head(h, ids), ids, ref, objective) for h, ids, ref in zip(skipping[j], inputs.ids, references))
                    for j in candidates}
            best = min(candidates, key=lambda i: (loss[i], i))
            order.append((best, loss[best]))
            current.remove(best)
            left[segment_of[best]] -= 1
            if on_step is not None:
                on_step(step, best, loss[best])
    return order


def sleb(module: Any, blocks: Sequence[str], calibration: torch.Tensor, n_drop: int, *, batch_size: int = 4, progress: bool = False, **_: Any) -> list[Run]:
    """SLEB: ``n_drop`` greedy steps, each dropping the block whose removal from the model
    as pruned so far raises the calibration loss least (see :func:`sleb_order`)."""
    source, idx = _as_source(module, blocks)
    order = sleb_order(source, idx, calibration, n_drop, batch_size=batch_size, progress=progress)
    return runs_from_dropped([i for i, _ in order], idx, dict(order))


def similarity(
    module: nn.Module, blocks: Sequence[str], calibration: torch.Tensor | None, n_drop: int, *,
    graph: LayerGraph | None = None, metric: str = "bures", scope: str = "adjacent", analysis: Any = None, **_: Any,
) -> list[Run]:
    """The core's weight-similarity planner (no data needed): fuse the most alike blocks by
    ``metric`` within ``scope``. Needs the model's ``graph`` (and takes a precomputed
    ``analysis`` of it, to plan several targets from one analysis); with
    ``scope="adjacent"`` the planner's sets are runs of neighbours, each keeping its first block."""
    if graph is None:
        raise LfgraphError("selection 'similarity' reads weights from the layer graph: pass graph=build_layer_graph(...)")
    from .planner import make_plan

    _, _, idx = _stack(module, blocks)
    _check_n(n_drop, idx)
    plan = make_plan(graph, metric=metric, target=n_drop / len(graph.blocks), target_kind="blocks", scope=scope, mode="merge", fuse="remove", analysis=analysis)
    runs = []
    for f in plan.fusions:
        members = sorted(split_block_name(n)[1] for n in [f.keep, *f.absorb])
        if members != list(range(members[0], members[-1] + 1)):
            raise LfgraphError(f"selection 'similarity' with scope {scope!r} gave a set of blocks that is not a run: {members}; use scope 'adjacent'")
        runs.append(Run(members, keep=split_block_name(f.keep)[1], score=f.score))
    return sorted(runs, key=lambda r: r.blocks[0])


#: Selection criteria by name: ``fn(module, blocks, calibration, n_drop, **options) -> list[Run]``.
SELECTORS: dict[str, Callable[..., list[Run]]] = {
    "block_influence": block_influence,
    "angular": angular,
    "sleb": sleb,
    "similarity": similarity,
}


def select_runs(name: str, module: nn.Module, blocks: Sequence[str], calibration: torch.Tensor | None, n_drop: int, **options: Any) -> list[Run]:
    """Run the selector ``name`` from :data:`SELECTORS`; raises ``LfgraphError`` for an unknown one."""
    if name not in SELECTORS:
        raise LfgraphError(f"unknown selection {name!r}: choose one of {', '.join(SELECTORS)}")
    if name != "similarity" and calibration is None:
        raise LfgraphError(f"selection {name!r} needs calibration data")
    return SELECTORS[name](module, blocks, calibration, n_drop, **options)


def runs_to_plan(runs: Sequence[Run], container: str, fuse: str = "mean", align: bool = True, provenance: dict[str, Any] | None = None) -> FusionPlan:
    """A merge :class:`FusionPlan` for ``runs`` of the stack at ``container`` (block names
    ``f"{container}.{i}"``), to be applied by any fuse rule."""
    fusions = [
        Fusion(keep=f"{container}.{r.keep}", absorb=[f"{container}.{i}" for i in r.absorb], unit="block", score=r.score, align=align)
        for r in runs
    ]
    prov = dict(provenance or {})
    prov.setdefault("blocks_removed", sum(len(r.absorb) for r in runs))
    return FusionPlan(fusions=fusions, mode="merge", fuse=fuse, provenance=prov)
