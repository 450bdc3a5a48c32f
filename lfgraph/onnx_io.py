"""ONNX files in and out, and ONNX Runtime sessions: the one place both source paths use.

- :func:`save_onnx`: atomic, with one rule for external data (tensors over ~2 GB, the
  protobuf limit, go to ``<name>.data`` beside the model).
- :func:`check_model`: ``onnx.checker`` full check, also for models over the limit.
- :func:`runner`: an ONNX Runtime session on the best provider (CUDA first when the
  installed onnxruntime has it, then CPU), falling back to the ONNX reference evaluator
  for opsets the installed ORT does not run yet. Outputs come back **by name**.
- :func:`read_metadata` / :func:`add_metadata`: where lfgraph keeps the plan and recipe.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from .errors import LfgraphError, RewriteCheckError
from .fileio import atomic_path
from .plan import FusionPlan

#: Above this many bytes of tensor data a model is saved with its tensors in a ``.data``
#: file beside it: protobuf cannot serialise a message over 2 GB.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def _all_tensors(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    from .frontends.onnx_graph import all_tensors

    return all_tensors(model)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every tensor the model stores (initializers and tensor attributes)."""
    total = 0
    for t in _all_tensors(model):
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize if t.data_type else 0
    return total


def file_bytes(path: str | os.PathLike) -> int:
    """Size on disk of an ONNX file plus its ``.data`` file, when it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` full check (with shape inference); models over the protobuf limit
    are checked from a temporary copy with external data. Raises ``RewriteCheckError``."""
    try:
        if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model, full_check=True)
            return
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "model.onnx"
            _save_external(model, path, "model.onnx.data")
            onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RewriteCheckError(f"the rewritten model fails onnx.checker: {' '.join(str(e).split())[:300]}") from None


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Save with large tensors in ``path.parent / location``; ``model`` is left as it was.

    ``onnx.save_model`` moves tensor bytes out of the model it saves, so it saves a copy:
    the copy's memory goes when it does, whereas bytes cleared from and read back into the
    caller's model would stay allocated in its protobuf arena.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically and return the files written.

    With ``external_data`` (default: when the tensors exceed ~2 GB, the protobuf limit)
    every tensor of 1 kB or more goes to ``<name>.data`` beside the model, itself written
    atomically before the model file (no data file when no tensor is that large).
    ``model`` is left as it was.
    """
    path = Path(path)
    if external_data is None:
        external_data = tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    if not external_data:
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
        return [path]
    data = path.with_name(path.name + ".data")
    if not path.parent.is_dir():
        raise LfgraphError(f"output folder {path.parent} does not exist: create it or choose another -o path")
    written = [path]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as d:
        staged, staged_data = Path(d) / path.name, Path(d) / data.name
        _save_external(model, staged, data.name)
        with atomic_path(path) as tmp_model:
            if staged_data.exists():
                # the data file lands first: the model file never points at missing data
                with atomic_path(data) as tmp_data:
                    os.replace(staged_data, tmp_data)
                written.append(data)
            os.replace(staged, tmp_model)
    return written


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (where lfgraph stores the plan and recipe)."""
    path = Path(path)
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise LfgraphError(f"{path} is not a readable ONNX model (truncated, corrupt or another kind of file)") from None
    if not m.HasField("graph") or len(m.graph.node) == 0:
        raise LfgraphError(f"{path} holds no ONNX graph (empty, truncated or not an ONNX file)")
    return {p.key: p.value for p in m.metadata_props}


def add_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    """Set ``metadata_props`` entries on ``model`` in place (replacing same keys)."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


@functools.lru_cache(maxsize=1)
def ort_max_opset() -> int:
    """The newest default-domain opset the installed ONNX Runtime runs, asked of ORT itself
    (a one-node model per opset, newest first), never assumed from a version number."""
    import onnxruntime as ort

    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(onnx.IR_VERSION, _ir_for_opset(opset))
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return 7


def _ir_for_opset(opset: int) -> int:
    for entry in onnx.helper.VERSION_TABLE:  # (release, ir, ai.onnx opset, ...)
        if entry[2] == opset:
            return int(entry[1])
    return onnx.IR_VERSION


def available_providers() -> list[str]:
    """ORT providers lfgraph uses, best first: CUDA when present, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@dataclass
class Runner:
    """Something that runs an ONNX model: ``run(feed)`` returns ``{output name: array}``."""

    provider: str
    input_names: list[str]
    output_names: list[str]
    _run: Callable[[dict[str, np.ndarray]], list[Any]]

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise LfgraphError(f"the model needs inputs {missing} that were not given")
        outs = self._run({n: feed[n] for n in self.input_names})
        return dict(zip(self.output_names, (np.asarray(o) for o in outs)))


def runner(
    model: str | os.PathLike | onnx.ModelProto,
    exact: bool = False,
    threads: int | None = None,
    providers: list[str] | None = None,
) -> Runner:
    """An ONNX Runtime session on ``model`` (a path or a ModelProto).

    ``exact`` turns graph optimisations off, so that two equal graphs give equal bits (the
    ONNX-vs-ONNX check of a tie of identical weights relies on it). When ORT refuses the
    model because its opset is newer than ORT knows, the ONNX reference evaluator runs it
    instead (slow, exact, says so in ``provider``). Any other refusal is an LfgraphError.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    providers = providers or available_providers()
    proto = model if isinstance(model, onnx.ModelProto) else None
    try:
        if proto is None:
            sess = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
        elif tensor_bytes(proto) < EXTERNAL_DATA_THRESHOLD:
            sess = ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=providers)
        else:
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "model.onnx"
                _save_external(proto, path, "model.onnx.data")
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        return Runner(
            sess.get_providers()[0], [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()],
            lambda feed: sess.run(None, feed),
        )
    except Exception as e:
        ort_error = " ".join(str(e).split())[:200]
    if proto is None:
        proto = onnx.load(str(model))
    if max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0) <= ort_max_opset():
        raise LfgraphError(f"ONNX Runtime {ort.__version__} cannot load the model: {ort_error}")
    from onnx.reference import ReferenceEvaluator

    try:
        ref = ReferenceEvaluator(proto)
    except Exception as e:
        raise LfgraphError(f"neither ONNX Runtime ({ort_error}) nor the ONNX reference evaluator ({str(e)[:150]}) can run the model") from None
    inits = {t.name for t in proto.graph.initializer}
    return Runner(
        f"onnx.reference (ONNX Runtime {ort.__version__} runs opsets up to {ort_max_opset()})",
        [i.name for i in proto.graph.input if i.name not in inits], [o.name for o in proto.graph.output],
        lambda feed: ref.run(None, feed),
    )


def metadata_plan(onnx_path: str | os.PathLike) -> FusionPlan:
    """The plan stored in an lfgraph ONNX file's metadata (``lfgraph.plan``)."""
    meta = read_metadata(onnx_path)
    if "lfgraph.plan" not in meta:
        raise LfgraphError(f"{onnx_path} was not written by lfgraph compress (no plan in its metadata)")
    return FusionPlan.from_json(meta["lfgraph.plan"])
