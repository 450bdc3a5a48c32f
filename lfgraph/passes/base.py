"""What every pass returns, and the rewrite log that the report and the visualizer read.

Modelled on ``torch.fx.passes.infra``: a pass has one entry point, says whether it changed
anything, and is checked right after it runs. Every rewrite appends ``RewriteRecord``s
("what changed, from what, to what"), so no second bookkeeping is needed for reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RewriteRecord:
    """One change a rewrite pass made.

    ``action`` is one of: ``tie`` (``target`` now shares the weight of ``sources[0]``),
    ``fuse`` (``target``'s weight replaced by a fusion of ``sources``), ``permute``
    (hidden units of ``target`` reordered to match ``sources[0]``), ``remove`` (block
    ``target`` deleted; its consumers now read its input), ``refit`` (``target`` refitted
    by least squares on calibration data).
    """

    pass_name: str
    action: str
    target: str
    sources: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewriteLog:
    records: list[RewriteRecord] = field(default_factory=list)

    def add(self, pass_name: str, action: str, target: str, sources: list[str] | None = None, **detail: Any) -> None:
        self.records.append(RewriteRecord(pass_name, action, target, list(sources or []), dict(detail)))

    def to_json(self) -> str:
        return json.dumps([asdict(r) for r in self.records], indent=2, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "RewriteLog":
        return cls([RewriteRecord(**r) for r in json.loads(text)])

    def count(self, action: str) -> int:
        return sum(1 for r in self.records if r.action == action)


@dataclass
class PassResult:
    """A pass's output: the (new) model object, whether it changed, and what it did."""

    model: Any
    modified: bool
    log: RewriteLog = field(default_factory=RewriteLog)
