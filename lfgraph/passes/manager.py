"""Stages run in order by one manager, in the shape of ``torch.fx.passes.infra``
(``PassBase``/``PassManager``): a :class:`Stage` has a name, the fields of the shared run
state it ``requires`` (present, i.e. not ``None``, before it runs) and those it
``provides`` (present after it ran); :class:`StageManager` runs a list of them over one
state object, refuses a stage whose requirements no earlier stage provided (an lfgraph
bug, named with the stage and the field), names the stage in any user error raised inside
it (:func:`labelled`), prints each stage's progress line and times every stage.

Nothing here knows what the stages do: ``lfgraph.stages`` holds compress's.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ..errors import LfgraphError


@contextlib.contextmanager
def labelled(name: str) -> Iterator[None]:
    """Name the pipeline stage in any user error raised inside it (the first name given
    wins, so an inner, more precise label is kept)."""
    try:
        yield
    except LfgraphError as e:
        if not getattr(e, "stage", None):
            e.stage = name  # type: ignore[attr-defined]
        raise


class StageOrderError(RuntimeError):
    """A stage list that cannot run: a stage needs a field no earlier stage provided, or a
    stage did not provide what it promised. A bug in whoever built the list, not a user error."""


class Stage:
    """One step of a run. Subclasses set ``name`` (unique in a list), ``requires`` and
    ``provides`` (field names of the run state) and implement :meth:`run`, which reads and
    writes the state. ``label`` is the word a user error raised inside the stage is
    prefixed with (``lfgraph: error: LABEL: …``; default ``name``): several stages may share
    one, e.g. every stage working on the staged output is ``write`` to the user; ``""``
    names none.
    :meth:`message` is the progress line printed before it runs (``None``: none)."""

    name: str = ""
    label: str | None = None
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def message(self, state: Any) -> str | None:
        return None

    def run(self, state: Any) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


@dataclass
class StageTiming:
    name: str
    seconds: float


def _present(state: Any, field: str) -> bool:
    return getattr(state, field, None) is not None


class StageManager:
    """Runs ``stages`` in order over one state (:meth:`run`).

    Before each stage: every field it ``requires`` must be present on the state, else
    :class:`StageOrderError` naming the stage and the field. After it: every field it
    ``provides`` must be present. Each stage's wall time is recorded in :attr:`timings`
    (and in ``state.stage_seconds`` when the state has that mapping); its progress line
    goes to ``progress``.
    """

    def __init__(self, stages: Sequence[Stage], progress: Callable[[str], None] | None = None) -> None:
        names = [s.name for s in stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates or not all(names):
            raise StageOrderError(f"stage names must be unique and non-empty: {names}")
        self.stages = list(stages)
        self.progress = progress
        self.timings: list[StageTiming] = []

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def check(self, provided: Sequence[str] = ()) -> None:
        """Refuse the list without running it when a stage requires a field that neither
        ``provided`` (what the state starts with) nor an earlier stage provides."""
        have = set(provided)
        for s in self.stages:
            missing = [f for f in s.requires if f not in have]
            if missing:
                raise StageOrderError(self._missing(s, missing))
            have.update(s.provides)

    def run(self, state: Any) -> Any:
        for s in self.stages:
            missing = [f for f in s.requires if not _present(state, f)]
            if missing:
                raise StageOrderError(self._missing(s, missing))
            line = s.message(state)
            if line and self.progress is not None:
                self.progress(line)
            t0 = time.perf_counter()
            try:
                label = s.name if s.label is None else s.label
                with labelled(label) if label else contextlib.nullcontext():
                    s.run(state)
            finally:
                seconds = time.perf_counter() - t0
                self.timings.append(StageTiming(s.name, seconds))
                record = getattr(state, "stage_seconds", None)
                if isinstance(record, dict):
                    record[s.name] = seconds
            broken = [f for f in s.provides if not _present(state, f)]
            if broken:
                raise StageOrderError(f"stage {s.name!r} ran but did not provide {', '.join(broken)}")
        return state

    def _missing(self, s: Stage, missing: list[str]) -> str:
        before = self.names[: self.names.index(s.name)]
        return (f"stage {s.name!r} requires {', '.join(missing)}, which no earlier stage provided "
                f"(stages before it: {', '.join(before) or 'none'})")
