"""The one pipeline, for PyTorch / Hugging Face / GGUF models and ``.onnx`` files alike::

    check options → load (Source) → LayerGraph → plan → rewrite → [heal] → write (staged)
      → verify (file vs rewritten model) → quality (compressed vs original) → time → report

What differs per source lives in :mod:`lfgraph.sources`, what differs per model type in
:mod:`lfgraph.model_types`; this module never branches on either. Every stage's user
errors are :class:`~lfgraph.errors.LfgraphError` naming the stage; one exit-code rule
(:attr:`CompressReport.exit_code`): 0 when the file computes what the rewritten model
computes (and the quality loss is within ``max_quality_loss`` when given), 1 otherwise.

    from lfgraph import pipeline
    report = pipeline.compress("smollm2", "out/smollm2-lf.onnx", target=0.25)
    print(report.table())
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import __version__
from .calibration import load_calibration_text
from .errors import LfgraphError
from .estimate import check_in_memory_fits
from .onnx_io import metadata_plan
from .fileio import check_outputs, commit_folder, failed_path, staging_folder, write_text_atomic
from .graph import LayerGraph
from .model_types import CalibrationOptions
from .options import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, SEQ_LEN, STEPS, check
from .models import ALIASES, LoadedModel, load_model
from .passes.analysis import Analysis, analyze
from .passes.base import PassResult
from .passes.map_distillation import TRAINED_WITH_THE_MAPS
from .plan import FusionPlan
from .recipes import ACTIVATION_SELECTIONS, FUSION_RULES, SELECTIONS, default_recipe, describe, refit_provenance, split_fusion_rule
from .report import CompressReport
from .sources import Source, TorchSource, check_model_spec, is_onnx_spec, open_source
from .verify import verify_onnx
from .outputs import mark_onnx_failed, output_for

#: SLEB's calibration budget (windows, tokens each) for language models: SLEB scores every
#: remaining block at every step (layers² forward passes); on CPU this budget took 80-380 s.
SLEB_WINDOWS, SLEB_TOKENS = 2, 64


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"lfgraph: {msg}", flush=True)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the pipeline stage in any user error raised inside it."""
    try:
        yield
    except LfgraphError as e:
        if not getattr(e, "stage", None):
            e.stage = name  # type: ignore[attr-defined]
        raise


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


def plan_model(
    model: LoadedModel | Source,
    graph: LayerGraph,
    target: float,
    mode: str = "merge",
    select: str = "similarity",
    fuse: str = "aligned-mean",
    metric: str = "bures",
    scope: str = "adjacent",
    target_kind: str = "blocks",
    calibration: Any = None,
    analysis: Analysis | None = None,
    progress: bool = True,
    distill_trainable: str | None = None,
) -> FusionPlan:
    """A FusionPlan by weight similarity (``select="similarity"``) or by an activation-based
    selection (Block Influence, Gromov angular distance, SLEB; PyTorch sources only).

    The plan's provenance states the fraction actually removed (a target is rounded to
    whole blocks) and, for activation selections, each candidate block's score.
    ``distill_trainable`` (``-distill`` rules only) replaces the rule's trainable set.
    """
    check_recipe(target, mode, select, fuse, target_kind)
    refit_provenance(fuse, distill_trainable)  # refuse a bad combination before selecting
    rule, align = split_fusion_rule(fuse)
    if select == "similarity":
        from .passes.planner import make_plan

        plan = make_plan(graph, metric=metric, target=target, target_kind=target_kind, scope=scope, mode=mode,
                         fuse=rule, align=align, analysis=analysis, progress=progress)
        plan.provenance["select"] = "similarity"
        return _finish_plan(plan, graph, fuse, distill_trainable)
    source = model if isinstance(model, Source) else TorchSource(model)
    if not isinstance(source, TorchSource):
        raise LfgraphError(f"selection {select!r} needs activations, which lfgraph computes from the PyTorch model; ONNX files support --select similarity")
    if mode != "merge":
        raise LfgraphError(f"selection {select!r} picks blocks to remove: use it with --mode merge")
    if target_kind != "blocks":
        raise LfgraphError(f"selection {select!r} takes a fraction of blocks (--target-kind blocks)")
    if calibration is None:
        raise LfgraphError(f"selection {select!r} needs calibration data")
    from .passes.selection import runs_to_plan, select_runs

    # only blocks with an identity skip can be dropped; the target counts all blocks
    blocks = [b.name for b in graph.removable_blocks()]
    if not blocks:
        raise LfgraphError(f"{graph.model_name or 'the model'} has no blocks with an identity skip path: merge cannot remove any")
    n_drop = max(1, round(target * len(graph.blocks)))
    if n_drop > len(blocks) - 1:
        raise LfgraphError(f"target {target} asks to remove {n_drop} of {len(graph.blocks)} blocks but only {len(blocks) - 1} can go: lower the target")
    if select == "sleb" and isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        calibration = calibration[:SLEB_WINDOWS, :SLEB_TOKENS]
    runs = select_runs(select, source.model.module, blocks, calibration, n_drop, progress=progress)
    container = blocks[0].rpartition(".")[0]
    provenance = {
        "lfgraph_version": __version__, "model": graph.model_name, "model_fingerprint": graph.fingerprint(),
        "source": graph.source, "select": select, "target": target, "target_kind": "blocks",
        "blocks_before": len(graph.blocks), "blocks_after": len(graph.blocks) - n_drop, "params_before": graph.total_params,
    }
    plan = runs_to_plan(runs, container, fuse=rule, align=align, provenance=provenance)
    return _finish_plan(plan, graph, fuse, distill_trainable)


@dataclass
class Recipe:
    """The selection and fusion rule a run uses, whether they are the family's defaults, and
    what the user should be told about the choice."""

    select: str
    fuse: str
    is_default: bool
    notes: list[str]

    @property
    def needs_calibration(self) -> bool:
        return self.select in ACTIVATION_SELECTIONS or self.fuse.startswith("calibrated")


def resolve_recipe(source: Source, mode: str, select: str | None, fuse: str | None, target: float, target_kind: str,
                   calibration: CalibrationOptions, metric: str | None = None, scope: str | None = None) -> Recipe:
    """The one place a run's recipe is chosen (``compress``, ``plan`` and ``heal`` ask it):
    the user's ``select``/``fuse`` where given, else the family's measured default for this
    target (:func:`lfgraph.recipes.default_recipe`), the weights-only recipe when there is no
    calibration data; notes say when that fallback happened and when ``metric``/``scope``
    do not apply."""
    has_data = source.has_calibration(calibration)
    d_select, d_fuse = default_recipe(source.family, mode, has_data, target, target_kind, source.architecture)
    recipe = Recipe(select or d_select, fuse or d_fuse, select is None and fuse is None, [])
    if not has_data and recipe.is_default and mode == "merge" and source.kind == "pytorch":
        recipe.notes.append("no calibration data (no tokenizer files, no --calibration-tokens): the weights-only recipe, "
                            f"select {d_select} + fuse {d_fuse}; give calibration data for the activation-based default")
    ignored = [o for o, v in (("--metric", metric), ("--scope", scope)) if v is not None]
    if recipe.select != "similarity" and ignored:
        recipe.notes.append(f"{' and '.join(ignored)} ignored: they apply to --select similarity, not {recipe.select}")
    return recipe


def _finish_plan(plan: FusionPlan, graph: LayerGraph, fusion_rule: str, distill_trainable: str | None = None) -> FusionPlan:
    """Record what a plan's reader needs beyond its fusions: the refit's capacity and
    distillation for ``calibrated-map``/``calibrated-distill``, and the fraction actually removed (targets round to whole blocks
    or layers)."""
    p = plan.provenance
    p.update(refit_provenance(fusion_rule, distill_trainable))
    if plan.mode == "merge" and graph.blocks:
        removed = sum(len(f.absorb) for f in plan.fusions)
        p["achieved"] = round(removed / len(graph.blocks), 4)
        p["achieved_kind"] = "blocks"
    elif graph.total_params:
        p["achieved"] = round(int(p.get("params_saved", 0)) / graph.total_params, 4)
        p["achieved_kind"] = "params"
    return plan


def weight_warnings(graph: LayerGraph) -> list[str]:
    """Say when weights carry no information: every distance is then 0 and any ranking
    falls back to layer order (structure-only test graphs, e.g. the onnx package's light
    models, build every weight from one constant)."""
    uniform = [n.name for n in graph.nodes if n.weight.size and float(np.ptp(n.weight)) == 0.0]
    if uniform and len(uniform) == len(graph.nodes):
        return [f"every weight of {graph.model_name or 'the model'} is one repeated value (a structure-only graph?): "
                "all distances are 0 and the ranking falls back to layer order"]
    if len(uniform) > len(graph.nodes) // 2:
        return [f"{len(uniform)} of {len(graph.nodes)} layers have weights of one repeated value (e.g. {uniform[0]}): their distances say nothing"]
    return []


def rewrite(model: LoadedModel | Source, graph: LayerGraph, plan: FusionPlan, calibration: Any = None, progress: bool = True) -> PassResult:
    """Apply ``plan`` to a copy of the model (the loaded model is not modified)."""
    source = model if isinstance(model, Source) else TorchSource(model)
    plan.check_applies_to(graph.fingerprint())
    return source.rewrite(plan, calibration=calibration, progress=progress)


# ---------------------------------------------------------------------------------------
# checks made before anything heavy


def check_recipe(target: float, mode: str, select: str, fuse: str, target_kind: str) -> None:
    """Refuse impossible option values with one line, before loading anything."""
    if mode not in ("merge", "tie"):
        raise LfgraphError(f"unknown mode {mode!r}: choose merge or tie")
    if select not in SELECTIONS:
        raise LfgraphError(f"unknown selection {select!r}: choose one of {', '.join(SELECTIONS)}")
    if fuse not in FUSION_RULES:
        raise LfgraphError(f"unknown fusion rule {fuse!r}: choose one of {', '.join(FUSION_RULES)}")
    if target_kind not in ("blocks", "params"):
        raise LfgraphError(f"unknown target kind {target_kind!r}: choose blocks or params")
    if not (0.0 < target < 1.0):
        raise LfgraphError(f"target {target} is out of range: give a fraction strictly between 0 and 1 (e.g. 0.25)")


def check_inputs(spec: Any, plan: Any = None, calibration: CalibrationOptions | None = None) -> FusionPlan | None:
    """Every check of the inputs that needs no model: the model path, plan file, calibration
    files. Returns the plan when a plan file was given (parsed, not yet matched to the model)."""
    if isinstance(spec, (str, os.PathLike)):
        check_model_spec(str(spec))
    if calibration is not None:
        if calibration.text_file:
            load_calibration_text(calibration.text_file)  # exists, and is text
        if calibration.token_file and not Path(calibration.token_file).is_file():
            raise LfgraphError(f"token file {calibration.token_file} does not exist: give a .npy or .pt file of token ids")
        check("--calibration-windows", calibration.windows, COUNT)
        check("--calibration-seq-len", calibration.seq_len, SEQ_LEN)
    if plan is None or isinstance(plan, FusionPlan):
        return plan
    return FusionPlan.load(plan)


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
    t0 = time.perf_counter()
    out = Path(out)
    cal_opts = CalibrationOptions(calibration_text, calibration_tokens, calibration_windows, calibration_seq_len)
    notes: list[str] = []
    with stage("options"):
        for name, value, rule in (("--eval-windows", eval_windows, OPTIONAL_COUNT), ("--eval-seq-len", eval_seq_len, SEQ_LEN),
                                  ("--max-quality-loss", max_quality_loss, NON_NEGATIVE), ("--rtol", rtol, POSITIVE),
                                  ("--heal", heal_steps, STEPS)):
            check(name, value, rule)
        given_plan = check_inputs(spec, plan, cal_opts)
        folder_out = out.suffix != ".onnx"
        inputs = [spec if isinstance(spec, (str, os.PathLike)) else None, plan if isinstance(plan, (str, os.PathLike)) else None,
                  calibration_text, calibration_tokens]
        # a checkpoint folder resumed from is an input; otherwise it is an output like -o
        heal_dir = (heal_options or {}).get("checkpoint_dir") if heal_steps and not (heal_options or {}).get("resume") else None
        check_outputs({"-o": out, "the output of a failed check": failed_path(out), "--log": log_path, "--report": report_path,
                       "--heal-checkpoint-dir": heal_dir},
                      inputs, overwrite, folders=(("-o", "the output of a failed check") if folder_out else ()) + ("--heal-checkpoint-dir",))
        if given_plan is None:
            check_recipe(target, mode, select or "similarity", fuse or "remove", target_kind)
            if fuse is not None:
                refit_provenance(fuse, distill_trainable)
        if not onnx and not folder_out:
            raise LfgraphError(f"--no-onnx writes a checkpoint folder: give a folder for -o, not {out.name}")
        if given_plan is not None and distill_trainable is not None:
            raise LfgraphError("--distill-trainable chooses how a new plan distils; a plan from file already records it (provenance.distill_trainable): drop one of them")
    if is_onnx_spec(spec) and _is_decoder_with_past(Path(spec)):
        return compress_onnx_decoder(Path(spec), out, given_plan, target, eval_windows, max_quality_loss, quiet)
    if isinstance(spec, (str, os.PathLike)) and (Path(spec) / "config.json").is_file():
        with stage("estimate"):
            estimate = check_in_memory_fits(spec)
        if estimate is not None:
            _progress(estimate.summary(), quiet)
    _progress("loading the model", quiet)
    with stage("load"):
        source = open_source(spec)
        output = output_for(source, out, onnx=onnx)
    if getattr(output, "why", None):
        notes.append(f"no ONNX in {out.name}: {output.why}; the folder holds the Hugging Face checkpoint, checked by reloading it")
    _progress("building the layer graph" + (" (torch.export)" if source.kind == "pytorch" else ""), quiet)
    with stage("trace"):
        graph = source.graph()
    calibration = None
    notes.extend(weight_warnings(graph))
    for note in notes:
        _progress(f"warning: {note}", quiet)
    with stage("plan"):
        if given_plan is not None:
            plan = given_plan
            plan.check_applies_to(graph.fingerprint())
            recipe = f"plan from file: mode {plan.mode}, fuse {plan.fuse}"
            if plan.fuse == "calibrated":
                calibration = source.calibration(cal_opts)
        else:
            chosen = resolve_recipe(source, mode, select, fuse, target, target_kind, cal_opts, metric, scope)
            notes.extend(chosen.notes)
            chosen_select, chosen_fuse = chosen.select, chosen.fuse
            if chosen.needs_calibration:
                calibration = source.calibration(cal_opts)
            metric, scope = metric or "bures", scope or "adjacent"
            _progress(f"planning: select {chosen_select}, fuse {chosen_fuse}, target {target} of {target_kind}", quiet)
            plan = plan_model(source, graph, target, mode=mode, select=chosen_select, fuse=chosen_fuse, metric=metric,
                              scope=scope, target_kind=target_kind, calibration=calibration, progress=not quiet,
                              distill_trainable=distill_trainable)
            recipe = describe(mode, chosen_select, chosen_fuse, metric, scope, chosen.is_default, source.family)
        achieved = plan.provenance.get("achieved")
        if achieved is not None and given_plan is None and abs(achieved - target) > 1e-6:
            notes.append(f"target {target} of {target_kind} rounds to {achieved:.1%} of {plan.provenance.get('achieved_kind', target_kind)} actually removed")
    _progress(f"rewriting: {len(plan.fusions)} fusions", quiet)
    with stage("rewrite"):
        result = rewrite(source, graph, plan, calibration=calibration, progress=not quiet)
    compressed = result.model
    for r in result.log.records if result.log is not None else []:
        if r.action == "distill" and r.detail.get("kl_start") is not None:
            d = r.detail
            what = "distilled maps" + TRAINED_WITH_THE_MAPS.get(str(d.get("trainable")), "")
            notes.append(f"{what}: KL to the original on held-out calibration windows {d['kl_start']:.4g} -> {d['kl_best']:.4g} "
                         f"(best of {d['steps']} steps at step {d['best_step']}, {d['seconds']:.0f} s"
                         + (f", {d['sampled_windows']} windows sampled from the original added to the training windows)" if d.get("sampled_windows") else ")"))
    metadata = {"lfgraph.version": __version__, "lfgraph.plan": plan.to_json(), "lfgraph.recipe": recipe,
                "lfgraph.source_model": source.name}
    if isinstance(spec, (str, os.PathLike)):  # so that `lfgraph visualize OUT.onnx` finds the original
        metadata["lfgraph.source_spec"] = str(spec) if str(spec) in ALIASES else os.path.abspath(str(spec))
    heal_curve = None
    if heal_steps > 0:
        _progress(f"healing: {heal_steps} steps of distillation from the original", quiet)
        with stage("heal"):
            compressed, heal_curve = source.heal(compressed, plan, cal_opts, heal_steps, dict(heal_options or {}), progress=not quiet)
    with stage("write"), staging_folder(out) as folder:
        staged = output.staged_path(folder)
        _progress(f"writing {out.name}" + (" (deploy folder)" if output.kind == "deploy-folder" else ""), quiet)
        output.write(compressed, staged, metadata, plan)
        _progress("checking what was written on ONNX Runtime", quiet)
        parity = output.check(compressed, staged, rtol)
        original = output.original(quiet)
        size_before, size_after = output.size(original), output.size(staged)
        # the plan and recipe written into the metadata are lfgraph's own few kB, not the model
        added = sum(len(k) + len(v) for k, v in metadata.items())
        if output.larger_is_error and size_after - added > size_before:
            raise LfgraphError(
                f"the compressed file ({size_after / 1e6:.1f} MB) would be larger than the original ({size_before / 1e6:.1f} MB): "
                "nothing was written; its weights are probably built by constant subgraphs the rewrite had to materialise"
            )
        if eval_windows > 0 or source.family not in ("causal-lm", "encoder"):
            _progress("measuring quality against the original", quiet)
        quality = source.quality(compressed, output.model_file(staged), source.verification_feed(), eval_windows, eval_seq_len)
        _progress("timing both models on ONNX Runtime", quiet)
        latency_name, before_ms, after_ms = output.latency(original, staged)
        written = _finish(lambda verdict: output.mark_failed(staged, verdict), out, parity.ok, quality, max_quality_loss,
                          lambda dest: output.finish(staged, dest))
    if log_path:
        write_text_atomic(log_path, result.log.to_json())
    removed = sum(len(f.absorb) for f in plan.fusions) if plan.mode == "merge" else 0
    report = CompressReport(
        model=source.name, source_kind=source.kind, recipe=recipe, plan=plan, out=written,
        blocks=(len(graph.blocks), len(graph.blocks) - removed),
        params=(source.parameter_count(None), source.parameter_count(compressed)),
        file_bytes=(size_before, size_after), latency_ms=(before_ms, after_ms), latency_name=latency_name, size_name=output.size_name,
        parity=parity, quality=quality, max_quality_loss=max_quality_loss, notes=notes, heal_curve=heal_curve,
        seconds=time.perf_counter() - t0, log_records=len(result.log.records), compressed=compressed, graph=graph, log=result.log,
    )
    if report_path:
        with stage("report"):
            write_report_page(report, report_path)
    return report


def _is_decoder_with_past(path: Path) -> bool:
    import onnx

    from .deploy import is_decoder_with_past

    try:
        return is_decoder_with_past(onnx.load(str(path), load_external_data=False))
    except Exception:
        return False  # not readable here: the ONNX source's own checks say why


def compress_onnx_decoder(src: Path, out: Path, plan: FusionPlan | None, target: float, eval_windows: int,
                          max_quality_loss: float | None, quiet: bool) -> CompressReport:
    """A with-past ONNX decoder (lfgraph's, onnxruntime-genai's or Optimum's layout) made
    shallower straight from the graph: whole layers and their cache inputs/outputs removed
    (:mod:`lfgraph.deploy`), then the same checks and report as every compress.

    Export check: the written decoder's greedy tokens on ONNX Runtime equal
    onnxruntime-genai's from the written folder (when it has ``genai_config.json``), and its
    logits are finite. Quality: top-1 agreement of prefill logits with the original decoder
    on held-out text (the folder's tokenizer) or fixed token ids.
    """
    from .deploy import compress_decoder_onnx, plan_decoder_onnx
    from .deploy.generation import OrtDecoder, genai_greedy
    from .evaluate import output_quality
    from .outputs import decode_latency
    from .verify import OutputCheck, VerifyReport

    t0 = time.perf_counter()
    with stage("plan"):
        if plan is None:
            _progress(f"planning: Block Influence measured on the ONNX decoder, target {target} of its layers", quiet)
            plan = plan_decoder_onnx(src, target)
        recipe = f"mode merge, select {plan.provenance.get('select', 'plan from file')}, fuse {plan.fuse} (ONNX decoder with KV cache)"
    with stage("write"), staging_folder(out) as folder:
        staged = folder / out.name
        _progress(f"removing decoder layers and their cache inputs/outputs, writing {out.name}", quiet)
        rep = compress_decoder_onnx(src, staged, plan=plan)
        model_file = staged if staged.suffix == ".onnx" else staged / "model.onnx"
        original = OrtDecoder(src)
        compressed = OrtDecoder(model_file)
        tok = _folder_tokenizer(src.parent)
        if tok is not None:
            from .calibration import heldout_windows

            ids = heldout_windows(tok, 1, 128).numpy()
        else:
            ids = ((np.arange(128) * 7 + 3) % 100)[None, :].astype(np.int64)
        head_dim = _genai_head_dim(src.parent)
        ref, _ = original.prefill(ids, head_dim=head_dim)
        got, _ = compressed.prefill(ids, head_dim=head_dim)
        parity = VerifyReport(provider="ONNX Runtime (CPU)", reference="onnxruntime-genai")
        parity.outputs.append(OutputCheck("logits", 0.0, 0.0, bool(np.isfinite(got).all()), "prefill logits are finite"))
        if model_file.parent.joinpath("genai_config.json").is_file():
            prompt = [int(t) for t in ids[0, :16]]
            ort_tokens = compressed.greedy(prompt, 16, head_dim=head_dim)
            genai_tokens = genai_greedy(model_file.parent, prompt, 16)
            same = genai_tokens[: len(ort_tokens)] == ort_tokens[: len(genai_tokens)]
            parity.outputs.append(OutputCheck("greedy tokens", 0.0, 0.0, same,
                                              f"16 greedy tokens on ORT {'==' if same else '!='} onnxruntime-genai from the written folder"))
        quality = output_quality({"logits": ref}, {"logits": got}, "prefill logits of 128 held-out tokens, original vs compressed decoder on ORT", "onnx-decoder")
        del original, compressed
        _progress("timing both decoders on ONNX Runtime", quiet)
        latency_name, before_ms, after_ms = decode_latency(src, model_file, int(ref.shape[-1]))
        written = _finish(lambda verdict: mark_onnx_failed(model_file, verdict), out, parity.ok, quality, max_quality_loss,
                          lambda dest: _move_into_place(staged, dest))
    n_before, n_after = rep.layers
    return CompressReport(
        model=src.stem, source_kind="onnx decoder", recipe=recipe, plan=plan, out=written, blocks=(n_before, n_after),
        params=(_onnx_params(src), _onnx_params(written if written.suffix == ".onnx" else written / "model.onnx")),
        file_bytes=rep.file_bytes, latency_ms=(before_ms, after_ms), latency_name=latency_name, parity=parity,
        quality=quality, max_quality_loss=max_quality_loss, seconds=time.perf_counter() - t0,
    )


def _folder_tokenizer(folder: Path) -> Any:
    from .models import _tokenizer_or_none

    try:
        return _tokenizer_or_none(folder)
    except LfgraphError:
        return None


def _genai_head_dim(folder: Path) -> int | None:
    import json

    cfg = folder / "genai_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text())["model"]["decoder"].get("head_size")


def _onnx_params(path: Path) -> int:
    """Floating-point initializer elements (each stored tensor once)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type in floats and len(t.dims) > 0))


def write_report_page(report: CompressReport, path: str | Path) -> list[Path]:
    """The visualizer's page (or JSON, by suffix) for a finished compress run."""
    from .visualize import write_report

    curve = None
    if report.heal_curve:
        curve = [(i + 1, float(v)) for i, v in enumerate(report.heal_curve.get("train_loss", []))]
    healed = None
    if report.heal_curve is not None:
        healed = [f.keep for f in report.plan.fusions]
    return write_report(path, report.graph, report.plan, report.log, table=report.rows(), loss_curve=curve,
                        healed=healed, title=f"lfgraph compress {report.model}: {report.recipe}")


def _finish(mark: Any, out: Path, parity_ok: bool, quality: Any, max_quality_loss: float | None, move: Any) -> Path:
    """Put a checked output in place by the one rule for failed checks: when the export check
    or the quality gate failed, the output is marked (``mark(verdict)``: ``lfgraph.check`` in
    its metadata) and goes to ``failed_path(out)``, leaving ``out`` as it was. ``move(dest)``
    moves the staged output to ``dest``. Returns where it went."""
    reasons = [] if parity_ok else ["the file does not compute what the rewritten model computes (export check)"]
    if max_quality_loss is not None and quality is not None and quality.loss > max_quality_loss:
        reasons.append(f"quality loss {quality.loss:.4f} > --max-quality-loss {max_quality_loss}")
    if not reasons:
        move(out)
        return out
    mark("FAILED: " + "; ".join(reasons))
    dest = failed_path(out)
    move(dest)
    return dest


def _move_into_place(staged: Path, dest: Path) -> None:
    """A staged ``.onnx`` file (its ``.data`` first) or folder to ``dest``."""
    if staged.is_dir():
        commit_folder(staged, dest)
        return
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, dest.with_name(dest.name + ".data"))
    os.replace(staged, dest)


# ---------------------------------------------------------------------------------------
# verify and helpers


def verify(onnx_file: str | Path, spec: str | LoadedModel, rtol: float = 1e-4) -> Any:
    """Re-check an lfgraph ONNX file: re-apply the plan in its metadata to ``spec`` (the
    model it was compressed from, PyTorch or ONNX) and compare outputs by name."""
    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise LfgraphError(f"ONNX file {onnx_file} does not exist")
    plan = metadata_plan(onnx_file)
    if plan.fuse == "calibrated":
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
