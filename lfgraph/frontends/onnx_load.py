"""Loading ONNX files for the ONNX frontend, with every bad-input check (see :func:`load_onnx`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from ..errors import LfgraphError, UnsupportedModelError

#: Op domains that ONNX or ONNX Runtime define; any other needs a custom-op library.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft"})


# --------------------------------------------------------------------------------------
# Loading


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and validate an ONNX file, with external data, for lfgraph.

    Expects: a path to an ``.onnx`` file (external-data files beside it, as the model says).
    Guarantees: the returned model passed ``onnx.checker`` (full check, with shape
    inference), uses only op domains ONNX Runtime knows (or that the model defines as
    functions), and holds all tensor data in memory. The file is only read. Every problem
    is raised as :class:`LfgraphError` with one line saying what is wrong and what to do.
    """
    p = Path(path)
    if not p.exists():
        raise LfgraphError(f"model file {p} does not exist: check the path")
    if not p.is_file():
        raise LfgraphError(f"{p} is a folder, not an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-wrapped errors, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LfgraphError(f"{p} is not a readable ONNX model (truncated or corrupt protobuf: {reason[:200]}): re-export it") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise LfgraphError(f"{p} holds no ONNX graph (empty, truncated or not an ONNX file): re-export it")
    _check_external_data(model, p)
    _check_domains(model, p)
    try:
        # by path: the checker then reads external data itself and is not bound by the
        # 2 GB protobuf limit of an in-memory model
        onnx.checker.check_model(str(p), full_check=True)
    except Exception as e:
        reason = " ".join(str(e).split())
        raise LfgraphError(f"{p} fails onnx.checker: {reason[:300]}") from None
    if any(uses_external_data(t) for t in all_tensors(model)):
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as e:
            raise LfgraphError(f"cannot read the external data of {p}: {str(e).splitlines()[0][:200]}") from None
    return model


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: initializers and tensor attributes, subgraphs included."""
    yield from model.graph.initializer
    for node in _all_nodes(model.graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
    for graph in _subgraphs(model.graph):
        yield from graph.initializer


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
            for g in subs:
                yield g
                yield from _subgraphs(g)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    yield from graph.node
    for g in _subgraphs(graph):
        yield from g.node


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    for tensor in all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        data = path.parent / info.location
        if not data.is_file():
            raise LfgraphError(
                f"external data file {info.location!r} of tensor {tensor.name!r} is missing (expected at {data}): "
                f"copy it next to {path.name}"
            )
        need = (info.offset or 0) + (info.length or 0)
        if info.length and data.stat().st_size < need:
            raise LfgraphError(
                f"external data file {data} is shorter than tensor {tensor.name!r} needs ({data.stat().st_size} < {need} bytes): "
                "it is truncated; copy it again"
            )


def _check_domains(model: onnx.ModelProto, path: Path) -> None:
    local = {f.domain for f in model.functions}
    for node in _all_nodes(model.graph):
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise UnsupportedModelError(
                f"{path.name}: node {node.name or node.op_type!r} uses op {node.op_type!r} from the custom domain "
                f"{node.domain!r}, which lfgraph cannot interpret and ONNX Runtime cannot run without its custom-op "
                "library: export the model with standard ONNX ops"
            )
