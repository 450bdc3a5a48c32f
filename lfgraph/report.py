"""The one report of ``lfgraph compress`` (PyTorch and ONNX sources alike) and its
before/after table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


def ratio(before: float, after: float) -> str:
    return f"{after / before:.3f}x" if before else ""


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def before_after_table(title: str, rows: Sequence[tuple[str, str, str, str]]) -> list[str]:
    """``title`` then one aligned line per (name, before, after, ratio) row."""

    width = max([22, *(len(r[0]) + 2 for r in rows)])

    def line(name: str, before: str, after: str, r: str) -> str:
        return f"  {name:<{width}}{before:>16}{after:>16}{r:>10}"

    return [title, line("", "before", "after", "ratio")] + [line(*row) for row in rows]


def size_rows(
    blocks: tuple[int, int], params: tuple[int, int], file_bytes: tuple[int, int], latency_ms: tuple[float, float],
    latency_name: str = "ORT latency (median)", size_name: str = "ONNX file",
) -> list[tuple[str, str, str, str]]:
    """The rows every compress table starts with: depth, parameters, file size, latency."""
    return [
        ("blocks", str(blocks[0]), str(blocks[1]), ratio(*blocks)),
        ("parameters (unique)", f"{params[0]:,}", f"{params[1]:,}", ratio(*params)),
        (size_name, megabytes(file_bytes[0]), megabytes(file_bytes[1]), ratio(*file_bytes)),
        (latency_name, f"{latency_ms[0]:.1f} ms", f"{latency_ms[1]:.1f} ms", ratio(*latency_ms)),
    ]


@dataclass
class CompressReport:
    """Everything ``compress`` measured, for both source kinds; ``table()`` renders it.

    ``parity``: the written file against the rewritten model ("the file computes what the
    rewritten model computes"). ``quality``: the compressed model against the original
    ("this far from the original"). ``exit_code`` is the one rule every path uses.
    """

    model: str
    source_kind: str
    recipe: str
    plan: Any
    out: Path
    blocks: tuple[int, int]
    params: tuple[int, int]
    file_bytes: tuple[int, int]
    latency_ms: tuple[float, float]
    parity: Any
    quality: Any = None
    max_quality_loss: float | None = None
    notes: list[str] = field(default_factory=list)
    latency_name: str = "ORT latency (median)"
    size_name: str = "ONNX file"
    heal_curve: dict[str, Any] | None = None
    seconds: float = 0.0
    log_records: int = 0
    #: wall seconds of each stage that ran, by stage name, in order
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: block by block: the estimate printed before the work (:class:`lfgraph.estimate.BlocksEstimate`)
    estimate: Any = None
    # in-memory results for the stages after compress (healing, deploy outputs, the visualizer)
    compressed: Any = field(default=None, repr=False)
    graph: Any = field(default=None, repr=False)
    log: Any = field(default=None, repr=False)

    @property
    def quality_ok(self) -> bool:
        if self.max_quality_loss is None or self.quality is None:
            return True
        return bool(self.quality.loss <= self.max_quality_loss)

    @property
    def ok(self) -> bool:
        return self.parity.ok and self.quality_ok

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def rows(self) -> list[tuple[str, str, str, str]]:
        rows = size_rows(self.blocks, self.params, self.file_bytes, self.latency_ms, self.latency_name, self.size_name)
        if self.quality is not None:
            rows.extend(self.quality.rows)
        return rows

    def table(self) -> str:
        lines = before_after_table(f"lfgraph compress {self.model} ({self.source_kind}): {self.recipe}", self.rows())
        achieved = self.plan.provenance.get("achieved")
        if achieved is not None:
            lines.append(f"  removed: {achieved:.1%} of the {self.plan.provenance.get('achieved_kind')}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.heal_curve:
            c = self.heal_curve
            losses = c.get("train_loss") or [float("nan")]
            lines.append(f"  healed: {c.get('steps')} steps, training loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                         f"{c.get('tokens_per_second', 0):.0f} tokens/s")
        verdict = "✓ the file computes what the rewritten model computes" if self.parity.ok else "✗ FAILED: the file does not compute what the rewritten model computes"
        lines.append(f"  export check on {getattr(self.parity, 'provider', 'ONNX Runtime')}: {verdict}")
        lines.extend(self.parity.lines())
        if self.quality is not None:
            if self.quality.skipped:
                lines.append(f"  quality vs the original: not measured ({self.quality.skipped})")
            else:
                lines.extend(self.quality.lines())
                if self.max_quality_loss is not None:
                    gate = "✓ within" if self.quality_ok else "✗ FAILED: above"
                    lines.append(f"  quality gate: {gate} --max-quality-loss {self.max_quality_loss:g}")
        if self.stage_seconds:
            slow = [f"{k} {v:.0f} s" for k, v in self.stage_seconds.items() if v >= 0.5]
            lines.append("  time by stage: " + ", ".join(slow))
        if self.ok:
            lines.append(f"  written: {self.out}  ({self.seconds:.0f} s)")
        else:
            lines.append(f"  ✗ the output failed its check: the requested path was left as it was; written for inspection to "
                         f"{self.out} (marked lfgraph.check: FAILED in its metadata)  ({self.seconds:.0f} s)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "source": self.source_kind, "recipe": self.recipe, "out": str(self.out),
            "rows": [list(r) for r in self.rows()], "notes": self.notes, "ok": self.ok,
            "parity": {"ok": self.parity.ok, "provider": getattr(self.parity, "provider", ""), "max_rel": self.parity.max_rel},
            "heal": self.heal_curve,
            "quality": self.quality.to_dict() if self.quality is not None else None, "seconds": self.seconds,
            "stage_seconds": dict(self.stage_seconds),
        }
