"""One output check for every path: outputs matched **by name**, then ``max|a - b|``.

Used after every export (ONNX vs the PyTorch model it came from), after every ONNX rewrite
(rewritten graph vs input graph) and by ``lfgraph verify``. A missing or an extra output,
or a shape change, fails the check; positions an attention mask marks as padding are left
out (a token that attends to nothing has no defined output). Also the latency timing that
the report uses (alternating sessions, so machine noise hits both models alike).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .onnx_io import runner

if TYPE_CHECKING:
    import onnx
    import torch


@dataclass
class OutputCheck:
    """One output compared: its largest absolute error and that relative to the reference's
    largest magnitude (elementwise ratios blow up near zero and say nothing)."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


class CheckList:
    """What every check report answers, over its items (each with ``ok``, ``max_abs``,
    ``max_rel``): passed only when there is something checked and all of it passed."""

    def items(self) -> list:  # type: ignore[type-arg]
        raise NotImplementedError

    @property
    def ok(self) -> bool:
        return bool(self.items()) and all(o.ok for o in self.items())

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.items()), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.items()), default=0.0)


@dataclass
class VerifyReport(CheckList):
    """The checks of one comparison; ``ok`` only when every output passed."""

    provider: str
    reference: str = "PyTorch"
    rtol: float = 1e-4
    outputs: list[OutputCheck] = field(default_factory=list)

    def items(self) -> list[OutputCheck]:
        return self.outputs

    def lines(self) -> list[str]:
        out = []
        for o in self.outputs:
            what = o.note or f"max abs error {o.max_abs:.3e}, max rel error {o.max_rel:.3e}"
            out.append(f"  {'✓' if o.ok else '✗'} {o.name}: {what} (vs {self.reference}, {self.provider}, rtol {self.rtol:g})")
        return out


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    provider: str,
    reference_name: str = "PyTorch",
    rtol: float = 1e-4,
    mask: np.ndarray | None = None,
) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` output by output, matched by name.

    Guarantees: every name in either mapping gets a line; a name missing from one side, or
    a shape that differs, fails. ``mask`` (batch, sequence), when given, drops padded
    positions from outputs whose leading axes have that shape.
    """
    report = VerifyReport(provider=provider, reference=reference_name, rtol=rtol)
    for name in list(reference) + [n for n in candidate if n not in reference]:
        if name not in candidate:
            report.outputs.append(OutputCheck(name, float("inf"), float("inf"), False, "missing from the ONNX model"))
            continue
        if name not in reference:
            report.outputs.append(OutputCheck(name, float("inf"), float("inf"), False, f"not an output of the {reference_name} model"))
            continue
        want, got = np.asarray(reference[name]), np.asarray(candidate[name])
        if got.shape != want.shape:
            report.outputs.append(OutputCheck(name, float("inf"), float("inf"), False, f"shape {got.shape} != {want.shape}"))
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        if mask is not None and diff.shape[: mask.ndim] == mask.shape:
            keep = mask.astype(bool)
            diff, want = diff[keep], want[keep]
        err = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(want).max()) if want.size else 0.0
        rel = err / scale if scale > 0 else err
        report.outputs.append(OutputCheck(name, err, rel, rel <= rtol))
    return report


def verify_onnx(
    path: str | os.PathLike,
    reference: Mapping[str, np.ndarray],
    feed: Mapping[str, np.ndarray],
    reference_name: str = "PyTorch",
    rtol: float = 1e-4,
    mask_input: str | None = "attention_mask",
    exact: bool = False,
) -> VerifyReport:
    """Run the ONNX model at ``path`` (or a ModelProto) on ``feed`` and compare with
    ``reference`` outputs (by name); see :func:`compare_outputs`."""
    run = runner(path, exact=exact)
    got = run.run(feed)
    mask = feed.get(mask_input) if mask_input else None
    return compare_outputs(reference, got, run.provider, reference_name, rtol, mask)


def alternating_latency(paths: Sequence[str | os.PathLike], feed: Mapping[str, np.ndarray], runs: int = 10) -> list[tuple[float, float]]:
    """(median, min) milliseconds of each ONNX file on ``feed``, run alternately.

    Alternating the sessions run by run makes machine noise hit every model alike, so
    the ratio of the medians is meaningful on a shared machine.
    """
    sessions = [runner(p) for p in paths]
    for s in sessions:
        s.run(feed)  # warm-up
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    return [(float(np.median(t)), float(min(t))) for t in times]


def alternating_torch_latency(modules: Sequence["torch.nn.Module"], inputs: Sequence["torch.Tensor"], runs: int = 5) -> list[float]:
    """Median milliseconds of each PyTorch module on ``inputs``, run alternately (for
    outputs without an ONNX file, as :func:`alternating_latency` times files)."""
    import torch

    times: list[list[float]] = [[] for _ in modules]
    with torch.no_grad():
        for m in modules:
            m(*inputs)  # warm-up
        for _ in range(runs):
            for k, m in enumerate(modules):
                t = time.perf_counter()
                m(*inputs)
                times[k].append((time.perf_counter() - t) * 1e3)
    return [float(np.median(t)) for t in times]


def torch_outputs(module: "torch.nn.Module", inputs: Mapping[str, "torch.Tensor"], input_names: Sequence[str], output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """``module``'s outputs on ``inputs`` (passed positionally in ``input_names`` order),
    named by ``output_names``. A module that returns another number of outputs than it
    declares is an error, never silently paired."""
    import torch

    from .errors import LfgraphError

    with torch.no_grad():
        out = module(*[inputs[n] for n in input_names])
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    if len(outs) != len(output_names):
        raise LfgraphError(f"the model returns {len(outs)} outputs but declares {len(output_names)} ({', '.join(output_names)})")
    return {n: o.detach().cpu().numpy() for n, o in zip(output_names, outs)}


def verify_against_torch(
    path: str | os.PathLike,
    module: "torch.nn.Module",
    inputs: Mapping[str, "torch.Tensor"],
    output_names: Sequence[str] | None = None,
    rtol: float = 1e-4,
) -> VerifyReport:
    """The ONNX file at ``path`` against the PyTorch ``module`` it was exported from.

    ``inputs`` are fed to both (to the module in the ONNX file's input order);
    ``output_names`` name the module's outputs (default: the ONNX file's own names, which
    is right for files lfgraph exported from this module). Outputs are compared by name.
    """
    run = runner(path)
    feed = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    got = run.run(feed)
    reference = torch_outputs(module, inputs, run.input_names, list(output_names or run.output_names))
    return compare_outputs(reference, got, run.provider, "PyTorch", rtol, feed.get("attention_mask"))


def verify_against_onnx(original: "onnx.ModelProto | str | os.PathLike", rewritten: "onnx.ModelProto | str | os.PathLike",
                        feed: Mapping[str, np.ndarray] | None = None, rtol: float = 1e-4) -> VerifyReport:
    """A rewritten ONNX graph against the graph it came from, on the same ``feed``
    (default: :func:`lfgraph.passes.rewrite_onnx.make_inputs` of the original).

    Both run without graph optimisations (equal graphs give equal bits, so ``max_abs ==
    0.0`` means bit-identical) and one after the other (each session holds the weights).
    """
    if feed is None:
        import onnx

        from .passes.rewrite_onnx import make_inputs

        proto = original if isinstance(original, onnx.ModelProto) else onnx.load(str(original))
        feed = make_inputs(proto)
    ref_run = runner(original, exact=True)
    reference = ref_run.run(feed)
    del ref_run
    run = runner(rewritten, exact=True)
    return compare_outputs(reference, run.run(feed), run.provider, "the input graph", rtol)
