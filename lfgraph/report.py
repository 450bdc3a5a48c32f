"""The before/after table that ``lfgraph compress`` ends with (PyTorch and ONNX paths)."""

from __future__ import annotations

from typing import Sequence


def ratio(before: float, after: float) -> str:
    return f"{after / before:.3f}x" if before else ""


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def before_after_table(title: str, rows: Sequence[tuple[str, str, str, str]]) -> list[str]:
    """``title`` then one aligned line per (name, before, after, ratio) row."""

    def line(name: str, before: str, after: str, r: str) -> str:
        return f"  {name:<22}{before:>16}{after:>16}{r:>10}"

    return [title, line("", "before", "after", "ratio")] + [line(*row) for row in rows]


def size_rows(
    blocks: tuple[int, int], params: tuple[int, int], file_bytes: tuple[int, int], latency_ms: tuple[float, float]
) -> list[tuple[str, str, str, str]]:
    """The rows every compress table starts with: depth, parameters, file size, latency."""
    return [
        ("blocks", str(blocks[0]), str(blocks[1]), ratio(*blocks)),
        ("parameters (unique)", f"{params[0]:,}", f"{params[1]:,}", ratio(*params)),
        ("ONNX file", megabytes(file_bytes[0]), megabytes(file_bytes[1]), ratio(*file_bytes)),
        ("ORT latency (median)", f"{latency_ms[0]:.1f} ms", f"{latency_ms[1]:.1f} ms", ratio(*latency_ms)),
    ]
