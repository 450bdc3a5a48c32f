"""Training batches for healing: one canonical form, and a resumable, shardable batch order.

Accepted batch forms (what :func:`as_batch` turns into a :class:`Batch`):

- a 2-D integer tensor ``(N, T)``: token ids of a language model, no padding;
- a dict (a Hugging Face batch) with ``input_ids`` and optionally ``attention_mask`` and
  ``labels`` (``-100`` = ignored position, as in Hugging Face);
- a tuple/list whose first element is a 2-D *integer* tensor: ``(input_ids,)`` or
  ``(input_ids, attention_mask)``. Such a tuple is never read as ``(inputs, labels)``: give
  language-model labels in a dict;
- a tuple/list ``(inputs, targets)`` whose first element is a *floating* tensor: a
  classifier (``targets`` are class indices);
- a floating tensor alone: classifier (e.g. image) inputs without labels, for distillation.

:class:`WindowBatches` serves the rows of a token tensor in a seeded order that depends only
on ``(seed, epoch)``, so a resumed run sees exactly the batches the interrupted one would
have seen, and under ``torchrun`` each rank takes its own share of every global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from ..errors import LfgraphError


@dataclass
class Batch:
    """A batch in canonical form.

    ``inputs``: token ids ``(N, T)`` (``lm=True``) or classifier inputs. ``mask``: ``(N, T)``
    with 1 at real tokens (``None`` = no padding). ``labels``: LM labels ``(N, T)`` with
    ``-100`` at ignored positions, or class indices ``(N,)``; ``None`` = no labels (an LM
    then learns the next token of ``inputs``, or distills).
    """

    inputs: torch.Tensor
    mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    lm: bool = True

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.inputs), move(self.mask), move(self.labels), self.lm)

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens, or samples for a classifier: what tokens/s counts."""
        if not self.lm:
            return int(self.inputs.shape[0])
        return int(self.mask.sum()) if self.mask is not None else int(self.inputs.numel())


def _is_ids(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point() and not t.is_complex()


def as_batch(batch: Any) -> Batch:
    """The canonical :class:`Batch` of one batch in any accepted form (see the module doc).

    Raises ``LfgraphError`` naming the form it got when it is none of them.
    """
    if isinstance(batch, Batch):
        return batch
    if _is_ids(batch):
        return Batch(batch)
    if isinstance(batch, torch.Tensor) and batch.is_floating_point():
        return Batch(batch, lm=False)  # classifier/vision inputs without labels: distillation only
    if isinstance(batch, dict) or hasattr(batch, "keys") and "input_ids" in batch:
        if "input_ids" not in batch:
            raise LfgraphError(f"a dict batch needs 'input_ids' (a Hugging Face batch), got keys {sorted(batch)}")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if not _is_ids(ids):
            raise LfgraphError(f"input_ids must be a 2-D integer tensor, got {getattr(ids, 'shape', type(ids))}")
        for name, t in (("attention_mask", mask), ("labels", labels)):
            if t is not None and tuple(t.shape) != tuple(ids.shape):
                raise LfgraphError(f"{name} {tuple(t.shape)} does not match input_ids {tuple(ids.shape)}")
        return Batch(ids, mask, labels)
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if _is_ids(first):
            # (input_ids, attention_mask): the second element is a mask, never labels
            if len(batch) > 2:
                raise LfgraphError("a token batch tuple is (input_ids,) or (input_ids, attention_mask); give labels in a dict")
            mask = batch[1] if len(batch) == 2 else None
            if mask is not None and tuple(mask.shape) != tuple(first.shape):
                raise LfgraphError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(first.shape)}")
            return Batch(first, mask)
        if isinstance(first, torch.Tensor) and first.is_floating_point() and len(batch) == 2:
            return Batch(first, None, batch[1], lm=False)
    raise LfgraphError(
        f"cannot read a batch of type {type(batch).__name__}: give token ids (N, T), a dict with input_ids "
        "[, attention_mask, labels], an (input_ids, attention_mask) tuple, or (inputs, targets) for a classifier"
    )


def check_token_windows(windows: torch.Tensor, max_positions: int | None, what: str = "training data") -> torch.Tensor:
    """``windows`` as a ``(N, T)`` LongTensor, checked for use as training data.

    Raises ``LfgraphError`` when it holds no tokens, is not 2-D, has windows shorter than 2
    tokens, or longer than the model's ``max_positions``.
    """
    if not isinstance(windows, torch.Tensor) or windows.numel() == 0:
        raise LfgraphError(f"the {what} holds no tokens: give a text with some real text in it")
    if windows.dim() != 2:
        raise LfgraphError(f"the {what} must be token windows (N, T), got shape {tuple(windows.shape)}")
    if windows.shape[1] < 2:
        raise LfgraphError(f"the {what} has windows of {windows.shape[1]} token(s): a language model needs at least 2")
    if max_positions is not None and windows.shape[1] > max_positions:
        raise LfgraphError(
            f"sequence length {windows.shape[1]} is longer than the model takes ({max_positions} positions): "
            f"pass --seq-len {max_positions} or less"
        )
    return windows.long()


class WindowBatches:
    """Batches of rows of a tensor, in a seeded order that depends only on ``(seed, epoch)``.

    ``global_batch`` rows make one batch of the whole job; with ``world > 1`` rank ``r``
    gets rows ``r, r + world, …`` of it (``global_batch`` must be a multiple of ``world``),
    so that ``world`` processes together see exactly what one process sees. The epoch
    permutation comes from its own ``torch.Generator``, never from the global RNG, so a
    resumed run (:meth:`iterate` with ``start``) replays the same order.
    """

    def __init__(self, data: torch.Tensor, global_batch: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if global_batch < 1:
            raise LfgraphError(f"batch size must be >= 1, got {global_batch}")
        if global_batch % world:
            raise LfgraphError(f"batch size {global_batch} is not a multiple of the {world} processes: make it one")
        if len(data) < global_batch:
            raise LfgraphError(f"the data has {len(data)} rows, fewer than one batch of {global_batch}: give more text or a smaller --batch-size")
        self.data, self.global_batch, self.seed, self.rank, self.world = data, global_batch, seed, rank, world

    @property
    def per_epoch(self) -> int:
        return len(self.data) // self.global_batch  # the ragged tail is left out (equal batches)

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g)

    def iterate(self, start: int = 0) -> Iterator[Any]:
        """Batches ``start, start + 1, …`` (counted from the first batch of epoch 0), forever."""
        i = start
        while True:
            epoch, pos = divmod(i, self.per_epoch)
            rows = self._order(epoch)[pos * self.global_batch : (pos + 1) * self.global_batch]
            yield self.data[rows[self.rank :: self.world]]
            i += 1


def replay(data: Iterable[Any], start: int = 0) -> Iterator[Any]:
    """Batches of a re-iterable ``data`` (list, DataLoader), cycled forever, from batch ``start``.

    Batches before ``start`` are drawn and dropped: a deterministic iterable (a list, a
    DataLoader without shuffling or with a seeded ``generator``) so replays the exact order
    of an interrupted run.
    """
    i = 0
    while True:
        n = 0
        for batch in data:
            n += 1
            if i >= start:
                yield batch
            i += 1
        if n == 0:
            raise LfgraphError("the training data yielded no batches (a used-up generator?): pass a list of batches or a DataLoader")


__all__ = ["Batch", "WindowBatches", "as_batch", "check_token_windows", "replay"]
