"""Block-wise distillation: after a calibrated fit, train the blocks around each cut to
reproduce the original model's hidden states, one block in training at a time.

The logit distillation of :mod:`lfgraph.passes.map_distillation` trains against the
original's next-token distribution, which needs every block above the cut at every step
(forward and backward through the whole upper stack): for a model onloaded block by block
from a checkpoint that is a read of the upper stack per step. This objective needs only
the blocks it trains. For each run (bottom-up, as the refit goes), the trained region is
the run's kept block (``maps``: its refitted projections only) and, with ``neighbors``,
the first block after the run; each block of the region in turn trains, with AdamW and
the refit's token weights (massive-activation tokens clipped), so that the compressed
model's hidden state after it matches the original model's hidden state at the same
depth:

- the kept block: the original's state after the whole run (what the refit fitted in
  closed form, now with every parameter of the block free);
- the block after the run: the original's state after that block (it also absorbs what
  the kept block could not reproduce).

The inputs are the compressed model's states entering each block (the refit's), the
targets the original's (computed from the run's outputs, one block more); teacher states
are computed once, never at each step. A held-out part of the calibration windows (the
refit's) is scored every ``eval_every`` steps and the best state kept, so a block is never
worse on those windows than its closed-form start. One block, its gradients and AdamW's
two moments are in memory at a time.

Expects blocks of a transformer stack (``LayerCall``s of :mod:`lfgraph.blocks`).
Guarantees: only the trained blocks' floating parameters change; every ``requires_grad``
flag is restored; runs deterministically for a given ``seed``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import LfgraphError

#: What trains: ``maps`` the kept block's refitted projections, ``kept`` every parameter of
#: the kept block, ``neighbors`` the kept block and then the block after the run.
BLOCKWISE_TRAINABLE = ("maps", "kept", "neighbors")


@dataclass
class BlockwiseSettings:
    """How each block of a region trains (defaults: see docs/study, calibration-side
    validation on SmolLM2)."""

    steps: int = 60
    lr: float = 1e-4
    eval_every: int = 10
    trainable: str = "neighbors"
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _weights(update: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token weights of the refit (:func:`lfgraph.passes.calibrated_fusion._token_weights`)."""
    from .calibrated_fusion import _token_weights

    w = _token_weights(update.reshape(-1, update.shape[-1]), "clip", clip)
    return torch.ones(update.reshape(-1, update.shape[-1]).shape[0], dtype=torch.float64) if w is None else w


def _loss(out: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted squared error per token, relative to the target's weighted energy."""
    d = (out - target).reshape(-1, out.shape[-1]).pow(2).sum(-1)
    e = target.reshape(-1, target.shape[-1]).pow(2).sum(-1)
    w = w.to(out.dtype)
    return (d * w).sum() / (e * w).sum().clamp_min(1e-30)


def train_block(block: nn.Module, at: int, batches: Sequence[Any], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                weights: Sequence[torch.Tensor], settings: BlockwiseSettings, params: Sequence[nn.Parameter] | None = None,
                desc: str = "block-wise distillation", keep_dtypes: Mapping[int, torch.dtype] | None = None) -> dict[str, Any]:
    """Train ``block`` (layer ``at`` of its stack; ``batches[k].calls[at]`` is its call) so
    that its output on ``inputs[k]`` matches ``targets[k]`` (token weights ``weights[k]``);
    batches with ``.val`` set are held out and choose the best state. ``params``: the
    parameters that train (default: every floating parameter of the block).
    ``keep_dtypes`` (``id(parameter)`` -> dtype): the dtypes the block will be stored in (a
    checkpoint's): the best state is kept in them (what will be written; half the memory of
    float32 for bf16), and the block ends with those values. Returns the record: held-out loss at the start and at the best
    step, steps, seconds."""
    fit = [k for k, b in enumerate(batches) if not b.val]
    val = [k for k, b in enumerate(batches) if b.val] or fit
    if not fit:
        raise LfgraphError("block-wise distillation needs calibration windows to train on: give more calibration windows")
    params = list(params) if params is not None else [p for p in block.parameters() if p.is_floating_point()]
    flags = {id(p): p.requires_grad for p in block.parameters()}
    t0 = time.perf_counter()

    def held_out() -> float:
        with torch.no_grad():
            return float(sum(_loss(batches[k].run(block, at, inputs[k]), targets[k], weights[k]) for k in val) / len(val))

    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        def snapshot() -> dict[int, torch.Tensor]:
            return {id(p): p.detach().to((keep_dtypes or {}).get(id(p), p.dtype), copy=True) for p in params}

        start = best = held_out()
        best_state = snapshot()
        best_step = 0
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        gen = torch.Generator().manual_seed(settings.seed)
        bar = None
        if settings.progress:
            from tqdm import tqdm

            bar = tqdm(total=settings.steps, desc=desc, leave=False)
        with torch.enable_grad():
            for step in range(1, settings.steps + 1):
                k = fit[int(torch.randint(len(fit), (1,), generator=gen))]
                # warm-up over the first tenth, then cosine decay
                warm = max(1, settings.steps // 10)
                factor = step / warm if step <= warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, settings.steps - warm)))
                for g in opt.param_groups:
                    g["lr"] = settings.lr * factor
                loss = _loss(batches[k].run(block, at, inputs[k]), targets[k], weights[k])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss):.4f}")
                if step % settings.eval_every == 0 or step == settings.steps:
                    score = held_out()
                    if score < best:
                        best, best_step = score, step
                        best_state = snapshot()
        if bar is not None:
            bar.close()
        with torch.no_grad():
            for p in params:
                p.copy_(best_state[id(p)])
        del opt
    finally:
        for p in block.parameters():
            p.requires_grad_(flags.get(id(p), False))
            p.grad = None
    return {"heldout_start": start, "heldout_best": best, "best_step": best_step, "steps": settings.steps,
            "seconds": round(time.perf_counter() - t0, 3), "trainable_params": int(sum(p.numel() for p in params))}


def refitted_params(block: nn.Module, targets: Sequence[str]) -> list[nn.Parameter]:
    """The parameters of the refitted projections ``targets`` (block-relative module paths)."""
    out: list[nn.Parameter] = []
    for t in targets:
        out.extend(p for p in block.get_submodule(t).parameters() if p.is_floating_point())
    if not out:
        raise LfgraphError("no refitted projection to train in the kept block")
    return out


class BlockwiseDistiller:
    """The refit's ``after_fit`` hook (:func:`lfgraph.passes.calibrated_fusion.fit_runs`) that
    trains each run's region; :attr:`records` holds one record per trained block.

    ``source``: the compressed model's block source (its blocks after a run are opened here
    for ``neighbors``; their trained tensors kept with ``source.keep_changes``);
    ``original``: the original model's (to compute the targets after the run's next block)."""

    def __init__(self, source: Any, original: Any, settings: BlockwiseSettings, refit_targets: dict[int, list[str]],
                 next_block: dict[int, int | None], clip: float = 4.0) -> None:
        self.source, self.original, self.settings = source, original, settings
        self.refit_targets, self.next_block, self.clip = refit_targets, next_block, clip
        self.records: list[dict[str, Any]] = []

    def __call__(self, spec: Any, kept: nn.Module, state: Sequence[Any], run_out: Sequence[torch.Tensor]) -> None:
        if spec.repair:
            return
        s = self.settings
        keep = spec.keep
        inputs = [b.x for b in state]
        weights = [_weights(out - x, self.clip) for out, x in zip(run_out, inputs)]
        params = refitted_params(kept, self.refit_targets.get(keep, [])) if s.trainable == "maps" else None
        rec = train_block(kept, keep, state, inputs, list(run_out), weights, s, params, desc=f"block-wise distillation ({self.source.block_name(keep)})",
                          keep_dtypes=self.source.stored_dtypes(keep, kept))
        self.records.append({"block": self.source.block_name(keep), **rec})
        self.source.keep_changes(keep, kept, [k for k, _ in kept.named_parameters()])
        nxt = self.next_block.get(keep)
        if s.trainable != "neighbors" or nxt is None:
            return
        with torch.no_grad():
            after_kept = [b.run(kept, keep) for b in state]
        with self.original.open(nxt) as original_next, torch.no_grad():
            targets = [b.run(original_next, nxt, out) for b, out in zip(state, run_out)]
        with self.source.open(nxt) as block:
            w2 = [_weights(t - x, self.clip) for t, x in zip(targets, after_kept)]
            rec = train_block(block, nxt, state, after_kept, targets, w2, s, desc=f"block-wise distillation ({self.source.block_name(nxt)})",
                              keep_dtypes=self.source.stored_dtypes(nxt, block))
            self.records.append({"block": self.source.block_name(nxt), **rec})
            self.source.keep_changes(nxt, block, [k for k, _ in block.named_parameters()])


def check_blockwise(settings: BlockwiseSettings) -> None:
    if settings.trainable not in BLOCKWISE_TRAINABLE:
        raise LfgraphError(f"block-wise distillation trains one of {', '.join(BLOCKWISE_TRAINABLE)}, not {settings.trainable!r}")
    if settings.steps < 1:
        raise LfgraphError(f"block-wise distillation steps must be >= 1, got {settings.steps}")

