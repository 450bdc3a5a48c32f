"""The one pipeline, for PyTorch / Hugging Face / GGUF models and ``.onnx`` files alike::

    check options → load (Source) → LayerGraph → plan → rewrite → [heal] → write (staged)
      → verify (file vs rewritten model) → quality (compressed vs original) → time → report

Each step is a stage (:mod:`lfgraph.stages`) run by one manager
(:class:`~lfgraph.passes.manager.StageManager`), which checks what each stage requires,
names it in any user error and times it; with-past ONNX decoders run the same manager with
their own variants of some stages. What differs per source lives in
:mod:`lfgraph.sources`, what differs per model type in :mod:`lfgraph.model_types`; this
module never branches on either. One exit-code rule (:attr:`CompressReport.exit_code`): 0
when the file computes what the rewritten model computes (and the quality loss is within
``max_quality_loss`` when given), 1 otherwise.

    from lfgraph import pipeline
    report = pipeline.compress("smollm2", "out/smollm2-lf.onnx", target=0.25)
    print(report.table())
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import LfgraphError
from .fileio import given_path
from .graph import LayerGraph
from .model_types import CalibrationOptions
from .models import LoadedModel, load_model
from .onnx_io import metadata_plan
from .passes.analysis import Analysis, analyze
from .passes.manager import StageManager, labelled
from .plan import FusionPlan
from .planning import (  # the stages usable one by one, from here as before
    Recipe, check_inputs, check_recipe, plan_model, resolve_recipe, rewrite, weight_warnings,
)
from .registry import SLEB_BUDGET, fusion_rule
from .report import CompressReport
from .sources import Source, TorchSource, open_source
from .stages import CompressState, build_stages, write_report_page
from .verify import verify_onnx

__all__ = [
    "CompressReport", "CompressState", "Recipe", "SLEB_TOKENS", "SLEB_WINDOWS", "analyze_model", "build_stages", "calibration_tokens",
    "check_inputs", "check_recipe", "compress", "graph_of", "load", "plan_model", "plan_summary", "resolve_recipe", "rewrite",
    "stage", "trace", "verify", "weight_warnings", "write_report_page",
]

#: SLEB's calibration budget (windows, tokens each) for language models: the registry entry's.
SLEB_WINDOWS, SLEB_TOKENS = SLEB_BUDGET.windows, SLEB_BUDGET.tokens

#: Name the pipeline stage in any user error raised inside it (``with stage("plan"): …``).
stage = labelled


# ---------------------------------------------------------------------------------------
# the stages, usable one by one


def load(spec: str | LoadedModel) -> LoadedModel:
    """A loaded PyTorch model from a spec (or the given one unchanged)."""
    return spec if isinstance(spec, LoadedModel) else load_model(spec)


def trace(model: LoadedModel) -> LayerGraph:
    """The model's LayerGraph (torch.export)."""
    return TorchSource(model).graph()


def graph_of(spec: str | LoadedModel | Source) -> tuple[Source, LayerGraph]:
    """The source and its LayerGraph, for any spec (``.onnx`` files included)."""
    source = open_source(spec)
    return source, source.graph()


def analyze_model(spec: str | LoadedModel | Source, metric: str = "bures", scope: str = "global", progress: bool = True) -> tuple[Source, LayerGraph, Analysis]:
    source, graph = graph_of(spec)
    return source, graph, analyze(graph, metric, progress=progress, scope=scope)


def calibration_tokens(model: LoadedModel, n_windows: int = 16, seq_len: int = 256, text_file: str | None = None) -> torch.Tensor:
    """Calibration windows for a language model (a part of the bundled corpus kept apart
    from evaluation, or the user's text file)."""
    return TorchSource(model).calibration(CalibrationOptions(text_file=text_file, windows=n_windows, seq_len=seq_len))


# ---------------------------------------------------------------------------------------
# compress


def compress(
    spec: str | os.PathLike | LoadedModel | Source,
    out: str | Path,
    plan: FusionPlan | str | Path | None = None,
    target: float = 0.25,
    mode: str = "merge",
    select: str | None = None,
    fuse: str | None = None,
    metric: str | None = None,
    scope: str | None = None,
    target_kind: str = "blocks",
    calibration_text: str | None = None,
    calibration_tokens: str | None = None,
    calibration_windows: int = 16,
    calibration_seq_len: int = 256,
    eval_windows: int = 4,
    eval_seq_len: int = 512,
    max_quality_loss: float | None = None,
    log_path: str | Path | None = None,
    report_path: str | Path | None = None,
    heal_steps: int = 0,
    heal_options: dict[str, Any] | None = None,
    rtol: float | None = None,
    quiet: bool = False,
    distill_trainable: str | None = None,
    overwrite: bool = False,
    onnx: bool = True,
    engine: str = "auto",
    device: str = "cpu",
    distill_objective: str | None = None,
) -> CompressReport:
    """Compress a model to ``out`` (ONNX), verify the file and measure the cost.

    With ``plan`` the given plan is applied (it must have been made for this model);
    otherwise one is made from ``target`` and the selection/fusion options, which default
    to the best measured recipe for the model family. ``metric``/``scope`` apply to
    ``select="similarity"`` only (given with another selection, the report says they were
    ignored). ``distill_trainable`` chooses what the ``-distill`` rules train with the maps
    (``maps``, ``neighbors``, ``blocks``; default: the rule's). ``eval_windows`` held-out
    windows of ``eval_seq_len`` tokens measure quality against the original for language
    models (0 skips the quality check). With
    ``max_quality_loss``, a larger loss makes the report fail (exit code 1; the file is
    written beside ``out``, see Guarantees). ``heal_steps`` > 0 fine-tunes the rewritten model by
    distillation from the original before it is written (``heal_options``: the keyword
    arguments of :func:`lfgraph.retrain.cli.heal_compressed`). ``out`` ending in ``.onnx``
    is one file; for causal LMs any other path is a deploy folder (Hugging Face checkpoint,
    with-past ``model.onnx``, ``genai_config.json``). ``report_path`` writes the
    visualizer's page of the run. ``onnx=False`` (``--no-onnx``) writes a causal LM's
    folder as a Hugging Face checkpoint only, as for families the ONNX export cannot take.

    Guarantees (:mod:`lfgraph.fileio`): the model and input files are not modified; every
    output is checked before loading (not an input, writable, not a file lfgraph did not
    write unless ``overwrite``); ``out`` (and its ``.data``) appear only complete, after the
    export check ran. A failed check (export check or quality gate) leaves ``out`` as it
    was: the output goes to :func:`~lfgraph.fileio.failed_path` (``NAME.failed.onnx``,
    ``NAME.failed/``), marked ``lfgraph.check: FAILED …`` in its ONNX metadata, and the
    report says so (exit code 1).
    """
    state = CompressState(
        spec=spec, out=given_path("-o", out), plan_arg=plan, target=target, mode=mode, select=select, fuse=fuse, metric=metric, scope=scope,
        target_kind=target_kind, calibration_options=CalibrationOptions(calibration_text, calibration_tokens, calibration_windows,
                                                                        calibration_seq_len),
        eval_windows=eval_windows, eval_seq_len=eval_seq_len, max_quality_loss=max_quality_loss, log_path=log_path,
        report_path=report_path, heal_steps=heal_steps, heal_options=heal_options, rtol=rtol, quiet=quiet,
        distill_trainable=distill_trainable, overwrite=overwrite, onnx=onnx, engine=engine, device=device,
        distill_objective=distill_objective,
    )
    manager = StageManager(build_stages(state), progress=state.say)
    with state.staging:  # the staging folder goes whatever happens
        manager.run(state)
    assert state.report is not None
    return state.report


# ---------------------------------------------------------------------------------------
# verify and helpers


def verify(onnx_file: str | Path, spec: str | LoadedModel, rtol: float = 1e-4) -> Any:
    """Re-check an lfgraph ONNX file: re-apply the plan in its metadata to ``spec`` (the
    model it was compressed from, PyTorch or ONNX) and compare outputs by name."""
    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise LfgraphError(f"ONNX file {onnx_file} does not exist")
    plan = metadata_plan(onnx_file)
    if fusion_rule(plan.fuse).needs_calibration:
        raise LfgraphError("verify re-runs the rewrite; a calibrated plan depends on calibration data: verify right after compress instead")
    source, graph = graph_of(spec)
    compressed = rewrite(source, graph, plan, progress=False).model
    feed = source.verification_feed()
    return verify_onnx(onnx_file, source.reference_outputs(compressed, feed), feed, "the rewritten model", rtol)


def plan_summary(plan: FusionPlan) -> str:
    """A few lines for people: what the plan fuses."""
    p = plan.provenance
    head = (f"plan: mode {plan.mode}, fuse {plan.fuse}, {len(plan.fusions)} fusions, "
            f"select {p.get('select', 'similarity')}" + (f" by {p['metric']} ({p.get('scope')})" if "metric" in p else ""))
    lines = [head]
    for f in plan.fusions:
        lines.append(f"  keep {f.keep:<40} absorb {', '.join(f.absorb)}  (score {f.score:.4g}{', aligned' if f.align else ''})")
    if "blocks_before" in p:
        lines.append(f"  blocks {p['blocks_before']} -> {p.get('blocks_after')}; parameters saved {p.get('params_saved', '?')}")
    if "achieved" in p:
        lines.append(f"  removes {p['achieved']:.1%} of the {p.get('achieved_kind')} (target {p.get('target')})")
    return "\n".join(lines)
