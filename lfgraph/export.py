"""PyTorch → ONNX.

``export_onnx`` runs ``torch.onnx.export`` (the ``torch.export``-based exporter) with
dynamic axes named as the caller says (``batch``, ``sequence``…), stores every tied weight
once (identical initializers are merged by content, as Optimum does), embeds the plan and
options in the model metadata, and writes the file atomically through
:func:`lfgraph.onnx_io.save_onnx`. Checking the file against PyTorch is
:mod:`lfgraph.verify`'s job.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .errors import LfgraphError
from .onnx_io import add_metadata, file_bytes, save_onnx


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
    if dynamic_axes:
        name_dynamic_axes(model.graph, dynamic_axes)
    add_metadata(model, dict(metadata or {}))
    save_onnx(model, path)
    init_bytes = sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    return ExportReport(Path(path), file_bytes(path), init_bytes, merged, time.perf_counter() - t0)


def name_dynamic_axes(graph: onnx.GraphProto, dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Rename the exporter's symbolic dimensions (``s72``…) to the names the caller gave
    each input axis, everywhere they occur (inputs, outputs, value_info): the same symbol
    always means the same size, so the outputs get the names too."""
    rename: dict[str, str] = {}
    for vi in graph.input:
        for axis, name in dynamic_axes.get(vi.name, {}).items():
            dims = vi.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].dim_param:
                rename.setdefault(dims[axis].dim_param, name)
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


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
