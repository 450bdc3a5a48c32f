"""Export to ONNX and verify on ONNX Runtime.

``export_onnx`` runs ``torch.onnx.export`` (the ``torch.export``-based exporter) with dynamic
batch and sequence axes, stores every tied weight once (identical initializers are merged
by content, as Optimum does), embeds the plan and options in the model metadata, and
writes the file atomically. ``verify_onnx`` runs the file in ONNX Runtime (CUDA execution
provider when the installed onnxruntime has it and a GPU is present, CPU otherwise) and
compares each output with PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .errors import LfgraphError
from .fileio import atomic_path

#: Largest model saved as one file; protobuf cannot serialise more than 2 GB.
SINGLE_FILE_LIMIT = 1_800_000_000


@dataclass
class ExportReport:
    path: Path
    file_bytes: int
    initializer_bytes: int
    deduplicated: int
    seconds: float


def export_onnx(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    metadata: Mapping[str, str] | None = None,
    optimize: bool = False,
) -> ExportReport:
    """Export ``module`` to ``path``; see the module docstring.

    ``optimize`` runs the exporter's ONNX optimizer (constant folding, pre-transposed
    weights). It doubles export time and ONNX Runtime folds the same constants when it
    loads the model, so it is off by default; with it off, initializers keep the PyTorch
    parameter names, which the ONNX frontend uses to name layers.

    ``dynamic_axes`` maps input names to ``{axis: name}`` (e.g. ``{"input_ids": {0:
    "batch", 1: "sequence"}}``); outputs get their dynamic axes from the trace. The
    existing file at ``path`` is replaced only when the export succeeded.
    """
    t0 = time.perf_counter()
    module = module.eval()
    dynamic_shapes = None
    if dynamic_axes:
        dynamic_shapes = tuple(
            {axis: torch.export.Dim.DYNAMIC for axis in dynamic_axes.get(name, {})} or None for name in input_names
        )
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with torch.no_grad(), _quiet_exporter():
                torch.onnx.export(
                    module, tuple(example_inputs), str(raw), dynamo=True, input_names=list(input_names),
                    output_names=list(output_names), dynamic_shapes=dynamic_shapes, external_data=True,
                    optimize=optimize, verbose=False,
                )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LfgraphError(f"ONNX export of {type(module).__name__} failed: {msg[:300]}") from None
        model = onnx.load(str(raw), load_external_data=True)
    merged = deduplicate_initializers(model)
    _strip_trace_metadata(model.graph)
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    save_onnx(model, path)
    init_bytes = sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    size = Path(path).stat().st_size + (Path(str(path) + ".data").stat().st_size if Path(str(path) + ".data").exists() else 0)
    return ExportReport(Path(path), size, init_bytes, merged, time.perf_counter() - t0)


@contextlib.contextmanager
def _quiet_exporter():  # type: ignore[no-untyped-def]
    """Silence the exporter's chatter (missing torchvision ops, deprecations of torch
    internals): it is not about the user's model and buries lfgraph's own report."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def deduplicate_initializers(model: onnx.ModelProto) -> int:
    """Merge initializers with identical dtype, shape and bytes into one; return how many went.

    Tied weights reach the exporter as one tensor but may leave it as several (one per
    use, or pre-transposed copies); merging by content stores each once.
    """
    keep_by_digest: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept = []
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        digest = (arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
        if digest in keep_by_digest and arr.size > 1:
            rename[init.name] = keep_by_digest[digest]
            continue
        keep_by_digest.setdefault(digest, init.name)
        kept.append(init)
    if not rename:
        return 0
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    _rename_inputs(model.graph, rename)
    return len(rename)


def _strip_trace_metadata(graph: onnx.GraphProto) -> None:
    """Drop per-node stack traces and doc strings the exporter adds (kilobytes per node)."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_trace_metadata(attr.g)


def _rename_inputs(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, rename)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_inputs(g, rename)
    for out in graph.output:
        if out.name in rename:
            out.name = rename[out.name]


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` atomically; models over the protobuf limit get a ``.data`` file beside."""
    path = Path(path)
    big = model.ByteSize() > SINGLE_FILE_LIMIT if _has_inline_data(model) else True
    if not big:
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
        return
    data_name = path.name + ".data"
    with atomic_path(path.with_name(data_name)) as tmp_data, atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024)
        # the model refers to its data file by name: point it at the final name
        m = onnx.load(str(tmp), load_external_data=False)
        for init in m.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = data_name
        onnx.save_model(m, str(tmp))


def _has_inline_data(model: onnx.ModelProto) -> bool:
    return all(i.data_location != onnx.TensorProto.EXTERNAL for i in model.graph.initializer)


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class VerifyReport:
    provider: str
    outputs: list[OutputCheck] = field(default_factory=list)
    ort_latency_ms: float = float("nan")
    torch_latency_ms: float = float("nan")

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def lines(self) -> list[str]:
        return [
            f"  {'✓' if o.ok else '✗'} {o.name}: max abs error {o.max_abs:.3e}, max rel error {o.max_rel:.3e} ({self.provider})"
            for o in self.outputs
        ]


def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ORT session on the best available provider (CUDA first, then CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:
        raise LfgraphError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None


def verify_onnx(
    path: str | os.PathLike,
    module: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    rtol: float = 1e-4,
    timing_runs: int = 0,
    mask_input: str | None = "attention_mask",
) -> VerifyReport:
    """Run ``path`` in ORT and ``module`` in PyTorch on ``inputs``; compare every output.

    The relative error is ``max|ort - torch| / max|torch|`` per output (elementwise ratios
    blow up near zero and say nothing about the model); an output passes when it is at
    most ``rtol``. Positions that ``inputs[mask_input]`` marks as padding (0) are left out
    of the comparison: a token that attends to nothing has no defined output. With
    ``timing_runs`` > 0 both are also timed (median, milliseconds).
    """
    sess = ort_session(path)
    feed = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feed]
    if missing:
        raise LfgraphError(f"{path} needs inputs {missing} that were not given")
    ort_out = sess.run(None, {n: feed[n] for n in names})
    with torch.no_grad():
        ref = module(*[inputs[n] for n in names])
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    report = VerifyReport(provider=sess.get_providers()[0])
    for out_meta, got, want in zip(sess.get_outputs(), ort_out, refs):
        want_np = want.detach().cpu().numpy()
        if got.shape != want_np.shape:
            report.outputs.append(OutputCheck(out_meta.name, float("inf"), float("inf"), False))
            continue
        diff = np.abs(got - want_np)
        mask = feed.get(mask_input) if mask_input else None
        if mask is not None and diff.shape[: mask.ndim] == mask.shape:
            keep = mask.astype(bool)
            diff, want_np = diff[keep], want_np[keep]
        err = float(np.max(diff)) if diff.size else 0.0
        scale = float(np.max(np.abs(want_np))) if want_np.size else 1.0
        rel = err / scale if scale > 0 else err
        report.outputs.append(OutputCheck(out_meta.name, err, rel, rel <= rtol))
    if timing_runs:
        report.ort_latency_ms = _median_ms(lambda: sess.run(None, {n: feed[n] for n in names}), timing_runs)
        with torch.no_grad():
            report.torch_latency_ms = _median_ms(lambda: module(*[inputs[n] for n in names]), timing_runs)
    return report


def alternating_latency(paths: Sequence[str | os.PathLike], feed: Mapping[str, np.ndarray], runs: int = 10) -> list[tuple[float, float]]:
    """(median, min) milliseconds of each ONNX file on ``feed``, run alternately.

    Alternating the sessions run by run makes machine noise hit every model alike, so
    the ratio of the medians is meaningful on a shared machine.
    """
    sessions = [ort_session(p) for p in paths]
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    for s, f in zip(sessions, feeds):
        s.run(None, f)  # warm-up
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            times[k].append((time.perf_counter() - t) * 1e3)
    return [(float(np.median(t)), float(min(t))) for t in times]


def _median_ms(fn: Any, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (where lfgraph stores the plan and options)."""
    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}
