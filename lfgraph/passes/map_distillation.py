"""Distilled output maps: after a calibrated fusion, train a square map on each refitted
projection's output (``W <- M W``), and by default the blocks around each cut, so that the
fused model's next-token distribution matches the original's on the calibration windows.

The closed-form refit (:mod:`lfgraph.passes.calibrated_fusion`) makes the kept block
reproduce the run's *hidden state*; perplexity measures the *next-token distribution*,
which the layers above the cut turn that hidden state into. This pass fits what perplexity
measures, with the same data as ReplaceMe's ``T`` and, under ``trainable="maps"``, the
same capacity (one ``d x d`` matrix per fused run, nothing else trains): logit KL from the
original model, a held-out part of the calibration windows for early stopping (the best
state is kept, so the result is never worse on those windows than the closed-form start).
The loop is healing's (:func:`lfgraph.retrain.heal`: warm-up and cosine schedule, clipping,
progress bar), with every parameter frozen except the trained ones. What does not train is
computed once per window instead of at every step (``cache_frozen``,
:mod:`lfgraph.retrain.frozen`): the teacher's logits, and the student's blocks below the
lowest trained one, so that a step runs only the blocks from the first cut up.

``trainable="neighbors"`` (the default) trains more than ReplaceMe's capacity: every
parameter of the block that holds each map and of the block right after it (the first
block above the cut) trains with the maps, on the same windows and steps.
``trainable="blocks"`` trains every parameter of every surviving block with the maps (not
the embeddings, final norm or head: a tied embedding would move the input too), at a lower
default learning rate: a short healing of the whole stack from the original's logits.

Expects: ``student`` is ``teacher`` after a calibrated fusion (same inputs, same outputs),
``projections`` the refitted modules inside ``student`` (``nn.Linear``, ``nn.Conv*d`` or
Hugging Face ``Conv1D``). Guarantees: only the projections' weights change (to ``M W``,
stored as plain tensors: no parametrization is left behind), and under ``neighbors`` or
``blocks`` also the parameters of the blocks the caller names; ``teacher`` is not
modified; every parameter's ``requires_grad`` flag is restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import LfgraphError
from ..cache import cache_dir, read_cached, write_cached
from ..models import inner_hf_model

#: Defaults of the ``calibrated-distill`` fusion rule (docs/study): on the calibration
#: windows alone the held-out KL is lowest near step 60 (the map overfits ~6k tokens); with
#: 72 windows sampled from the original it still falls at step 120, and on SmolLM2 the
#: held-out texts of another kind improve at every level (10-50%), the calibration kind's
#: at 30 and 50%.
DEFAULT_STEPS = 120
#: Windows sampled from the original for the default rule (0: calibration windows only).
DEFAULT_SAMPLED_WINDOWS = 72
#: What the distillation trains: the maps alone, also the blocks around each cut, or also
#: every surviving block. ``neighbors`` trains the blocks around the cut too: on SmolLM2 at
#: the same steps and windows (so at no extra time) better than ``maps`` on both held-out
#: texts at 10, 20, 30 and 50% (docs/study).
DISTILL_TRAINABLE = ("maps", "neighbors", "blocks")
DEFAULT_TRAINABLE = "neighbors"
#: Learning rate per trainable set when none is given: the maps' 3e-4 (60-150 steps); the
#: whole stack at healing's full fine-tuning rate 1e-4 (not tuned for this pass).
DEFAULT_LR = {"maps": 3e-4, "neighbors": 3e-4, "blocks": 1e-4}
#: What trains besides the maps, in words (progress bar, compress's note).
TRAINED_WITH_THE_MAPS = {"maps": "", "neighbors": " and the blocks around each cut", "blocks": " and every block"}


@dataclass
class DistillSettings:
    """How the maps are trained. ``val_fraction`` of the windows (at least one) are held out
    to keep the best state; ``temperature`` 1 matches what perplexity scores."""

    steps: int = DEFAULT_STEPS
    lr: float | None = None  # None: DEFAULT_LR of the trainable set
    batch_size: int = 2
    val_fraction: float = 0.25
    eval_every: int = 10
    temperature: float = 1.0
    seed: int = 0
    progress: bool = False
    #: windows sampled from the original model (each continuing the first ``prompt_tokens``
    #: of a training window) added to the training windows: the maps overfit ~6k calibration
    #: tokens within a few epochs, and the original's own text is new data at no cost in
    #: calibration text. Held-out windows stay real calibration text. The prompt is at most
    #: half a window. Only an original that can ``generate`` (Hugging Face causal LMs) is
    #: sampled; otherwise none are, and the record says 0.
    sampled_windows: int = DEFAULT_SAMPLED_WINDOWS
    prompt_tokens: int = 16
    top_p: float = 0.95
    #: keep the sampled windows under ``$LFGRAPH_CACHE/samples/`` (default
    #: ``~/.cache/lfgraph``), and the teacher's outputs on the training and held-out windows
    #: (its logits or its head's input, :class:`~lfgraph.retrain.frozen.TeacherCache`) under
    #: ``$LFGRAPH_CACHE/teacher/``, keyed by a hash of the original's weights, the windows
    #: and the settings: they are a function of those alone (sampling is seeded), and are
    #: the slowest parts of the default rule on a CPU after the training loop.
    cache_samples: bool = True
    #: compute what does not train once (:mod:`lfgraph.retrain.frozen`): the teacher's
    #: logits, and the student's blocks below the lowest trained one. Off: heal runs both
    #: models whole at every step (the same result up to float reassociation, slower).
    cache_frozen: bool = True
    #: ``maps``: only the maps (ReplaceMe's capacity); ``neighbors``: also every parameter of
    #: the block holding each map and of the block after it; ``blocks``: also every block.
    trainable: str = DEFAULT_TRAINABLE
    extra: dict[str, Any] = field(default_factory=dict)  # further HealConfig fields (override the above)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.trainable, DEFAULT_LR["maps"])


class OutputMap(nn.Module):
    """Parametrization ``W -> M W`` (``M``: out x out, starting at the identity) on the
    output side of a projection's weight, whatever its layout: ``(out, in)`` Linear,
    ``(out, in, k...)`` convolutions, ``(in, out)`` Conv1D (``transposed``)."""

    def __init__(self, d_out: int, transposed: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.transposed = transposed
        self.M = nn.Parameter(torch.eye(d_out, dtype=dtype))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return W @ self.M.T
        return (self.M @ W.reshape(W.shape[0], -1)).reshape(W.shape)


def _out_features(m: nn.Module) -> tuple[int, bool]:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise LfgraphError(f"cannot distil a map on {type(m).__name__}: it has no weight")
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
        return int(w.shape[1]), True
    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return int(w.shape[0]), False
    raise LfgraphError(f"cannot distil a map on {type(m).__name__}: only Linear, Conv and Conv1D projections")


def _device_of(module: nn.Module) -> torch.device | None:
    first = next(module.parameters(), None)
    return first.device if first is not None else None


def split_windows(calibration: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows): the last ``val_fraction`` (at least one window,
    at least one left to train on)."""
    n = int(calibration.shape[0])
    if n < 2:
        raise LfgraphError("distilling the maps needs at least 2 calibration windows (one is held out): give more calibration data")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return calibration[: n - n_val], calibration[n - n_val :]


def _generator(model: nn.Module) -> nn.Module | None:
    """The Hugging Face model inside ``model`` when it can ``generate``, else ``None``."""
    inner = inner_hf_model(model)
    return inner if inner is not None and callable(getattr(inner, "generate", None)) else None


def _cache_path(model: nn.Module, windows: torch.Tensor, settings: tuple, kind: str) -> Path:
    """Where what ``model`` computes on ``windows`` with ``settings`` is cached (``kind``:
    ``samples``, ``teacher``): a hash of every weight's bytes, the windows, the settings
    and torch's version (a sampler's stream of random numbers may change between versions)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((kind, settings, torch.__version__, type(model).__name__)).encode())
    h.update(windows.to(torch.int64).cpu().contiguous().numpy().tobytes())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return cache_dir() / kind / f"{h.hexdigest()}.pt"


def sample_windows(teacher: nn.Module, windows: torch.Tensor, count: int, prompt_tokens: int, top_p: float = 0.95,
                   seed: int = 0, batch_size: int = 24, progress: bool = False, cache: bool = False) -> torch.Tensor:
    """``count`` windows as long as ``windows``' rows, each the first ``prompt_tokens`` of a
    row of ``windows`` (cycling) continued by nucleus sampling from ``teacher`` (KV cache,
    temperature 1, no early stop). Seeded: the same arguments give the same tokens. With
    ``cache``, read from / written to ``$LFGRAPH_CACHE/samples/`` (:func:`_cache_path`)."""
    n, length = int(windows.shape[0]), int(windows.shape[1])
    if not 0 < prompt_tokens < length:
        raise LfgraphError(f"prompt_tokens must be between 1 and the window length - 1 ({length - 1}), got {prompt_tokens}")
    from tqdm import tqdm

    gen = _generator(teacher)
    if gen is None:
        raise LfgraphError(f"sampling windows from the original needs a Hugging Face causal LM with generate(); {type(teacher).__name__} has none: set sampled_windows=0")
    path = _cache_path(gen, windows, (count, prompt_tokens, top_p, seed, batch_size), "samples") if cache else None
    if path is not None:
        cached = read_cached(path)
        if isinstance(cached, torch.Tensor) and tuple(cached.shape) == (count, length):
            return cached.to(windows.dtype)
    device = _device_of(gen)
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in tqdm(range(0, count, batch_size), desc="sample windows from the original", disable=not progress, leave=False):
            rows = torch.arange(start, min(count, start + batch_size)) % n
            prompt = windows[rows, :prompt_tokens].to(device)
            new = length - prompt_tokens
            seq = gen.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=top_p,
                               temperature=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            out.append(seq[:, :length].cpu())
    samples = torch.cat(out).to(windows.dtype)
    if path is not None:
        write_cached(path, samples)
    return samples


def check_settings(settings: DistillSettings, calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse settings the distillation cannot run with (no steps, fewer than 2 windows);
    returns (training windows, held-out windows)."""
    if settings.steps <= 0:
        raise LfgraphError(f"distillation steps must be > 0, got {settings.steps}")
    if settings.trainable not in DISTILL_TRAINABLE:
        raise LfgraphError(f"distillation trainable must be one of {list(DISTILL_TRAINABLE)}, got {settings.trainable!r}")
    if settings.sampled_windows < 0 or settings.prompt_tokens < 1:
        raise LfgraphError(f"sampled windows must be >= 0 and prompt tokens >= 1, got {settings.sampled_windows} and {settings.prompt_tokens}")
    return split_windows(calibration, settings.val_fraction)


def distill_maps(
    student: nn.Module, teacher: nn.Module, projections: Sequence[nn.Module], calibration: torch.Tensor,
    settings: DistillSettings | None = None, blocks: Sequence[nn.Module] = (),
) -> dict[str, Any]:
    """Train ``M`` on every projection in ``projections`` by logit distillation from
    ``teacher`` (see the module docstring); unless ``trainable="maps"`` every parameter of
    ``blocks`` trains too (blocks of ``student`` that the caller picks for the set: for
    ``neighbors`` each cut's kept block and the block after it, for ``blocks`` every
    surviving block; :func:`lfgraph.passes.calibrated_fusion.blocks_to_train`). Returns the
    healing curve (``heal``'s ``curve()``; its ``seconds`` are the training loop's, held-out
    evaluation excluded) plus ``kl_start``/``kl_best`` on the held-out windows,
    ``sampling_seconds``, ``cache_seconds`` and what was cached (``teacher_cache``:
    ``logits``, ``head input`` or ``none``; ``frozen_blocks``: the blocks skipped per step)."""
    from ..retrain.heal import HealConfig

    s = settings or DistillSettings()
    if not projections:
        raise LfgraphError("no refitted projection to distil a map on")
    train, val = check_settings(s, calibration)
    for m in projections:
        _out_features(m)  # refuse an unsupported projection before anything changes
    if s.trainable != "maps" and not blocks:
        raise LfgraphError(f"distilling with trainable={s.trainable!r} needs the blocks that train: pass blocks, or use trainable='maps'")
    blocks = list(blocks) if s.trainable != "maps" else []
    sampled = 0
    t0 = time.perf_counter()
    if s.sampled_windows > 0 and train.shape[1] >= 2 and _generator(teacher) is not None:
        # short windows: the prompt is at most half of one, so that something is sampled
        prompt = max(1, min(s.prompt_tokens, int(train.shape[1]) // 2))
        extra = sample_windows(teacher, train, s.sampled_windows, prompt, s.top_p, s.seed, progress=s.progress, cache=s.cache_samples)
        train, sampled = torch.cat([train, extra]), int(extra.shape[0])
    sampling_seconds = time.perf_counter() - t0
    # heal trains on the GPU when there is one; both models go back to where they were
    devices = {id(m): _device_of(m) for m in (student, teacher)}
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for b in blocks:
        for p in b.parameters():
            p.requires_grad_(True)
    maps = []
    try:
        for m in projections:
            d, transposed = _out_features(m)
            parametrize.register_parametrization(m, "weight", OutputMap(d, transposed, m.weight.dtype))
            maps.append(m.parametrizations.weight[0].M)
        config = HealConfig(**({
            "steps": s.steps, "lr": s.learning_rate, "batch_size": s.batch_size, "objective": "distill", "temperature": s.temperature,
            "trainable": "all", "eval_data": val, "eval_every": s.eval_every, "keep_best": True, "eval_at_start": True, "seed": s.seed,
            "progress": s.progress, "desc": "distil maps" + TRAINED_WITH_THE_MAPS[s.trainable], "strategy": "none",
        } | s.extra))
        with torch.enable_grad():  # callers (the method interface) may run under no_grad
            result, cached = _heal_cached(student, teacher, train, val, config, s)
    finally:
        for m in projections:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), True))
        for m in (student, teacher):
            if devices[id(m)] is not None:
                m.to(devices[id(m)])
    curve = result.curve()
    curve["sampled_windows"] = sampled
    curve["sampling_seconds"] = sampling_seconds
    curve.update(cached)
    if result.evals:
        curve["kl_start"] = float(result.evals[0][1])
        curve["kl_best"] = float(min(e[1] for e in result.evals))
    return curve


def _heal_cached(student: nn.Module, teacher: nn.Module, train: torch.Tensor, val: torch.Tensor, config: Any,
                 s: DistillSettings) -> tuple[Any, dict[str, Any]]:
    """``heal(student, teacher, train, config)`` with, under ``s.cache_frozen``, the teacher
    replaced by its cached logits and the student's frozen lower blocks by their cached
    output (:mod:`lfgraph.retrain.frozen`): the same loop, batches and loss, without
    recomputing at every step what does not train. Expects the trainable flags set and the
    maps installed. Returns heal's result and what was cached (for the record)."""
    from ..retrain.frozen import FrozenPrefix, TeacherCache, first_trained_block
    from ..retrain.heal import heal

    info: dict[str, Any] = {"teacher_cache": "none", "frozen_blocks": 0, "cache_seconds": 0.0}
    if not s.cache_frozen:
        return heal(student, teacher, train, config), info
    t0 = time.perf_counter()
    # build where heal will train (the GPU when there is one)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    student.to(device)
    teacher.to(device)
    windows = torch.cat([train, val]).to(device)
    # the cached passes run in batches of the calibration's size: more rows per matmul
    build_batch = max(4, s.batch_size)
    saved = _cache_path(teacher, windows, (build_batch,), "teacher") if s.cache_samples else None
    cached_teacher = TeacherCache.build(teacher, windows, build_batch, saved=saved)
    found = first_trained_block(student)
    prefix = FrozenPrefix.build(student, found[0], found[1], windows, build_batch) if found is not None else None
    info.update(teacher_cache=cached_teacher.stores if cached_teacher is not None else "none",
                frozen_blocks=prefix.first if prefix is not None else 0, cache_seconds=time.perf_counter() - t0)
    with prefix.active() if prefix is not None else contextlib.nullcontext():
        result = heal(prefix if prefix is not None else student, cached_teacher if cached_teacher is not None else teacher, train, config)
    return result, info
