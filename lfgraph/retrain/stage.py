"""Healing as a stage of ``compress``: the training windows and :func:`heal_compressed`.

Kept apart from the command line (:mod:`lfgraph.retrain.cli`), which imports the pipeline,
so that the pipeline's sources can call this stage without an import cycle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LfgraphError
from ..plan import FusionPlan
from .batches import check_token_windows
from .heal import HealConfig, heal


#: Defaults of ``compress --heal`` / ``lfgraph heal`` (see README "Healing" for the evidence).
#: Measured on SmolLM2-135M at 25 % of the decoder layers removed: full fine-tuning at lr 1e-4
#: closes 56 % of the one-shot perplexity gap in 120 steps (14 CPU-minutes, one thread), more
#: per CPU-minute than LoRA or the neighbouring blocks alone.
HEAL_DEFAULTS = {"trainable": "all", "batch_size": 4, "seq_len": 128, "windows": 128, "steps": 120}


# --------------------------------------------------------------------------- data


def max_positions(module: nn.Module) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``), if it says."""
    for m in module.modules():
        cfg = getattr(m, "config", None)
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if isinstance(n, int):
            return n
    return None


def training_windows(tokenizer: Any, text: str | None, n_windows: int, seq_len: int, limit: int | None) -> torch.Tensor:
    """Up to ``n_windows`` non-overlapping ``seq_len``-token windows of ``text`` (``None`` =
    the bundled calibration pool, never its held-out part). Raises ``LfgraphError`` for a
    text without tokens, too short for one window, or a ``seq_len`` beyond ``limit``."""
    from ..calibration import corpus_split, windows_from_tokens

    if limit is not None and seq_len > limit:
        raise LfgraphError(f"sequence length {seq_len} is longer than the model takes ({limit} positions): pass --seq-len {limit} or less")
    if seq_len < 2:
        raise LfgraphError(f"--seq-len must be at least 2, got {seq_len}")
    if text is None:
        ids = corpus_split(tokenizer)[0]
    else:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    if ids.numel() == 0:
        raise LfgraphError("the training text holds no tokens: give a file with some real text in it")
    n = min(n_windows, ids.numel() // seq_len)
    if n < 1:
        raise LfgraphError(f"the training text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}: give more text or a shorter --seq-len")
    return check_token_windows(windows_from_tokens(ids, n, seq_len, "training text"), limit)


# --------------------------------------------------------------------------- the pipeline stage


def heal_compressed(
    model: Any,
    compressed: nn.Module,
    plan: FusionPlan | None,
    calibration: torch.Tensor,
    steps: int,
    *,
    trainable: str = HEAL_DEFAULTS["trainable"],
    lr: float | None = None,
    batch_size: int = HEAL_DEFAULTS["batch_size"],
    eval_windows: torch.Tensor | None = None,
    eval_every: int = 0,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    **options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Heal a rewritten model by distillation from the original; the stage behind ``--heal``.

    Expects: ``model`` the original :class:`~lfgraph.models.LoadedModel` (its ``module`` is the
    teacher, only run), ``compressed`` the rewritten module (``pipeline.rewrite(...).model``),
    ``plan`` the plan it was rewritten with (``neighbors`` and tie sets read it),
    ``calibration`` token windows ``(N, T)`` to heal on. Further ``HealConfig`` fields go in
    ``options``. Modifies ``compressed`` (it is trained in place). Returns
    ``(healed module in eval mode, curve)``: ``curve`` is JSON-ready (training loss per step,
    held-out values, tokens/s, trainable parameters) for the report and the visualizer.
    """
    if calibration is None:
        raise LfgraphError("healing needs calibration token windows (a language model) or batches")
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and not calibration.is_floating_point():
        calibration = check_token_windows(calibration, max_positions(compressed), "calibration data")
    evaluate = None
    if eval_windows is not None and eval_every:
        from ..calibration import mean_nll

        evaluate = lambda m: mean_nll(m, eval_windows, batch_size=batch_size)  # noqa: E731
    config = HealConfig(steps=steps, lr=lr, batch_size=batch_size, trainable=trainable, plan=plan, eval_every=eval_every,
                        evaluate=evaluate, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, **options)
    result = heal(compressed, model.module, calibration, config)
    curve = result.curve()
    curve["eval_metric"] = "held-out mean NLL (nats)" if evaluate is not None else None
    curve["config"] = {"trainable": trainable, "lr": config.learning_rate, "batch_size": batch_size, "steps": steps,
                       "objective": config.objective, "seq_len": int(calibration.shape[1]) if isinstance(calibration, torch.Tensor) else None}
    return result.model.eval(), curve
