"""Healing: fine-tune a rewritten (merged or tied) model before it is exported.

:func:`heal` is one training loop for every case: distillation from the uncompressed
teacher (the default for language models: a deployment pipeline rarely has labels), the
task loss when labels are given, the paper's retraining modes on tie sets, full fine-tuning,
the blocks next to each removed run only, or LoRA adapters merged back at the end; one
process or many under ``torchrun`` (DDP or FSDP2); checkpoints every K steps that a resumed
run continues from bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..allocator import keep_freed_memory
from ..errors import LfgraphError
from ..plan import FusionPlan
from . import checkpoint as ckpt
from . import distributed as D
from .batches import Batch, WindowBatches, as_batch, replay
from .modes import RETRAIN_MODES, install_retrain_mode
from .objectives import logits_of, masked_distillation_loss, masked_hidden_loss, masked_next_token_loss
from .trainable import TRAINABLE_SETS, add_lora, freeze_except, merge_lora, neighbor_blocks, tied_layers

#: Objectives of :func:`heal`; ``auto`` = task loss when batches carry labels, else
#: distillation when a teacher is given, else the next-token loss.
HEAL_OBJECTIVES = ("auto", "distill", "task", "mixed")

#: Default learning rate for full fine-tuning of a pretrained LM (AdamW); LoRA uses
#: :data:`DEFAULT_LORA_LR`. 1e-3 (the old retrain default) wrecks a pretrained LM.
DEFAULT_LR = 1e-4
DEFAULT_LORA_LR = 1e-3


@dataclass
class HealConfig:
    """Settings of one healing run (every field has a usable default).

    ``batch_size`` counts rows per micro-batch of the whole job: under ``torchrun`` with N
    processes each takes ``batch_size / N`` rows, so the global batch is the same.
    ``warmup``: a fraction of ``steps`` (< 1) or a number of steps. ``hidden_weight`` > 0
    adds a hidden-state loss at matching depths (needs ``plan`` for merged models).
    ``checkpoint_every`` 0 = every ``eval_every`` steps, or a tenth of the run.
    ``freeze_norm_stats``: batch-norm layers run on their running statistics (eval mode)
    while healing, so that the small healing batches neither replace the statistics the
    model was trained with nor make training differ from deployment.
    """

    steps: int = 100
    lr: float | None = None  # None: DEFAULT_LR, or DEFAULT_LORA_LR for trainable="lora"
    batch_size: int = 4
    accumulation: int = 1
    warmup: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0
    objective: str = "auto"
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    trainable: str = "all"
    plan: FusionPlan | None = None
    lora_rank: int = 16
    lora_alpha: float | None = None
    retrain_mode: str | None = None
    fused_sets: list[list[str]] = field(default_factory=list)
    mode_options: dict[str, Any] = field(default_factory=dict)
    eval_data: Any = None
    evaluate: Any = None  # optional callable(model) -> float (lower is better) instead of the objective on eval_data
    eval_every: int = 0
    keep_best: bool = True
    eval_at_start: bool = False  # also score the starting state (step 0): keep_best then never returns worse
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    seed: int = 0
    strategy: str = "auto"
    bf16: bool = True
    freeze_norm_stats: bool = True
    progress: bool = True
    desc: str = "heal"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (DEFAULT_LORA_LR if self.trainable == "lora" else DEFAULT_LR)

    def fingerprint(self, world: int) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed exactly."""
        return {"steps": self.steps, "lr": self.learning_rate, "batch_size": self.batch_size, "accumulation": self.accumulation,
                "seed": self.seed, "trainable": self.trainable, "objective": self.objective, "world": world,
                "retrain_mode": self.retrain_mode, "warmup": self.warmup}


@dataclass
class HealResult:
    """What :func:`heal` returns.

    ``model``: the healed plain module (adapters merged, retraining modes tied, not wrapped).
    ``losses``: training loss per optimizer step (mean over processes); ``evals``:
    ``(step, held-out value, training seconds so far)``; ``seconds``/``tokens``: training
    time (held-out evaluation excluded) and tokens of this call; ``best_step``: the step whose state ``model`` holds when held-out
    evaluation kept the best one (else the last step).
    """

    model: nn.Module
    losses: list[float]
    evals: list[tuple[int, float]]
    best_step: int
    steps: int
    tokens: int
    seconds: float
    trainable_params: int
    resumed_from: int = 0
    parallel: str = "none"
    world: int = 1

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def curve(self) -> dict[str, Any]:
        """The loss curve as plain data (JSON-ready) for reports and plots."""
        return {"train_loss": self.losses, "eval": [list(e) for e in self.evals], "best_step": self.best_step,
                "steps": self.steps, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second, "trainable_params": self.trainable_params,
                "resumed_from": self.resumed_from, "parallel": self.parallel, "world": self.world}


# --------------------------------------------------------------------------- pieces


def _check(config: HealConfig, teacher: nn.Module | None) -> None:
    if int(config.steps) != config.steps or config.steps < 0:
        raise LfgraphError(f"steps must be a non-negative integer, got {config.steps!r}")
    if not config.learning_rate > 0:
        raise LfgraphError(f"lr must be > 0, got {config.learning_rate}")
    if config.trainable not in TRAINABLE_SETS:
        raise LfgraphError(f"trainable={config.trainable!r} is not one of {list(TRAINABLE_SETS)}")
    if config.objective not in HEAL_OBJECTIVES:
        raise LfgraphError(f"objective={config.objective!r} is not one of {list(HEAL_OBJECTIVES)}")
    if config.objective in ("distill", "mixed") and teacher is None:
        raise LfgraphError(f"objective {config.objective!r} distills: pass the uncompressed model as teacher")
    if config.accumulation < 1 or config.batch_size < 1:
        raise LfgraphError("batch size and accumulation must be >= 1")
    if config.retrain_mode is not None and config.retrain_mode not in RETRAIN_MODES:
        raise LfgraphError(f"unknown retraining mode {config.retrain_mode!r}: choose one of {sorted(RETRAIN_MODES)}")
    if config.trainable == "lora" and config.fused_sets:
        raise LfgraphError("LoRA adapters and retraining modes on tie sets do not combine: use --trainable all or neighbors")
    if config.resume and not config.checkpoint_dir:
        raise LfgraphError("--resume needs --checkpoint-dir (where the interrupted run wrote its checkpoints)")


def _forward(model: nn.Module, batch: Batch) -> Any:
    if batch.lm and batch.mask is not None:
        return model(batch.inputs, batch.mask)
    return model(batch.inputs)


class _HiddenTaps:
    """Forward hooks that record block outputs of student and teacher at matching depths."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
        self.student: list[torch.Tensor | None] = [None] * len(pairs)
        self.teacher: list[torch.Tensor | None] = [None] * len(pairs)
        self.handles = []
        for i, (s, t) in enumerate(pairs):
            self.handles.append(s.register_forward_hook(self._hook(self.student, i)))
            self.handles.append(t.register_forward_hook(self._hook(self.teacher, i)))

    @staticmethod
    def _hook(store: list, i: int):
        def fn(_m: nn.Module, _a: Any, out: Any) -> None:
            store[i] = out[0] if isinstance(out, (tuple, list)) else out
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _block_list(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The model's block stack (:func:`lfgraph.architectures.block_stack`), or ``None``."""
    from ..architectures import block_stack

    try:
        return block_stack(model)
    except LfgraphError:
        return None


def hidden_pairs(student: nn.Module, teacher: nn.Module, plan: FusionPlan | None) -> list[tuple[nn.Module, nn.Module]]:
    """(student block, teacher block) whose outputs should agree.

    After a merge, the output of surviving block ``k`` must equal the teacher's hidden state
    that enters the next surviving block, i.e. the output of the teacher's block just before
    it (the last block of a removed run). Without a merge plan, equal depths pair up.
    """
    s, t = _block_list(student), _block_list(teacher)
    if s is None or t is None:
        raise LfgraphError("hidden-state loss needs models with a block stack (nn.ModuleList)")
    s_blocks, t_blocks = s[1], t[1]
    if plan is None or plan.mode != "merge" or not plan.absorbed:
        if len(s_blocks) != len(t_blocks):
            raise LfgraphError("hidden-state loss on models of different depth needs the merge plan")
        return list(zip(s_blocks, t_blocks))
    gone = {int(n.rpartition(".")[2]) for n in plan.absorbed}
    survivors = [i for i in range(len(t_blocks)) if i not in gone]
    if len(survivors) != len(s_blocks):
        raise LfgraphError(f"the plan leaves {len(survivors)} blocks but the student has {len(s_blocks)}: pass the plan it was rewritten with")
    nxt = survivors[1:] + [len(t_blocks)]
    return [(s_blocks[k], t_blocks[nxt[k] - 1]) for k in range(len(survivors))]


def _loss(model: nn.Module, teacher: nn.Module | None, batch: Batch, config: HealConfig, taps: _HiddenTaps | None) -> torch.Tensor:
    out = logits_of(_forward(model, batch))
    kind = config.objective
    if kind == "auto":
        kind = "task" if batch.labels is not None or teacher is None else "distill"
    loss = out.new_zeros(())
    if kind in ("task", "mixed"):
        if batch.lm:
            task = masked_next_token_loss(out, batch.inputs, batch.mask, batch.labels)
        else:
            if batch.labels is None:
                raise LfgraphError("the task loss of a classifier needs (inputs, targets) batches")
            task = nn.functional.cross_entropy(out.float(), batch.labels)
        loss = loss + (1 - config.alpha if kind == "mixed" else 1.0) * task
    if kind in ("distill", "mixed") or (taps is not None and teacher is not None):
        with torch.no_grad():
            t_out = logits_of(_forward(teacher, batch))
        if kind in ("distill", "mixed"):
            mask = batch.mask if batch.lm else None
            kd = masked_distillation_loss(out, t_out, mask, config.temperature)
            loss = loss + (config.alpha if kind == "mixed" else 1.0) * kd
    if taps is not None and config.hidden_weight > 0:
        mask = batch.mask if batch.lm else None
        hl = sum(masked_hidden_loss(s, t, mask) for s, t in zip(taps.student, taps.teacher)) / len(taps.student)
        loss = loss + config.hidden_weight * hl
    return loss


def _batches(data: Any, config: HealConfig, par: D.Parallel, start: int) -> Iterator[Any]:
    if isinstance(data, torch.Tensor) and (data.is_floating_point() or data.dim() == 2):
        # token windows (N, T) or unlabelled samples (N, ...): seeded, shardable rows
        return WindowBatches(data, config.batch_size, config.seed, par.rank, par.world).iterate(start)
    if data is None:
        raise LfgraphError("healing needs data: pass token windows (N, T), a list of batches or a DataLoader")
    return replay(data, start)


def _eval_loss(model: nn.Module, teacher: nn.Module | None, data: Any, config: HealConfig, taps: _HiddenTaps | None) -> float:
    """Mean objective on held-out data (every process evaluates all of it)."""
    if isinstance(data, torch.Tensor):
        data = [data[i : i + config.batch_size] for i in range(0, len(data), config.batch_size)]
    was = model.training
    model.eval()
    total, weight = 0.0, 0
    with torch.no_grad():
        for raw in data:
            batch = as_batch(raw).to(_device(model))
            n = batch.tokens
            total += float(_loss(model, teacher, batch, config, taps)) * n
            weight += n
    if was:
        _train_mode(model, config)
    if weight == 0:
        raise LfgraphError("the held-out data yielded no batches: give at least one window")
    return total / weight


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu")
    return p.device if not hasattr(p, "to_local") else p.to_local().device


def _train_mode(model: nn.Module, config: HealConfig) -> None:
    model.train()
    if config.freeze_norm_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _schedule(optimizer: torch.optim.Optimizer, config: HealConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` of the peak (a LambdaLR)."""
    warm = int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * config.steps))
    total = max(config.steps, 1)
    floor = config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- heal


def heal(student: nn.Module, teacher: nn.Module | None, data: Any, config: HealConfig | None = None) -> HealResult:
    """Fine-tune ``student`` (a rewritten model) to recover what the rewrite lost.

    Expects: ``data`` token windows ``(N, T)`` or unlabelled float samples ``(N, ...)`` (batched
    and shuffled here, seeded; sharded per process under torchrun), or a re-iterable of batches in any form
    :func:`~lfgraph.retrain.batches.as_batch` reads (a list, a DataLoader; under torchrun the
    caller shards it, e.g. with a ``DistributedSampler``). ``teacher``: the uncompressed model,
    only run (never modified), or ``None`` for the task loss alone.

    Modifies ``student`` in place: it is trained, and with ``config.fused_sets`` each set ends
    tied (one shared parameter). Returns a :class:`HealResult` whose ``model`` is the healed
    plain module (LoRA merged; with FSDP a full, unsharded copy). Raises ``LfgraphError`` for
    bad settings or data, or when the loss diverges.
    """
    config = config or HealConfig()
    _check(config, teacher)
    par = D.setup(config.strategy)
    try:
        with keep_freed_memory():  # the same tensors come and go at every step
            return _heal(student, teacher, data, config, par)
    finally:
        D.teardown(par)


def _heal(student: nn.Module, teacher: nn.Module | None, data: Any, config: HealConfig, par: D.Parallel) -> HealResult:
    if par.kind == "fsdp" and config.fused_sets:
        # parametrizations and parameters shared across positions do not survive FSDP's sharding
        raise LfgraphError("retraining modes on tie sets are not supported under FSDP: use DDP (--strategy ddp)")
    torch.manual_seed(config.seed)
    device = par.device
    student.to(device)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        # only run under no_grad: its requires_grad flags are left as they are
        teacher.to(device).eval()
    taps = None
    if config.hidden_weight > 0:
        if teacher is None:
            raise LfgraphError("the hidden-state loss compares with a teacher: pass the uncompressed model")
        taps = _HiddenTaps(hidden_pairs(student, teacher, config.plan))

    # everything that changes the parameter set happens BEFORE wrapping for DDP/FSDP
    handle = None
    if config.fused_sets:
        handle = install_retrain_mode(student, config.fused_sets, config.retrain_mode or "mean", **config.mode_options)
    model: nn.Module = student
    if config.trainable == "lora":
        model = add_lora(student, config.lora_rank, config.lora_alpha)
        params = [p for p in model.parameters() if p.requires_grad]
    elif config.trainable == "neighbors":
        if handle is not None:
            keep = {id(p) for p in handle.trainable_parameters()}
            params = [p for p in student.parameters() if id(p) in keep]
            for p in student.parameters():
                p.requires_grad_(id(p) in keep)
        elif config.plan is not None and config.plan.mode == "merge":
            params = freeze_except(student, neighbor_blocks(student, config.plan))
        else:
            params = freeze_except(student, tied_layers(student))
    else:
        params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise LfgraphError("nothing to train: every parameter is frozen")
    n_trainable = sum(p.numel() for p in {id(p): p for p in params}.values())
    plain = copy.deepcopy(model) if par.kind == "fsdp" else None  # FSDP2 rewrites the module in place
    wrapped = D.wrap(model, par, shard_blocks=handle is None)
    if par.kind == "fsdp":
        params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = _schedule(optimizer, config)
    mix_generator = None
    if handle is not None:
        for inst in handle.installed:
            state = inst.info.get("state")
            if state is not None:
                mix_generator = state.generator

    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    best: tuple[float, int] = (math.inf, -1)
    best_state: dict[str, torch.Tensor] | None = None
    start, tokens = 0, 0
    fingerprint = config.fingerprint(par.world)
    if config.resume:
        payload = ckpt.load(config.checkpoint_dir, fingerprint)
        if payload is not None:
            D.load_full_state(wrapped, par, payload["model"])
            D.load_optimizer_state(wrapped, optimizer, par, payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            ckpt.set_rng_state(payload["rng"][par.rank])
            if mix_generator is not None and payload.get("mix_generator") is not None:
                mix_generator.set_state(payload["mix_generator"])
            start, tokens = payload["step"], payload["tokens"]
            losses, evals = list(payload["losses"]), [tuple(e) for e in payload["evals"]]
            best, best_state = tuple(payload["best"]), payload["best_state"]
    resumed_from = start
    every_ckpt = config.checkpoint_every or config.eval_every or max(1, config.steps // 10)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.bf16
                else contextlib.nullcontext())
    batches = _batches(data, config, par, start * config.accumulation)
    bar = None
    if config.progress and par.main and config.steps > start:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=config.desc, leave=False)
    def held_out_score() -> float:
        """The held-out value keep_best compares: ``config.evaluate`` when given, else the objective."""
        if config.evaluate is not None:
            wrapped.eval()
            with torch.no_grad():
                value = D.mean_over_ranks(float(config.evaluate(wrapped)), par)
            _train_mode(wrapped, config)
            return value
        return D.mean_over_ranks(_eval_loss(wrapped, teacher, config.eval_data, config, taps), par)

    has_eval = config.eval_data is not None or config.evaluate is not None
    if config.eval_at_start and start == 0 and not evals and has_eval:
        value = held_out_score()
        evals.append((0, value, 0.0))
        if config.keep_best:
            best, best_state = (value, 0), D.full_state(wrapped, par)
    _train_mode(wrapped, config)
    t0 = t_mark = time.perf_counter()
    train_seconds = 0.0  # training time without held-out evaluation
    tokens_at_start = tokens
    try:
        for step in range(start, config.steps):
            step_tokens, step_loss = 0, 0.0
            for micro in range(config.accumulation):
                batch = as_batch(next(batches)).to(device)
                sync = par.kind == "ddp" and micro < config.accumulation - 1
                with (wrapped.no_sync() if sync else contextlib.nullcontext()), autocast:
                    loss = _loss(wrapped, teacher, batch, config, taps) / config.accumulation
                if not torch.isfinite(loss.detach()):
                    raise LfgraphError(f"healing diverged at step {step} (loss {float(loss)}): lower the learning rate (lr={config.learning_rate})")
                loss.backward()
                step_loss += float(loss.detach())
                step_tokens += batch.tokens
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(D.mean_over_ranks(step_loss, par))
            tokens += step_tokens * par.world
            done = step + 1
            if has_eval and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                train_seconds += time.perf_counter() - t_mark
                value = held_out_score()
                evals.append((done, value, train_seconds))
                t_mark = time.perf_counter()
                if config.keep_best and value < best[0]:
                    best, best_state = (value, done), D.full_state(wrapped, par)
            if config.checkpoint_dir and (done % every_ckpt == 0 or done == config.steps):
                _save_checkpoint(wrapped, optimizer, scheduler, par, config, fingerprint, done, tokens, losses, evals, best, best_state, mix_generator)
            if bar is not None:
                elapsed = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                tok_s=f"{(tokens - tokens_at_start) / max(elapsed, 1e-9):.0f}")
    except BaseException:
        if handle is not None and not handle.finalized and par.kind == "none":
            handle.finalize()  # a failed run still leaves plain, tied sets behind
        raise
    finally:
        if bar is not None:
            bar.close()
        if taps is not None:
            taps.remove()
        if teacher is not None:
            teacher.train(teacher_was_training)
    seconds = train_seconds + (time.perf_counter() - t_mark)
    best_step = len(losses)
    # the weights in hand are the last step's: restore unless that step is the best one
    if best_state is not None and evals and best[1] != len(losses):
        D.load_full_state(wrapped, par, best_state)
        best_step = best[1]
    elif best_state is not None:
        best_step = best[1]
    # back to a plain module: unwrap / gather, merge adapters, tie the retraining sets
    if par.kind == "fsdp":
        state = D.full_state(wrapped, par)
        plain.load_state_dict(state)
        model = plain
    else:
        model = D.inner(wrapped)
    if config.trainable == "lora":
        model = merge_lora(model)
    if handle is not None:
        handle.finalize()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return HealResult(model=model, losses=losses, evals=evals, best_step=best_step, steps=len(losses),
                      tokens=tokens - tokens_at_start, seconds=seconds, trainable_params=n_trainable, resumed_from=resumed_from,
                      parallel=par.kind, world=par.world)


def _save_checkpoint(wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, par: D.Parallel, config: HealConfig,
                     fingerprint: dict[str, Any], step: int, tokens: int, losses: list[float], evals: list, best: tuple,
                     best_state: Any, mix_generator: torch.Generator | None) -> None:
    # collective calls first (every rank), then rank 0 writes the one file
    model_state = D.full_state(wrapped, par)
    optim_state = D.optimizer_state(wrapped, optimizer, par)
    rngs = D.gather_objects(ckpt.rng_state(), par)
    if par.main:
        ckpt.save(config.checkpoint_dir, {
            "fingerprint": fingerprint, "step": step, "tokens": tokens, "model": model_state, "optimizer": optim_state,
            "scheduler": scheduler.state_dict(), "rng": rngs, "losses": losses, "evals": evals, "best": best,
            "best_state": best_state, "mix_generator": mix_generator.get_state() if mix_generator is not None else None,
        })
    D.barrier(par)


__all__ = ["DEFAULT_LORA_LR", "DEFAULT_LR", "HEAL_OBJECTIVES", "HealConfig", "HealResult", "heal", "hidden_pairs"]
