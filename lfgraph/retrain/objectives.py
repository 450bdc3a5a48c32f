"""Retraining objectives: the task loss, and distillation from the uncompressed model.

A *batch* is what the data iterable yields:

- ``(inputs, targets)`` (tuple or list): a classifier; the task loss is the cross-entropy
  of ``model(inputs)`` (``(N, C)`` scores) against ``targets`` (``(N,)`` class indices).
- a tensor of token ids ``(N, T)``: a language model; the task loss is next-token
  cross-entropy of ``model(ids)`` (``(N, T, V)`` logits) against ``ids`` shifted by one.

Model outputs may be tensors, tuples (first element used) or objects with ``.logits``
(Hugging Face outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LfgraphError


def logits_of(output: Any) -> torch.Tensor:
    """The score tensor of a model output (tensor, tuple/list, or ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LfgraphError(f"cannot find scores in a model output of type {type(output).__name__}: return a tensor or .logits")


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets)`` of a batch; ``targets`` is ``None`` for a token-id tensor (LM)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise LfgraphError(
        f"a batch must be an (inputs, targets) pair or a tensor of token ids, got {type(batch).__name__}"
    )


def task_loss(output: Any, inputs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy for a classifier, or next-token cross-entropy for a language model.

    With ``targets is None`` the output must be ``(N, T, V)`` logits for ``inputs`` of token
    ids ``(N, T)``, ``T >= 2``; position ``t`` predicts token ``t + 1``.
    """
    logits = logits_of(output)
    if targets is not None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if logits.dim() != 3 or inputs.dim() != 2 or inputs.shape[1] < 2:
        raise LfgraphError(
            "next-token loss needs (N, T>=2) token ids and (N, T, V) logits; for a classifier give (inputs, targets) batches"
        )
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1))


def distillation_loss(student: Any, teacher: Any, temperature: float = 2.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over positions.

    Every leading dimension (batch, sequence) is a position; the last one is the class or
    vocabulary axis. The ``T²`` factor keeps gradient magnitudes comparable across
    temperatures (Hinton et al. 2015). Exactly 0 when ``student == teacher``.
    """
    if temperature <= 0:
        raise LfgraphError(f"distillation temperature must be > 0, got {temperature}")
    s, t = logits_of(student), logits_of(teacher)
    if s.shape != t.shape:
        raise LfgraphError(f"student output {tuple(s.shape)} and teacher output {tuple(t.shape)} differ in shape")
    log_s = F.log_softmax(s.reshape(-1, s.shape[-1]) / temperature, dim=-1)
    log_t = F.log_softmax(t.reshape(-1, t.shape[-1]).detach() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def masked_next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the real positions of a padded LM batch.

    Position ``t`` predicts ``labels[t + 1]`` (``labels`` defaults to ``ids``); a target is
    ignored where it is ``-100`` or where ``mask`` is 0 (padding), so padding never enters
    the loss. ``logits`` ``(N, T, V)``, ``ids``/``mask``/``labels`` ``(N, T)``.
    """
    if logits.dim() != 3 or ids.dim() != 2 or ids.shape[1] < 2:
        raise LfgraphError("next-token loss needs (N, T>=2) token ids and (N, T, V) logits")
    target = (ids if labels is None else labels)[:, 1:].clone()
    if mask is not None:
        target[mask[:, 1:] == 0] = -100
    if not bool((target != -100).any()):
        raise LfgraphError("a batch has no real target token (all padding or -100): check the attention mask and labels")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)


def masked_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 2.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` averaged over real positions.

    ``student``/``teacher`` ``(..., V)``; ``mask`` (the leading shape, 1 = real) drops
    padded positions from the mean. Equals :func:`distillation_loss` without a mask.
    """
    if temperature <= 0:
        raise LfgraphError(f"distillation temperature must be > 0, got {temperature}")
    if student.shape != teacher.shape:
        raise LfgraphError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ in shape")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    per_position = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    if mask is None:
        return per_position.mean() * temperature**2
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1.0) * temperature**2


def masked_hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of hidden states ``(N, T, H)`` over real positions, divided by
    the teacher's mean square there (scale-free across depths and models)."""
    diff = (student.float() - teacher.detach().float()).pow(2).mean(-1)
    scale = teacher.detach().float().pow(2).mean(-1)
    if mask is None:
        return diff.mean() / scale.mean().clamp_min(1e-12)
    m = mask.to(diff.dtype)
    return (diff * m).sum() / (scale * m).sum().clamp_min(1e-12)


@dataclass(frozen=True)
class Objective:
    """A retraining objective: ``alpha · distillation + (1 − alpha) · task``.

    ``alpha = 0`` is the task loss alone (no teacher needed); ``alpha = 1`` pure
    distillation. ``needs_teacher`` says whether a teacher model must be given.
    """

    name: str
    alpha: float = 0.0
    temperature: float = 2.0

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def __call__(self, model: nn.Module, batch: Any, teacher: nn.Module | None = None) -> torch.Tensor:
        """Loss of ``model`` on ``batch`` (scalar tensor with a graph for backward)."""
        inputs, targets = split_batch(batch)
        output = model(inputs)
        loss = torch.zeros((), device=inputs.device)
        if self.alpha < 1:
            loss = (1 - self.alpha) * task_loss(output, inputs, targets)
        if self.alpha > 0:
            if teacher is None:
                raise LfgraphError(f"objective {self.name!r} distills from a teacher: pass teacher=<the original model>")
            with torch.no_grad():
                teacher_out = teacher(inputs)
            loss = loss + self.alpha * distillation_loss(output, teacher_out, self.temperature)
        return loss


#: Objectives by name; ``make_objective`` builds a variant with another temperature/mix.
OBJECTIVES: dict[str, Objective] = {
    "task": Objective("task", alpha=0.0),
    "distill": Objective("distill", alpha=1.0),
    "mixed": Objective("mixed", alpha=0.5),
}


def make_objective(objective: str | Objective | Callable[..., torch.Tensor], temperature: float | None = None, alpha: float | None = None) -> Callable[..., torch.Tensor]:
    """Resolve ``objective`` (a name in :data:`OBJECTIVES`, an ``Objective`` or any callable
    ``(model, batch, teacher) -> loss``), optionally overriding temperature and mix."""
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise LfgraphError(f"unknown objective {objective!r}: choose one of {sorted(OBJECTIVES)}")
        objective = OBJECTIVES[objective]
    if isinstance(objective, Objective):
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise LfgraphError(f"alpha (the distillation share) must be in [0, 1], got {alpha}")
        return Objective(
            objective.name,
            objective.alpha if alpha is None else alpha,
            objective.temperature if temperature is None else temperature,
        )
    if not callable(objective):
        raise LfgraphError(f"objective must be a name, an Objective or a callable, got {type(objective).__name__}")
    return objective


__all__ = [
    "OBJECTIVES", "Objective", "distillation_loss", "logits_of", "make_objective", "masked_distillation_loss",
    "masked_hidden_loss", "masked_next_token_loss", "split_batch", "task_loss",
]
