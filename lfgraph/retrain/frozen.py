"""What does not train is computed once: the teacher's outputs and the student's frozen
lower blocks, per window, served to :func:`lfgraph.retrain.heal` as stand-in modules.

A distillation on a fixed set of token windows in which only some blocks of the student
train repeats two computations at every step whose results never change for a given window:

- the teacher's logits (the teacher is only run, never trained);
- the student's hidden state entering its lowest trained block (nothing below it trains, so
  its input is a fixed function of the window).

:class:`TeacherCache` runs the teacher once over the windows and :class:`FrozenPrefix`
runs the student's lower blocks once; each then stands in for its model in ``heal``
(``forward(ids) -> logits``), so a step runs the student only from its first trained block
up, and of the teacher at most its output head. The loop, the batches, the optimizer and
the loss are heal's, unchanged: with the same seed the result is the one of the plain
models up to float reassociation (the cached tensors were computed in batches of another
size).

Both look windows up by their token ids (equal windows get the same cached tensor, which
is right: the cached function depends on nothing else), and refuse a window they were not
built on. Both check at build time, on the first batch, that the stand-in reproduces its
model, and return ``None`` from ``build`` when it does not (a model whose logits are not
``head(hidden)``, a block stack the model does not run in order...): the caller then uses
the plain model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..calibration import batches, capture_block_input
from ..errors import LfgraphError
from ..cache import read_cached, write_cached
from .objectives import logits_of

#: Teacher logits are stored whole up to this many bytes; above it, the output head's input
#: is stored instead (``d`` instead of ``vocab`` numbers per token; SmolLM2's 88 windows of
#: 256 tokens: 52 MB instead of 4.4 GB) and the head applied per call.
TEACHER_LOGITS_MAX_BYTES = 512 * 2**20
#: Agreement asked of a stand-in with its model on the first batch (relative to the largest
#: logit): float reassociation only, never a different computation.
CHECK_RTOL = 1e-4


def window_keys(ids: torch.Tensor) -> list[bytes]:
    """One key per row of ``ids`` (``(N, T)`` token ids): the row's bytes as int64, so that
    equal windows get equal keys whatever their dtype or device."""
    rows = ids.detach().to("cpu", torch.int64).contiguous()
    return [r.numpy().tobytes() for r in rows]


class WindowTable:
    """Tensors stored per window (first axis of ``values``), looked up by token ids."""

    def __init__(self, windows: torch.Tensor, values: torch.Tensor) -> None:
        if values.shape[0] != windows.shape[0]:
            raise LfgraphError(f"{values.shape[0]} cached rows for {windows.shape[0]} windows")
        self.index = {k: i for i, k in enumerate(window_keys(windows))}
        self.values = values

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The stored rows of ``ids``' windows, in order, on ``ids``' device. Raises
        ``LfgraphError`` for a window the table was not built on."""
        try:
            rows = [self.index[k] for k in window_keys(ids)]
        except KeyError:
            raise LfgraphError("a window the distillation cache was not built on reached it: build it on every training and held-out window") from None
        return self.values[torch.tensor(rows)].to(ids.device)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=CHECK_RTOL, atol=CHECK_RTOL * max(scale, 1e-12)))


def _no_mask(mask: torch.Tensor | None) -> None:
    # the caches were built on unpadded windows; a padded batch would need other values
    if mask is not None and not bool(mask.bool().all()):
        raise LfgraphError("the distillation cache holds unpadded windows: a padded batch cannot use it")


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head of a Hugging Face causal LM inside ``model`` (``get_output_embeddings``,
    a ``Linear``), else ``None``."""
    from ..models import inner_hf_model

    inner = inner_hf_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


class TeacherCache(nn.Module):
    """Stands in for a teacher on the windows it was built on: ``forward(ids)`` returns the
    teacher's logits ``(B, T, V)`` for those rows, from one no_grad pass over all windows.

    ``head`` is ``None`` when the logits themselves are stored; otherwise the table holds
    the head's input per token and ``forward`` applies ``head`` (the teacher's own module,
    only run) to it: the same operation as inside the teacher's forward.
    """

    def __init__(self, table: WindowTable, head: nn.Module | None) -> None:
        super().__init__()
        self.table = table
        self.head = head

    @property
    def stores(self) -> str:
        """What is stored per token: ``logits`` or ``head input``."""
        return "logits" if self.head is None else "head input"

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        _no_mask(attention_mask)
        cached = self.table.lookup(input_ids)
        return cached if self.head is None else self.head(cached)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 4,
              max_logit_bytes: int = TEACHER_LOGITS_MAX_BYTES, saved: Path | None = None) -> "TeacherCache | None":
        """Run ``teacher`` (``teacher(ids)`` -> logits) once over ``windows`` ``(N, T)``.

        Stores the logits when all of them fit in ``max_logit_bytes``, else the input of the
        teacher's output head (:func:`output_head`), after checking on the first batch that
        the head applied to it gives the logits. Returns ``None`` when neither is possible
        (no head found, or logits that are not ``head(input)``: soft-capped, scaled...).
        ``teacher`` is only run; its training flag is left as it was.

        ``saved``: a file for this teacher's weights and these windows (the caller names it
        by their hash): read instead of running the teacher when it holds a table of the
        right shape, written (whole, then renamed; skipped when it cannot be) otherwise.
        """
        if saved is not None:
            got = _read_table(saved, windows)
            if got is not None:
                values, is_logits = got
                head = None if is_logits else output_head(teacher)
                if is_logits or head is not None:
                    return cls(WindowTable(windows, values), head)
        built = cls._run(teacher, windows, batch_size, max_logit_bytes)
        if built is not None and saved is not None:
            write_cached(saved, {"values": built.table.values.cpu(), "logits": built.head is None, "windows": windows.cpu()})
        return built

    @classmethod
    def _run(cls, teacher: nn.Module, windows: torch.Tensor, batch_size: int, max_logit_bytes: int) -> "TeacherCache | None":
        was = teacher.training
        teacher.eval()
        head = output_head(teacher)
        got: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, args, _out: got.append(args[0])) if head is not None else None
        kept: list[torch.Tensor] = []
        keep_logits: bool | None = None
        try:
            for ids in batches(windows, batch_size):
                got.clear()
                logits = logits_of(teacher(ids))
                if keep_logits is None:
                    keep_logits = windows.shape[0] * logits[0].numel() * logits.element_size() <= max_logit_bytes
                    if not keep_logits and (len(got) != 1 or not _close(head(got[0]), logits)):  # type: ignore[misc]
                        return None
                kept.append(logits if keep_logits else got[0])
        finally:
            if hook is not None:
                hook.remove()
            teacher.train(was)
        return cls(WindowTable(windows, torch.cat(kept)), None if keep_logits else head)


def _read_table(path: Path, windows: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(values, whether they are logits) from a saved table built on ``windows``, or ``None``
    (absent, unreadable, or built on other windows)."""
    got = read_cached(path)
    try:
        values, is_logits, keys = got["values"], bool(got["logits"]), got["windows"]  # type: ignore[index]
    except (TypeError, KeyError):
        return None
    if not isinstance(values, torch.Tensor) or not torch.equal(keys, windows.cpu()) or values.shape[0] != windows.shape[0]:
        return None
    return values, is_logits


class _Skip(nn.Module):
    """A frozen lower block while :class:`FrozenPrefix` is active: returns the hidden state
    it is given (as the real block returns its output: a tensor, or a 1-tuple)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.as_tuple else hidden_states


class FrozenPrefix(nn.Module):
    """Stands in for a student whose blocks ``stack[:first]`` (and everything before the
    stack) do not train: ``forward(ids)`` runs the student with those blocks skipped and
    ``stack[first]`` fed the hidden state cached for ``ids``' windows, so only
    ``stack[first:]`` and what follows the stack run (and backpropagate).

    Use it only inside :meth:`active` (which swaps the lower blocks out of ``stack`` and puts
    them back); its parameters are the student's, so an optimizer over
    ``prefix.parameters()`` trains the student itself.
    """

    def __init__(self, student: nn.Module, stack: nn.ModuleList, first: int, table: WindowTable, as_tuple: bool) -> None:
        super().__init__()
        self.student = student
        self._stack, self._first, self._table, self._as_tuple = stack, first, table, as_tuple
        self._hidden: torch.Tensor | None = None

    @property
    def first(self) -> int:
        """Index in the stack of the lowest block that runs."""
        return self._first

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        _no_mask(attention_mask)
        self._hidden = self._table.lookup(input_ids)
        try:
            return self.student(input_ids)
        finally:
            self._hidden = None

    def _inject(self, _m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._hidden is None:
            raise LfgraphError("FrozenPrefix's first block ran outside FrozenPrefix.forward")
        if args:
            return (self._hidden.to(args[0].dtype), *args[1:]), kwargs
        key = next(k for k in ("hidden_states", "x", "input") if k in kwargs)
        return args, {**kwargs, key: self._hidden.to(kwargs[key].dtype)}

    @contextlib.contextmanager
    def active(self) -> Iterator["FrozenPrefix"]:
        """Swap ``stack[:first]`` for pass-throughs and feed ``stack[first]`` the cached
        input; on exit (also on error) the real blocks are back and no hook is left."""
        lower = [self._stack[i] for i in range(self._first)]
        handle = self._stack[self._first].register_forward_pre_hook(self._inject, with_kwargs=True)
        try:
            for i in range(self._first):
                self._stack[i] = _Skip(self._as_tuple)
            yield self
        finally:
            for i, block in enumerate(lower):
                self._stack[i] = block
            handle.remove()

    @classmethod
    @torch.no_grad()
    def build(cls, student: nn.Module, stack: nn.ModuleList, first: int, windows: torch.Tensor,
              batch_size: int = 4) -> "FrozenPrefix | None":
        """Cache ``stack[first]``'s input for every window of ``windows`` ``(N, T)`` (the
        forward stops there: the cost is the lower blocks' once), and check on the first
        batch that the stand-in gives the student's logits. ``None`` when ``first`` is 0
        (nothing to skip) or the check fails. ``student`` is only run; its training flag is
        left as it was."""
        if first <= 0:
            return None
        was = student.training
        student.eval()
        try:
            xs, first_kwargs = [], None
            for ids in batches(windows, batch_size):
                x, kwargs = capture_block_input(student, stack[first], ids)
                xs.append(x)
                first_kwargs = kwargs if first_kwargs is None else first_kwargs
            as_tuple = isinstance(stack[first](xs[0], **first_kwargs), (tuple, list))
            prefix = cls(student, stack, first, WindowTable(windows, torch.cat(xs)), as_tuple)
            probe = windows[:batch_size]
            full = logits_of(student(probe))
            with prefix.active():
                fast = logits_of(prefix(probe))
            return prefix if _close(fast, full) else None
        finally:
            student.train(was)


def first_trained_block(model: nn.Module) -> tuple[nn.ModuleList, int] | None:
    """``(stack, first)``: the block stack of ``model`` (its longest ``nn.ModuleList``) and
    the index of its lowest block holding a parameter that requires grad, when every such
    parameter is inside ``stack[first:]``; ``None`` otherwise (a trained parameter outside
    the stack, e.g. an embedding, changes what the lower blocks see)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return None
    stack = max(lists, key=len)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    if not trained:
        return None
    holding = [i for i, b in enumerate(stack) if any(id(p) in trained for p in b.parameters())]
    if not holding:
        return None
    first = holding[0]
    inside = {id(p) for b in list(stack)[first:] for p in b.parameters()}
    return (stack, first) if trained <= inside else None


__all__ = ["FrozenPrefix", "TeacherCache", "WindowTable", "first_trained_block", "output_head", "window_keys"]
