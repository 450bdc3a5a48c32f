"""Calibrated fusion: a run of consecutive blocks becomes one block refitted to reproduce it.

For each run (bottom-up) one block is kept and its output projection is refitted in closed
form so that the kept block alone maps the run's input to (approximately) the run's output:

    W = argmin_W  sum_t w_t ||W z_t - y_t||^2  +  lam ||W - W0||^2
      = (C + lam W0) (G + lam I)^-1,     G = sum_t w_t z_t z_t^T,  C = sum_t w_t y_t z_t^T

- Transformers (pre-LayerNorm: ``out = x + attn(x) + down(z)``): ``z_t`` is the MLP down
  projection's input at token ``t`` in the kept block and ``y_t`` the run's output minus
  everything else the kept block adds (its input and its attention update). Optionally the
  attention output projection is refitted first, so that the kept block's attention update
  matches the sum of the run's attention updates; the MLP is then fitted on the result.
- ResNet-style basic blocks (``relu(bn2(conv2(u)) + x)``): the last convolution, folded with
  its BatchNorm, is fitted on unfolded 3x3 patches of ``u`` so that the kept block's output
  matches the run's output (where the run outputs 0, the pre-activation need only be <= 0).

Every statistic is accumulated in float64 batch by batch (bounded memory: the Gram matrices
plus one hidden state per calibration token at the current depth). The ridge strength is
chosen on a held-out part of the calibration windows from a grid of strengths relative to
``trace(G) / dim`` (so the grid means the same for any amount of data), then the fit is
redone on all windows. ``lam -> infinity`` gives back ``W0``.

Each run is fitted on the hidden states of the model as already compressed below it, so
later fits see (and can absorb) the error of earlier ones. The other blocks of each run are
then deleted (:func:`~lfgraph.passes.block_stack.remove_blocks`). Optionally
(``repair_next``) the blocks just above a run are refitted too, towards the original
model's hidden states.

Before fitting a transformer block, the pass checks that the block's output really is
``rest + proj(z)`` (it shifts the projection's output and watches the block's output move
by the same amount), so that post-LayerNorm blocks (BERT) are refused with a clear error
instead of being fitted wrongly.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..calibration import batches, block_output, capture_block_input
from ..errors import LfgraphError, UnsupportedModelError
from ..plan import FusionPlan
from .base import PassResult, RewriteLog
from .block_stack import remove_blocks, split_block_name

if TYPE_CHECKING:
    from .map_distillation import DistillSettings

PASS_NAME = "calibrated_fusion"

#: Ridge strengths tried, relative to ``trace(G) / dim`` of the Gram matrix being fitted.
DEFAULT_LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
#: Module names (inside a block) of the MLP's output projection, in the order tried.
MLP_OUT_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "feed_forward.w2", "mlp.dense_4h_to_h")
#: Module names (inside a block) of the attention output projection, in the order tried.
ATTN_OUT_NAMES = ("self_attn.o_proj", "attn.c_proj", "self_attn.out_proj", "attention.wo", "self_attention.dense")
KEEP_POLICIES = ("first", "last", "best")
TOKEN_WEIGHTINGS = ("none", "clip")
TARGETS = ("composite", "original")
#: How much a refit may move a projection: ``full`` refits every entry of ``W`` (out x in);
#: ``map`` only ``W <- M W`` with a square ``M`` (out x out) on its output, as ReplaceMe's ``T``.
REFITS = ("full", "map")


# ---------------------------------------------------------------------------------------
# ridge least squares
# ---------------------------------------------------------------------------------------


@dataclass
class RidgeStats:
    """Weighted sufficient statistics of a least-squares problem ``W z ≈ y``:
    ``G = Σ w z zᵀ`` (in×in), ``C = Σ w y zᵀ`` (out×in), ``S = Σ w ‖y‖²``, ``n`` tokens."""

    G: torch.Tensor
    C: torch.Tensor
    S: float = 0.0
    n: int = 0

    @classmethod
    def zeros(cls, d_in: int, d_out: int) -> "RidgeStats":
        return cls(torch.zeros(d_in, d_in, dtype=torch.float64), torch.zeros(d_out, d_in, dtype=torch.float64))

    def add(self, z: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """Accumulate tokens ``z (n, in)``, ``y (n, out)`` with weights ``w (n,)``."""
        z, y = z.double(), y.double()
        zw = z if w is None else z * w.double()[:, None]
        self.G += zw.T @ z
        self.C += y.T @ zw
        self.S += float(((y * y).sum(1) * (1.0 if w is None else w.double())).sum())
        self.n += z.shape[0]

    def __add__(self, other: "RidgeStats") -> "RidgeStats":
        return RidgeStats(self.G + other.G, self.C + other.C, self.S + other.S, self.n + other.n)

    def scale(self) -> float:
        """``trace(G) / dim``: the unit in which ridge strengths are given."""
        return max(float(torch.diagonal(self.G).mean()), 1e-30)

    def loss(self, W: torch.Tensor) -> float:
        """``Σ w ‖W z - y‖²`` from the statistics alone."""
        W = W.double()
        return float((W @ self.G * W).sum() - 2.0 * (W * self.C).sum() + self.S)


def map_stats(stats: RidgeStats, W0: torch.Tensor) -> RidgeStats:
    """The statistics of the problem ``M a ≈ y`` with ``a = W0 z`` (a refit ``W = M W0`` that
    only mixes the projection's outputs): ``G' = W0 G W0ᵀ``, ``C' = C W0ᵀ``."""
    W0 = W0.double()
    return RidgeStats(W0 @ stats.G @ W0.T, stats.C @ W0.T, stats.S, stats.n)


def ridge_solve(stats: RidgeStats, W0: torch.Tensor, strength: float) -> torch.Tensor:
    """``argmin_W Σ w ‖W z - y‖² + lam ‖W - W0‖²`` with ``lam = strength * stats.scale()``.

    Returns float64 ``(out, in)``. ``strength -> inf`` gives ``W0``; ``strength -> 0`` the
    ordinary least-squares fit (when ``G`` is invertible).
    """
    lam = strength * stats.scale()
    W0 = W0.double()
    A = stats.G + lam * torch.eye(stats.G.shape[0], dtype=torch.float64)
    B = stats.C + lam * W0
    # A is symmetric positive definite for lam > 0: Cholesky is exact and cheap
    try:
        L = torch.linalg.cholesky(A)
        return torch.cholesky_solve(B.T, L).T
    except RuntimeError:
        return torch.linalg.lstsq(A, B.T).solution.T


def choose_strength(fit: RidgeStats, val: RidgeStats | None, W0: torch.Tensor, strengths: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The strength of ``strengths`` with the lowest held-out loss (fit on ``fit``, scored on
    ``val``); with no held-out statistics or a single strength, the first one."""
    if val is None or val.n == 0 or len(strengths) == 1:
        return float(strengths[0]), {}
    losses = {float(s): val.loss(ridge_solve(fit, W0, s)) for s in strengths}
    return min(losses, key=lambda s: (losses[s], -s)), losses


# ---------------------------------------------------------------------------------------
# projections: nn.Linear and Hugging Face Conv1D (x @ W, weight stored (in, out))
# ---------------------------------------------------------------------------------------


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _proj_matrix(m: nn.Module) -> torch.Tensor:
    """The projection's ``(out, in [+1])`` matrix; a bias becomes the last column."""
    if isinstance(m, nn.Linear):
        W = m.weight.detach()
    elif _is_conv1d(m):
        W = m.weight.detach().T
    else:
        raise UnsupportedModelError(f"cannot refit a {type(m).__name__}: only Linear and Conv1D projections are supported")
    if getattr(m, "bias", None) is not None:
        W = torch.cat([W, m.bias.detach()[:, None]], dim=1)
    return W.double()


@torch.no_grad()
def _set_proj_matrix(m: nn.Module, W: torch.Tensor) -> None:
    has_bias = getattr(m, "bias", None) is not None
    weight = W[:, :-1] if has_bias else W
    if has_bias:
        m.bias.copy_(W[:, -1].to(m.bias.dtype))
    if isinstance(m, nn.Linear):
        m.weight.copy_(weight.to(m.weight.dtype))
    else:
        m.weight.copy_(weight.T.to(m.weight.dtype))


def _features(z: torch.Tensor, with_bias: bool) -> torch.Tensor:
    z = z.reshape(-1, z.shape[-1])
    return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1) if with_bias else z


def _find(block: nn.Module, names: Sequence[str], what: str, given: str | None) -> tuple[str, nn.Module]:
    for name in ([given] if given else names):
        try:
            return name, block.get_submodule(name)
        except AttributeError:
            continue
    raise UnsupportedModelError(
        f"{type(block).__name__} has no {what} among {list([given] if given else names)}: name it with "
        f"{'mlp_proj' if what.startswith('MLP') else 'attn_proj'}=..."
    )


class _Capture:
    """Forward hooks recording a module's input and output on every call (a list per run)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.inputs.append(args[0])
        self.outputs.append(out)

    def remove(self) -> None:
        self._h.remove()


def _token_weights(update: torch.Tensor, mode: str, clip: float) -> torch.Tensor | None:
    """Per-token weights from the norms of the run's update (``(tokens, d)``): with ``clip``,
    tokens whose update is more than ``clip`` times the median norm are weighted down so
    that each counts as if its norm were ``clip`` x median. Why: a few positions (the first
    token of a sequence in many LMs) carry updates hundreds of times larger than the rest
    and would otherwise decide the fit alone."""
    if mode == "none":
        return None
    norms = update.double().norm(dim=-1)
    cap = clip * norms.median().clamp_min(1e-12)
    return (cap / norms.clamp_min(1e-12)).clamp(max=1.0) ** 2


# ---------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------


@dataclass
class _Batch:
    ids: torch.Tensor
    kwargs: dict
    x: torch.Tensor  # hidden state entering the current run, in the compressed model
    xo: torch.Tensor | None  # the same in the original model (target="original")
    val: bool


@dataclass
class _RunSpec:
    names: list[str]
    index: list[int]
    keep: int | None  # index into the container, None = decide ("best")
    repair: bool = False  # a block after a run, refitted towards the original model


def _kind(block: nn.Module) -> str:
    if isinstance(getattr(block, "conv2", None), nn.Conv2d) and isinstance(getattr(block, "bn2", None), nn.BatchNorm2d):
        if getattr(block, "downsample", None) is not None:
            raise UnsupportedModelError(f"{type(block).__name__} has a projection skip: only identity-skip blocks can be fused")
        return "conv"
    return "transformer"


def _split_validation(n: int, val_fraction: float) -> torch.Tensor:
    """Boolean mask of held-out windows, spread evenly (every k-th window)."""
    mask = torch.zeros(n, dtype=torch.bool)
    n_val = int(round(n * val_fraction))
    if n >= 2 and n_val >= 1:
        n_val = min(n_val, n - 1)
        mask[torch.linspace(n - 1, 0, n_val).round().long()] = True
    return mask


def _run_blocks(stack: list[nn.Module], indices: Sequence[int], x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    for i in indices:
        x = block_output(stack[i](x, **kwargs))
    return x


def blocks_to_train(stack: Sequence[nn.Module], keeps: Sequence[int], runs: Sequence[Sequence[int]], trainable: str) -> list[nn.Module]:
    """The blocks of ``stack`` that train with the distilled maps under ``trainable``
    (``lfgraph.passes.map_distillation.DISTILL_TRAINABLE``), before the runs' absorbed
    blocks are removed: ``maps`` none; ``neighbors`` each run's kept block (``keeps``) and
    the first surviving block after the run; ``blocks`` every surviving block. Each block
    once, in stack order."""
    gone = {i for run, keep in zip(runs, keeps) for i in run if i != keep}
    alive = [i for i in range(len(stack)) if i not in gone]
    if trainable == "maps":
        return []
    if trainable == "blocks":
        return [stack[i] for i in alive]
    picked: set[int] = set()
    for run, keep in zip(runs, keeps):
        picked |= {keep, *[j for j in alive if j > max(run)][:1]}
    return [stack[i] for i in sorted(picked)]


@torch.no_grad()
def calibrated_merge(
    module: nn.Module,
    runs: Sequence[Sequence[str]],
    calibration: torch.Tensor,
    *,
    keep: str | Sequence[str] = "first",
    fit_attention: bool = False,
    strengths: Sequence[float] = DEFAULT_LAMBDAS,
    token_weighting: str = "clip",
    clip: float = 4.0,
    target: str = "composite",
    refit: str = "full",
    repair_next: int = 0,
    distill: "DistillSettings | None" = None,
    val_fraction: float = 0.25,
    batch_size: int = 4,
    mlp_proj: str | None = None,
    attn_proj: str | None = None,
    inplace: bool = False,
    progress: bool = False,
) -> PassResult:
    """Fuse each run of consecutive blocks into one refitted block.

    Args:
        module: the model; ``module(batch)`` runs it on a slice of ``calibration``.
        runs: each a list of block names (module paths in ``module``, e.g.
            ``model.model.layers.7``) of consecutive blocks of one stack; runs must not
            overlap. A run of ``k`` blocks is replaced by one block.
        calibration: token ids ``(N, seq)`` for language models, inputs ``(N, ...)`` for
            vision; a ``val_fraction`` of the windows/samples chooses the ridge strength.
        keep: which block of each run is kept and refitted: ``"first"``, ``"last"``,
            ``"best"`` (the one whose fit leaves the lowest held-out error), or a list with
            one block name per run.
        fit_attention: also refit the attention output projection (transformers).
        strengths: ridge strengths relative to ``trace(G)/dim``; the best on held-out
            windows is used. One value = no selection.
        token_weighting: ``"clip"`` weights down tokens whose run update is more than
            ``clip`` x the median norm; ``"none"`` weights all tokens equally.
        refit: ``"full"`` refits the whole projection matrix; ``"map"`` only a square map
            on its output (``W <- M W``, ReplaceMe's ``T``), with the ridge pulling ``M``
            towards the identity.
        target: ``"composite"`` fits the run applied to the compressed model's hidden
            states; ``"original"`` fits the original model's hidden state after the run
            (also absorbing the error made below it).
        repair_next: after each run, also refit the output projection(s) of up to this
            many following (kept, unfused) blocks so that the hidden state after each of
            them matches the original model's; they stay in the model.
        distill: after every fit, train a square map on each refitted projection's output
            by logit distillation from ``module`` on the calibration windows
            (:mod:`lfgraph.passes.map_distillation`); ``None``: closed form only.
        inplace: modify ``module`` itself; by default a deep copy is rewritten.

    Returns:
        ``PassResult`` whose ``model`` has one block per run (the absorbed blocks deleted,
        Hugging Face configs updated) and whose log has a ``refit`` record per fitted
        projection, a ``remove`` record per deleted block and, with ``distill``, one
        ``distill`` record with the held-out KL before and after. ``module`` is unchanged
        unless ``inplace``.
    """
    for value, allowed, what in ((token_weighting, TOKEN_WEIGHTINGS, "token weighting"), (target, TARGETS, "target"), (refit, REFITS, "refit")):
        if value not in allowed:
            raise LfgraphError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")
    if distill is not None:  # refuse what the distillation would refuse before minutes of refitting
        from .map_distillation import check_settings

        check_settings(distill, calibration)  # type: ignore[arg-type]
    if not runs:
        return PassResult(module, False)
    # distillation needs the original model as teacher: keep a copy when rewriting in place
    teacher = (copy.deepcopy(module) if inplace else module) if distill is not None else None
    model = module if inplace else copy.deepcopy(module)
    model.eval()
    specs = _run_specs(runs, keep)
    cpath = split_block_name(specs[0].names[0])[0]
    stack = list(model.get_submodule(cpath))
    track = target == "original" or repair_next > 0
    original: list[nn.Module] | None = None
    if track:
        # the caller's blocks are the original ones unless they are rewritten in place
        original = [copy.deepcopy(b) for b in stack] if inplace else list(module.get_submodule(cpath))
    steps = _steps(specs, cpath, len(stack), target, repair_next)
    log = RewriteLog()
    t0 = time.perf_counter()

    val_mask = _split_validation(calibration.shape[0], val_fraction)
    groups = [(calibration[val_mask == v], v) for v in (False, True)]
    state: list[_Batch] = []
    for data, is_val in groups:
        for ids in batches(data, batch_size):
            x, kwargs = capture_block_input(model, stack[specs[0].index[0]], ids)
            state.append(_Batch(ids, kwargs, x, x if track else None, bool(is_val)))

    pos = specs[0].index[0]
    iterator: Any = steps
    if progress:
        from tqdm import tqdm

        iterator = tqdm(steps, desc="calibrated fusion", leave=False)
    for spec, use_original in iterator:
        first = spec.index[0]
        for b in state:  # bring the frontier up to this run through unchanged blocks
            b.x = _run_blocks(stack, range(pos, first), b.x, b.kwargs)
            if b.xo is not None:
                b.xo = _run_blocks(original, range(pos, first), b.xo, b.kwargs)  # type: ignore[arg-type]
        kind = _kind(stack[first])
        run_source = original if use_original else stack
        if kind == "conv":
            _fit_conv_run(stack, run_source, spec, state, use_original, strengths, log, cpath)
        else:
            _fit_transformer_run(
                stack, run_source, spec, state, use_original, strengths, log, cpath, fit_attention, token_weighting, clip,
                mlp_proj, attn_proj, refit,
            )
        kept = stack[spec.keep]  # type: ignore[index]
        for b in state:
            b.x = block_output(kept(b.x, **b.kwargs))
            if b.xo is not None:
                b.xo = _run_blocks(original, spec.index, b.xo, b.kwargs)  # type: ignore[arg-type]
        pos = spec.index[-1] + 1

    refitted = [model.get_submodule(r.target) for r in log.records if r.action == "refit"]
    gone = [i for s in specs for i in s.index if i != s.keep]
    absorbed = [f"{cpath}.{i}" for i in gone]
    # the blocks that train with the maps, held as objects: remove_blocks renumbers the stack
    trained: list[nn.Module] = []
    if distill is not None:
        trained = blocks_to_train(stack, [s.keep for s in specs], [s.index for s in specs], distill.trainable)  # type: ignore[arg-type]
    remove_blocks(model, absorbed)
    if distill is not None:
        from .map_distillation import distill_maps

        curve = distill_maps(model, teacher, refitted, calibration, distill, blocks=trained)  # type: ignore[arg-type]
        log.add(PASS_NAME, "distill", cpath, [r.target for r in log.records if r.action == "refit"],
                steps=curve["steps"], best_step=curve["best_step"], kl_start=curve.get("kl_start"), kl_best=curve.get("kl_best"),
                seconds=round(curve["seconds"], 3), trainable_params=curve["trainable_params"], sampled_windows=curve["sampled_windows"],
                trainable=distill.trainable, sampling_seconds=round(curve["sampling_seconds"], 3),
                cache_seconds=round(curve["cache_seconds"], 3), teacher_cache=curve["teacher_cache"], frozen_blocks=curve["frozen_blocks"])
        model.eval()
    for s in specs:
        for i in s.index:
            if i != s.keep:
                log.add(PASS_NAME, "remove", f"{cpath}.{i}", [f"{cpath}.{s.keep}"], reason="absorbed by calibrated fit")
    for r in log.records:
        if r.action == "refit":
            r.detail["seconds_total"] = round(time.perf_counter() - t0, 3)
    return PassResult(model, True, log)


def _steps(specs: list[_RunSpec], cpath: str, n_blocks: int, target: str, repair_next: int) -> list[tuple[_RunSpec, bool]]:
    """The fits in bottom-up order, each with whether it targets the original model: every
    run, then up to ``repair_next`` unchanged blocks after it (never into the next run)."""
    out: list[tuple[_RunSpec, bool]] = []
    for k, spec in enumerate(specs):
        out.append((spec, target == "original"))
        stop = specs[k + 1].index[0] if k + 1 < len(specs) else n_blocks
        for j in range(spec.index[-1] + 1, min(spec.index[-1] + 1 + repair_next, stop)):
            out.append((_RunSpec([f"{cpath}.{j}"], [j], j, repair=True), True))
    return out


def _run_specs(runs: Sequence[Sequence[str]], keep: str | Sequence[str]) -> list[_RunSpec]:
    specs: list[_RunSpec] = []
    containers = set()
    for k, names in enumerate(runs):
        names = list(names)
        parts = [split_block_name(n) for n in names]
        containers |= {c for c, _ in parts}
        index = [i for _, i in parts]
        if index != list(range(index[0], index[0] + len(index))):
            raise LfgraphError(f"run {names} is not a list of consecutive blocks in order")
        if isinstance(keep, str):
            if keep not in KEEP_POLICIES:
                raise LfgraphError(f"unknown keep policy {keep!r}: choose {', '.join(KEEP_POLICIES)}, or give one block name per run")
            kept = {"first": index[0], "last": index[-1], "best": None}[keep]
        else:
            if len(keep) != len(runs) or keep[k] not in names:
                raise LfgraphError(f"keep must name one block of each run; {list(keep)!r} does not fit runs {list(map(list, runs))!r}")
            kept = split_block_name(keep[k])[1]
        specs.append(_RunSpec(names, index, kept))
    if len(containers) != 1:
        raise LfgraphError(f"runs must all be in one stack of blocks, got {sorted(containers)}")
    specs.sort(key=lambda s: s.index[0])
    for a, b in zip(specs, specs[1:]):
        if a.index[-1] >= b.index[0]:
            raise LfgraphError(f"runs {a.names} and {b.names} overlap")
    return specs


def _fit_transformer_run(
    stack: list[nn.Module], run_source: list[nn.Module], spec: _RunSpec, state: list[_Batch], use_original: bool,
    strengths: Sequence[float], log: RewriteLog, cpath: str, fit_attention: bool, token_weighting: str, clip: float, mlp_proj: str | None, attn_proj: str | None,
    refit: str = "full",
) -> None:
    """Refit the kept block's attention output (optional) and MLP down projection."""
    t0 = time.perf_counter()
    candidates = [spec.keep] if spec.keep is not None else list(spec.index)
    mlp_name = _find(stack[candidates[0]], MLP_OUT_NAMES, "MLP output projection", mlp_proj)[0]

    # run outputs (and summed attention updates) depend only on the run's input: compute once
    run_out: list[torch.Tensor] = []
    attn_sum: list[torch.Tensor] = []
    attn_name = _find(stack[candidates[0]], ATTN_OUT_NAMES, "attention output projection", attn_proj)[0] if fit_attention else None
    for b in state:
        src = b.xo if use_original else b.x
        caps = [_Capture(run_source[i].get_submodule(attn_name)) for i in spec.index] if attn_name else []
        try:
            run_out.append(_run_blocks(run_source, spec.index, src, b.kwargs))
        finally:
            for c in caps:
                c.remove()
        if caps:
            attn_sum.append(sum(c.outputs[0] for c in caps))  # type: ignore[arg-type]

    def weights(k: int) -> torch.Tensor | None:
        return _token_weights((run_out[k] - state[k].x).reshape(-1, run_out[k].shape[-1]), token_weighting, clip)

    for c in candidates:
        _check_additive(stack[c], stack[c].get_submodule(mlp_name), state[0], mlp_name)
    if spec.keep is None:
        spec.keep = _best_keep(stack, candidates, mlp_name, state, run_out, weights, strengths)
    block = stack[spec.keep]
    goal = "original" if use_original else "composite"
    if attn_name:
        proj = block.get_submodule(attn_name)
        W0 = _proj_matrix(proj)
        fit, val = RidgeStats.zeros(W0.shape[1], W0.shape[0]), RidgeStats.zeros(W0.shape[1], W0.shape[0])
        for k, b in enumerate(state):
            cap = _Capture(proj)
            try:
                block(b.x, **b.kwargs)
            finally:
                cap.remove()
            z = _features(cap.inputs[0], W0.shape[1] != cap.inputs[0].shape[-1])
            y = attn_sum[k].reshape(-1, W0.shape[0])
            (val if b.val else fit).add(z, y, weights(k))
        _apply_fit(proj, W0, fit, val, strengths, log, cpath, spec, attn_name, goal, refit=refit)

    proj = block.get_submodule(mlp_name)
    W0 = _proj_matrix(proj)
    fit, val = RidgeStats.zeros(W0.shape[1], W0.shape[0]), RidgeStats.zeros(W0.shape[1], W0.shape[0])
    state_energy = 0.0
    for k, b in enumerate(state):
        z, y = _mlp_problem(block, proj, W0, b, run_out[k])
        (val if b.val else fit).add(z, y, weights(k))
        w = weights(k)
        e = run_out[k].double().reshape(-1, run_out[k].shape[-1]).pow(2).sum(1)
        state_energy += float(e.sum() if w is None else (e * w.double()).sum())
    _apply_fit(proj, W0, fit, val, strengths, log, cpath, spec, mlp_name, goal, seconds=time.perf_counter() - t0, state_energy=state_energy, refit=refit)


def _check_additive(block: nn.Module, proj: nn.Module, b: _Batch, proj_name: str) -> None:
    """Refuse blocks whose output is not ``rest + proj(z)`` (e.g. post-LayerNorm BERT layers),
    for which the closed-form fit would be wrong: shift the projection's output by a
    random amount and check that the block's output moves by exactly that amount."""
    delta = torch.randn(b.x.shape[-1], generator=torch.Generator().manual_seed(0))
    base = block_output(block(b.x, **b.kwargs))
    h = proj.register_forward_hook(lambda _m, _a, out: out + delta)
    try:
        shifted = block_output(block(b.x, **b.kwargs))
    finally:
        h.remove()
    moved = shifted - base
    if not torch.allclose(moved, delta.expand_as(moved), rtol=1e-3, atol=1e-3 * (1.0 + float(base.abs().max()) * 1e-3)):
        raise UnsupportedModelError(
            f"{type(block).__name__}'s output is not its input plus {proj_name}'s output (a post-LayerNorm block?): "
            "calibrated fusion cannot refit it in closed form; use --fuse remove or mean"
        )


def _mlp_problem(block: nn.Module, proj: nn.Module, W0: torch.Tensor, b: _Batch, run_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, y)`` for the kept block's MLP output projection on one batch: the block's output
    is ``rest + proj(z)``, so the target for ``proj(z)`` is ``run_out - rest``."""
    cap = _Capture(proj)
    try:
        out = block_output(block(b.x, **b.kwargs))
    finally:
        cap.remove()
    z_in, d = cap.inputs[0], cap.outputs[0]
    y = (run_out - out + d).reshape(-1, W0.shape[0])
    return _features(z_in, W0.shape[1] != z_in.shape[-1]), y


def _best_keep(
    stack: list[nn.Module], candidates: list[int], mlp_name: str, state: list[_Batch], run_out: list[torch.Tensor],
    weights: Any, strengths: Sequence[float],
) -> int:
    """The candidate whose MLP refit leaves the smallest held-out error (relative to the
    held-out target energy; training error when nothing is held out)."""
    best, best_err = candidates[0], math.inf
    for c in candidates:
        proj = stack[c].get_submodule(mlp_name)
        W0 = _proj_matrix(proj)
        fit, val = RidgeStats.zeros(W0.shape[1], W0.shape[0]), RidgeStats.zeros(W0.shape[1], W0.shape[0])
        for k, b in enumerate(state):
            z, y = _mlp_problem(stack[c], proj, W0, b, run_out[k])
            (val if b.val else fit).add(z, y, weights(k))
        s, _ = choose_strength(fit, val, W0, strengths)
        W = ridge_solve(fit, W0, s)
        score = val if val.n else fit
        err = score.loss(W) / max(score.S, 1e-30)
        if err < best_err:
            best, best_err = c, err
    return best


def _apply_fit(
    proj: nn.Module, W0: torch.Tensor, fit: RidgeStats, val: RidgeStats, strengths: Sequence[float], log: RewriteLog,
    cpath: str, spec: _RunSpec, proj_name: str, goal: str, seconds: float | None = None, state_energy: float | None = None,
    refit: str = "full",
) -> None:
    everything = fit + val
    if refit == "map":
        # fit M (out x out) on a = W0 z, pulled towards the identity; the projection gets M W0
        eye = torch.eye(W0.shape[0], dtype=torch.float64)
        fit_m, val_m = map_stats(fit, W0), map_stats(val, W0)
        strength, losses = choose_strength(fit_m, val_m, eye, strengths)
        W = ridge_solve(fit_m + val_m, eye, strength) @ W0.double()
    else:
        strength, losses = choose_strength(fit, val, W0, strengths)
        W = ridge_solve(everything, W0, strength)
    before, after = everything.loss(W0), everything.loss(W)
    _set_proj_matrix(proj, W)
    rec = {
        "strength": strength,
        "tokens": everything.n,
        "relative_error_before": before / max(everything.S, 1e-30),
        "relative_error_after": after / max(everything.S, 1e-30),
        "heldout_losses": {f"{k:g}": v for k, v in losses.items()},
        "keep": f"{cpath}.{spec.keep}",
        "fit_target": goal,
        "refit": refit,
        "repair": spec.repair,
    }
    if state_energy:
        # the error left, relative to the hidden state itself (what the layers above see)
        rec["error_vs_hidden_state"] = after / state_energy
    if seconds is not None:
        rec["seconds"] = round(seconds, 3)
    log.add(PASS_NAME, "refit", f"{cpath}.{spec.keep}.{proj_name}", spec.names, **rec)


# ---------------------------------------------------------------------------------------
# ResNet-style basic blocks
# ---------------------------------------------------------------------------------------


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(u))`` as one ``(out, in*kh*kw + 1)`` matrix acting on unfolded patches."""
    s = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(s)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(s)
    W = conv.weight.detach().reshape(conv.out_channels, -1) * (gamma / s)[:, None]
    b = beta - gamma * bn.running_mean / s
    if conv.bias is not None:
        b = b + conv.bias * gamma / s
    return torch.cat([W, b[:, None]], dim=1).double()


@torch.no_grad()
def _set_folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, W: torch.Tensor) -> None:
    """Write a folded matrix back: the weight into ``conv``, the bias into ``bn``, which
    becomes an identity plus bias in eval mode (running mean 0, variance ``1 - eps``)."""
    conv.weight.copy_(W[:, :-1].reshape(conv.weight.shape).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is None:
        raise UnsupportedModelError("BatchNorm without affine bias cannot hold the refitted bias")
    bn.bias.copy_(W[:, -1].to(bn.bias.dtype))


def _patches(conv: nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
    cols = nn.functional.unfold(u, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype)], dim=1)


def _conv_forward_parts(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, pre, out)`` of a basic block: conv2's input, the pre-activation ``bn2(...) + x``
    and the block output."""
    cu, cb = _Capture(block.conv2), _Capture(block.bn2)
    try:
        out = block(x)
    finally:
        cu.remove()
        cb.remove()
    return cu.inputs[0], cb.outputs[0] + x, out


def _fit_conv_run(
    stack: list[nn.Module], run_source: list[nn.Module], spec: _RunSpec, state: list[_Batch], use_original: bool,
    strengths: Sequence[float], log: RewriteLog, cpath: str, iterations: int = 4,
) -> None:
    """Refit the kept block's last convolution (folded with its BatchNorm) so that the kept
    block's output matches the run's output on the same input.

    With a final ReLU the problem is censored: where the run outputs 0 the pre-activation
    only has to be <= 0. The fit minimises the squared error on the other positions plus a
    squared hinge on these (convex), by a few rounds of least squares in which a censored
    target is the current prediction clipped to the boundary (majorise-minimise: the loss
    never rises). Without a final ReLU one round is exact least squares.
    """
    t0 = time.perf_counter()
    if spec.keep is None:
        spec.keep = spec.index[0]  # every block of a run sees the same input; the first is as good as any
    block = stack[spec.keep]
    for i in spec.index:
        _kind(stack[i])
    W0 = _folded_conv(block.conv2, block.bn2)
    relu_mode: bool | None = None
    cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (patch source u, goal, skip x) per batch
    for b in state:
        src = b.xo if use_original else b.x
        goal = _run_blocks(run_source, spec.index, src, b.kwargs)
        u, pre, out = _conv_forward_parts(block, b.x)
        if relu_mode is None:
            if torch.allclose(out, torch.relu(pre), atol=1e-5, rtol=1e-4):
                relu_mode = True
            elif torch.allclose(out, pre, atol=1e-5, rtol=1e-4):
                relu_mode = False
            else:
                raise UnsupportedModelError(
                    f"{type(block).__name__} does not compute relu(bn2(conv2(.)) + x) or bn2(conv2(.)) + x: cannot refit it"
                )
        cache.append((u, goal, b.x))
    W, strength, losses = W0, None, {}
    for _ in range(iterations if relu_mode else 1):
        fit, val = RidgeStats.zeros(W0.shape[1], W0.shape[0]), RidgeStats.zeros(W0.shape[1], W0.shape[0])
        for b, (u, goal, x) in zip(state, cache):
            z = _patches(block.conv2, u)
            xt = x.permute(0, 2, 3, 1).reshape(-1, W0.shape[0])
            y = goal.permute(0, 2, 3, 1).reshape(-1, W0.shape[0]) - xt
            if relu_mode:
                censored = goal.permute(0, 2, 3, 1).reshape(-1, W0.shape[0]) <= 0
                pred = (z.double() @ W.T).to(y.dtype)
                y = torch.where(censored, torch.minimum(pred, -xt), y)
            (val if b.val else fit).add(z, y)
        if strength is None:
            strength, losses = choose_strength(fit, val, W0, strengths)
        everything = fit + val
        W = ridge_solve(everything, W0, strength)
    _set_folded_conv(block.conv2, block.bn2, W)
    log.add(
        PASS_NAME, "refit", f"{cpath}.{spec.keep}.conv2", spec.names,
        strength=strength, tokens=everything.n, keep=f"{cpath}.{spec.keep}", final_relu=relu_mode,
        fit_target="original" if use_original else "composite", repair=spec.repair,
        relative_error_before=everything.loss(W0) / max(everything.S, 1e-30),
        relative_error_after=everything.loss(W) / max(everything.S, 1e-30),
        heldout_losses={f"{k:g}": v for k, v in losses.items()}, seconds=round(time.perf_counter() - t0, 3),
    )


def options_from_provenance(provenance: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """The :func:`calibrated_merge` options a plan's provenance asks for (``refit``, and
    ``distill`` when it records ``distill_steps``, with ``distill_sampled_windows`` windows
    sampled from the original and ``distill_trainable`` (plans that predate them: none,
    ``maps``); see :func:`lfgraph.recipes.refit_provenance`)."""
    from .map_distillation import DistillSettings

    steps = int(provenance.get("distill_steps", 0))
    sampled = int(provenance.get("distill_sampled_windows", 0))
    trainable = str(provenance.get("distill_trainable", "maps"))
    return {"refit": provenance.get("refit", "full"),
            "distill": DistillSettings(steps=steps, sampled_windows=sampled, trainable=trainable, progress=progress) if steps > 0 else None}


def calibrated_merge_plan(module: nn.Module, plan: FusionPlan, calibration: torch.Tensor, **options: Any) -> PassResult:
    """Apply a merge plan with the ``calibrated`` rule: each fusion's blocks (``keep`` plus
    ``absorb``, which must be consecutive) become one run, kept at ``fusion.keep`` unless
    ``keep=`` says otherwise. Options as for :func:`calibrated_merge`; the module is not
    modified unless ``inplace=True``."""
    if plan.mode != "merge":
        raise LfgraphError(f"calibrated fusion rewrites merge plans, this plan has mode {plan.mode!r}")
    runs, keeps = [], []
    for f in plan.fusions:
        if f.unit != "block":
            raise LfgraphError(f"calibrated fusion fuses blocks; fusion of {f.keep} has unit {f.unit!r}")
        names = sorted([f.keep, *f.absorb], key=lambda n: split_block_name(n)[1])
        runs.append(names)
        keeps.append(f.keep)
    options.setdefault("keep", keeps)
    return calibrated_merge(module, runs, calibration, **options)
