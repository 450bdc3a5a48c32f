"""``lfgraph compress model.onnx``: the ONNX path of the pipeline.

Load (with every bad-input check), build the LayerGraph from the graph itself, apply the
plan with the ONNX rewrite passes, save atomically, and verify the result against the
input graph in ONNX Runtime. The error is reported, never hidden: ``tie`` of identical
weights must match exactly, other fusions change the function and say by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import LfgraphError
from .export import VerifyReport, alternating_latency
from .fileio import write_text_atomic
from .frontends.onnx_graph import build_layer_graph, load_onnx
from .plan import FusionPlan
from .report import before_after_table, size_rows


@dataclass
class OnnxCompressReport:
    source: Path
    out: Path
    plan: FusionPlan
    blocks: tuple[int, int]
    params: tuple[int, int]
    file_bytes: tuple[int, int]
    latency_ms: tuple[float, float]
    verify: VerifyReport

    def table(self) -> str:
        v = self.verify
        rows = [
            *size_rows(self.blocks, self.params, self.file_bytes, self.latency_ms),
            ("max error vs input", "", f"{v.max_rel:.2e} rel", ""),
        ]
        lines = before_after_table(f"lfgraph compress {self.source.name}: mode {self.plan.mode}, fuse {self.plan.fuse} (ONNX path)", rows)
        lines.append(
            f"  outputs compared with the input graph on {v.provider}"
            + (" (bit-identical)" if v.max_abs == 0.0 else " (the fusion changes the function; error reported above)")
        )
        lines.extend(v.lines())
        lines.append(f"  written: {self.out}")
        return "\n".join(lines)


def _initializer_params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) for i in model.graph.initializer))


def _files_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def compress_onnx(source: str | Path, out: str | Path, plan: FusionPlan, log_path: str | Path | None = None) -> OnnxCompressReport:
    """Apply ``plan`` to the ONNX file ``source`` and write the result to ``out``."""
    from .passes.rewrite_onnx import apply_plan, make_inputs, save_onnx, verify_against

    source, out = Path(source), Path(out)
    if out.suffix != ".onnx":
        raise LfgraphError(f"output {out} must end in .onnx")
    if not out.parent.exists():
        raise LfgraphError(f"output folder {out.parent} does not exist: create it or choose another -o path")
    if out.resolve() == source.resolve():
        raise LfgraphError("the output would overwrite the input model: choose another -o path")
    model = load_onnx(source)
    graph = build_layer_graph(model, model_name=source.stem)
    plan.check_applies_to(graph.fingerprint())
    result = apply_plan(model, graph, plan)
    prop = result.model.metadata_props.add()
    prop.key, prop.value = "lfgraph.plan", plan.to_json()
    save_onnx(result.model, out)
    if log_path:
        write_text_atomic(log_path, result.log.to_json())
    feed = make_inputs(model)
    verify = verify_against(model, result.model, feed)
    removed = sum(len(f.absorb) for f in plan.fusions) if plan.mode == "merge" else 0
    return OnnxCompressReport(
        source=source, out=out, plan=plan, blocks=(len(graph.blocks), len(graph.blocks) - removed),
        params=(_initializer_params(model), _initializer_params(result.model)),
        file_bytes=(_files_bytes(source), _files_bytes(out)),
        latency_ms=tuple(med for med, _ in alternating_latency([source, out], feed, runs=10)), verify=verify,
    )

