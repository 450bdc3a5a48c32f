"""The stages of ``compress``, run by one :class:`~lfgraph.passes.manager.StageManager`
over one :class:`CompressState`::

    options → [estimate] → load → trace → plan → rewrite → [heal] → staging → write → verify
      → size → quality → time → finish → [log] → report → [page]

and, for a with-past ONNX decoder (made shallower straight from its graph)::

    options → load (decoder) → plan (decoder) → staging → write (decoder) → verify (decoder)
      → quality (decoder) → time (decoder) → finish → report

:func:`build_stages` chooses the list. The stages both lists share (option checks, the
staging folder, the one rule for failed checks, the report) are the same objects; the
decoder's own are variants with the same names, requirements and guarantees.

Every user error raised in a stage is prefixed with its label (``lfgraph: error: plan: …``);
every stage working on the staged output is ``write`` to the user, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .cache import cache_dir
from .errors import LfgraphError
from .fileio import check_outputs, failed_path, staging_folder, write_text_atomic
from .model_types import CalibrationOptions
from .models import ALIASES
from .options import NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, SEQ_LEN, STEPS, check
from .outputs import OnnxDecoderOutput, output_for
from .passes.manager import Stage
from .passes.map_distillation import TRAINED_WITH_THE_MAPS
from .planning import check_inputs, check_recipe, plan_model, resolve_recipe, rewrite, weight_warnings
from .recipes import describe, refit_provenance
from .registry import fusion_rule
from .report import CompressReport
from .sources import is_onnx_spec, open_source


@dataclass
class CompressState:
    """One compress run: its options (given), then what each stage provides."""

    # -- the options (from compress's arguments)
    spec: Any
    out: Path
    plan_arg: Any = None
    target: float = 0.25
    mode: str = "merge"
    select: str | None = None
    fuse: str | None = None
    metric: str | None = None
    scope: str | None = None
    target_kind: str = "blocks"
    calibration_options: CalibrationOptions = field(default_factory=CalibrationOptions)
    eval_windows: int = 4
    eval_seq_len: int = 512
    max_quality_loss: float | None = None
    log_path: Any = None
    report_path: Any = None
    heal_steps: int = 0
    heal_options: dict[str, Any] | None = None
    rtol: float | None = None
    quiet: bool = False
    distill_trainable: str | None = None
    overwrite: bool = False
    onnx: bool = True
    #: ``auto`` (block by block from the checkpoint when the in-memory estimate does not fit),
    #: ``stream`` or ``in-memory`` (``--stream`` / ``--in-memory``)
    engine: str = "auto"
    device: str = "cpu"
    #: the distilling rules' objective on a checkpoint: ``None`` (the cost rule), ``logit`` or ``blockwise``
    distill_objective: str | None = None
    t0: float = field(default_factory=time.perf_counter)

    # -- provided by the stages
    given_plan: Any = None          # options: a plan from file, parsed
    source: Any = None              # load
    output: Any = None              # load: where and how the result is written
    model_name: str | None = None   # load
    source_kind: str | None = None  # load
    graph: Any = None               # trace
    calibration: Any = None         # plan, when the recipe needs it
    plan: Any = None                # plan
    recipe: str | None = None       # plan: the recipe's line in the report
    blocks: tuple[int, int] | None = None  # plan
    result: Any = None              # rewrite: the PassResult (its log)
    compressed: Any = None          # rewrite (heal replaces it)
    heal_curve: dict[str, Any] | None = None  # heal
    staging: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # stage: removed at finish or on error
    staged: Path | None = None      # stage
    metadata: dict[str, str] | None = None  # write
    parity: Any = None              # verify
    original: Any = None            # size
    file_bytes: tuple[int, int] | None = None  # size
    params: tuple[int, int] | None = None      # size
    quality: Any = None             # quality
    latency: tuple[str, float, float] | None = None  # time: (row name, before ms, after ms)
    written: Path | None = None     # finish: where the output went
    report: CompressReport | None = None  # report
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    blocks_estimate: Any = None     # budget (block by block)
    # the ONNX decoder's
    decoder_logits: tuple[np.ndarray, np.ndarray] | None = None  # verify (decoder): original's and compressed's prefill

    def say(self, msg: str) -> None:
        """A progress line (``lfgraph: …``), unless quiet."""
        if not self.quiet:
            print(f"lfgraph: {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# the stages every compress runs


class CheckOptions(Stage):
    """Every check that needs no model: option ranges, input files, outputs (before loading)."""

    name = "options"

    def run(self, s: CompressState) -> None:
        for name, value, rule in (("--eval-windows", s.eval_windows, OPTIONAL_COUNT), ("--eval-seq-len", s.eval_seq_len, SEQ_LEN),
                                  ("--max-quality-loss", s.max_quality_loss, NON_NEGATIVE), ("--rtol", s.rtol, POSITIVE),
                                  ("--heal", s.heal_steps, STEPS)):
            check(name, value, rule)
        s.given_plan = check_inputs(s.spec, s.plan_arg, s.calibration_options)
        cache_dir()  # the original's export for the comparison is cached: an unusable cache is refused now
        folder_out = s.out.suffix != ".onnx"
        inputs = [s.spec if isinstance(s.spec, (str, os.PathLike)) else None,
                  s.plan_arg if isinstance(s.plan_arg, (str, os.PathLike)) else None,
                  s.calibration_options.text_file, s.calibration_options.token_file]
        heal = s.heal_options or {}
        # a checkpoint folder resumed from is an input; otherwise it is an output like -o
        heal_dir = heal.get("checkpoint_dir") if s.heal_steps and not heal.get("resume") else None
        check_outputs({"-o": s.out, "the output of a failed check": failed_path(s.out), "--log": s.log_path,
                       "--report": s.report_path, "--heal-checkpoint-dir": heal_dir},
                      inputs, s.overwrite, folders=(("-o", "the output of a failed check") if folder_out else ()) + ("--heal-checkpoint-dir",))
        if s.given_plan is None:
            check_recipe(s.target, s.mode, s.select or "similarity", s.fuse or "remove", s.target_kind)
            if s.fuse is not None:
                refit_provenance(s.fuse, s.distill_trainable)
        if not s.onnx and not folder_out:
            raise LfgraphError(f"--no-onnx writes a checkpoint folder: give a folder for -o, not {s.out.name}")
        planning = [f"--{o}" for o, v in (("select", s.select), ("fuse", s.fuse), ("metric", s.metric), ("scope", s.scope))
                    if v is not None]
        if s.given_plan is not None and planning:
            raise LfgraphError(f"{', '.join(planning)} {'chooses' if len(planning) == 1 else 'choose'} how a new plan is made; "
                               "the plan from file already says which blocks fuse and how: drop "
                               f"{'it' if len(planning) == 1 else 'them'}, or make a new plan with `lfgraph plan`")
        if s.given_plan is not None and s.distill_trainable is not None:
            raise LfgraphError("--distill-trainable chooses how a new plan distils; a plan from file already records it "
                               "(provenance.distill_trainable): drop one of them")


class Staging(Stage):
    """Open the staging folder beside ``out``; it is removed when :class:`Finish` ran or the
    run failed, whatever happened."""

    name = "staging"
    label = "write"
    requires = ("output",)
    provides = ("staged",)

    def run(self, s: CompressState) -> None:
        folder = s.staging.enter_context(staging_folder(s.out))
        s.staged = s.output.staged_path(folder)


class Finish(Stage):
    """Put the checked output in place by the one rule for failed checks: when the export
    check or the quality gate failed, the output is marked (``lfgraph.check`` in its
    metadata) and goes to :func:`~lfgraph.fileio.failed_path`, leaving ``out`` as it was.
    Then the staging folder goes."""

    name = "finish"
    label = "write"
    requires = ("output", "staged", "parity")
    provides = ("written",)

    def run(self, s: CompressState) -> None:
        reasons = [] if s.parity.ok else ["the file does not compute what the rewritten model computes (export check)"]
        if s.max_quality_loss is not None and s.quality is not None and s.quality.loss > s.max_quality_loss:
            reasons.append(f"quality loss {s.quality.loss:.4f} > --max-quality-loss {s.max_quality_loss}")
        dest = s.out
        if reasons:
            s.output.mark_failed(s.staged, "FAILED: " + "; ".join(reasons))
            dest = failed_path(s.out)
        s.output.finish(s.staged, dest)
        s.written = dest
        s.staging.close()


class Report(Stage):
    """The one report (:class:`~lfgraph.report.CompressReport`) of every compress."""

    name = "report"
    requires = ("model_name", "source_kind", "recipe", "plan", "written", "blocks", "params", "file_bytes", "latency", "parity")
    provides = ("report",)

    def run(self, s: CompressState) -> None:
        latency_name, before_ms, after_ms = s.latency
        log = s.result.log if s.result is not None else None
        s.report = CompressReport(
            model=s.model_name, source_kind=s.source_kind, recipe=s.recipe, plan=s.plan, out=s.written, blocks=s.blocks,
            params=s.params, file_bytes=s.file_bytes, latency_ms=(before_ms, after_ms), latency_name=latency_name,
            size_name=s.output.size_name, parity=s.parity, quality=s.quality, max_quality_loss=s.max_quality_loss,
            notes=s.notes, heal_curve=s.heal_curve, seconds=time.perf_counter() - s.t0,
            log_records=len(log.records) if log is not None else 0, compressed=s.compressed, graph=s.graph, log=log,
            stage_seconds=s.stage_seconds, estimate=s.blocks_estimate,
        )


# ---------------------------------------------------------------------------------------
# a model (PyTorch, Hugging Face, GGUF) or an .onnx file, through a Source


def check_device(name: str) -> None:
    """Refuse a ``--device`` torch cannot use here, before the work."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LfgraphError(f"--device {name!r} is not a torch device: use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LfgraphError(f"--device {name}: no CUDA device is available to this process; leave it out to run on the CPU")
    if device.type not in ("cpu", "cuda"):
        raise LfgraphError(f"--device {name}: blocks are onloaded to cpu or cuda only")


def fusion_rule_distills(name: str) -> bool:
    from .registry import FUSION_RULE_REGISTRY

    rule = FUSION_RULE_REGISTRY.get(name)
    return bool(rule is not None and rule.distill)


class Estimate(Stage):
    """Choose the engine before anything is loaded: the model held in memory, or its blocks
    onloaded one at a time from the checkpoint (:func:`lfgraph.estimate.choose_engine`), and
    refuse a run that cannot fit, naming the option that would."""

    name = "estimate"

    def run(self, s: CompressState) -> None:
        from .estimate import choose_engine

        choice = choose_engine(s.spec, s.engine)
        engine = choice.engine if choice is not None else "in-memory"
        # the options only the block path uses are refused on the other, never ignored
        if engine != "stream":
            if s.distill_objective == "blockwise":
                raise LfgraphError("--distill-objective blockwise trains block by block from a checkpoint folder; held in memory the "
                                   "distilling rules train on the logits: leave it out, or add --stream for a checkpoint folder")
            if s.device != "cpu":
                raise LfgraphError(f"--device {s.device} onloads blocks from a checkpoint folder one at a time; the in-memory path runs "
                                   "on the CPU: leave it out, or add --stream for a checkpoint folder")
        if s.device != "cpu":
            check_device(s.device)
        if s.distill_objective is not None and s.fuse is not None and not fusion_rule_distills(s.fuse):
            raise LfgraphError(f"--distill-objective is how the distilling fusion rules train; --fuse {s.fuse} does not distil: leave it out")
        if choice is None:
            return
        s.engine = choice.engine
        s.say(choice.summary())
        if choice.engine == "stream":
            for option, given, why in (("--heal", s.heal_steps, "healing trains the whole model in memory; the distilling fusion rules train block by block"),
                                       ("--mode tie", s.mode == "tie", "tie shares one weight between layers, which a Hugging Face checkpoint cannot store")):
                if given:
                    raise LfgraphError(f"{option} is not available block by block: {why}"
                                       + ("; force the in-memory path with --in-memory where the model fits" if choice.fits_in_memory is not False else ""))
            if s.out.suffix == ".onnx":
                raise LfgraphError("a checkpoint compressed block by block is written as a folder (the checkpoint, and model.onnx when it fits), "
                                   "not a lone .onnx file: give a folder for -o")


class Load(Stage):
    name = "load"
    provides = ("source", "output", "model_name", "source_kind")

    def message(self, s: CompressState) -> str:
        return "loading the model"

    def run(self, s: CompressState) -> None:
        if s.engine == "stream":
            from .models import checkpoint_folder
            from .sources import CheckpointSource

            s.source = CheckpointSource(checkpoint_folder(s.spec), device=s.device, objective=s.distill_objective)
        else:
            s.source = open_source(s.spec)
        s.output = output_for(s.source, s.out, onnx=s.onnx, progress=not s.quiet)
        s.output.check_destination()
        s.model_name, s.source_kind = s.source.name, s.source.kind
        if getattr(s.output, "why", None):
            s.notes.append(f"no ONNX in {s.out.name}: {s.output.why}; the folder holds the Hugging Face checkpoint, checked by reloading it")


class Trace(Stage):
    name = "trace"
    requires = ("source",)
    provides = ("graph",)

    def message(self, s: CompressState) -> str:
        return "building the layer graph" + (" (torch.export)" if s.source.kind == "pytorch" else "")

    def run(self, s: CompressState) -> None:
        s.graph = s.source.graph()
        s.notes.extend(weight_warnings(s.graph))
        for note in s.notes:
            s.say(f"warning: {note}")


def _plan_recipe(plan: Any) -> tuple[str, str, int]:
    """(selection, fusion rule in the CLI's words, blocks removed) of a plan."""
    select, fuse = plan.provenance.get("select", "similarity"), plan.fuse
    if fuse == "calibrated" and plan.provenance.get("distill_steps"):
        fuse = "calibrated-map-distill" if plan.provenance.get("refit") == "map" else "calibrated-distill"
    return select, fuse, sum(len(f.absorb) for f in plan.fusions)


def _blocks_estimate(s: CompressState, select: str, fuse: str, n_drop: int, plan: Any = None) -> Any:
    """The block-by-block estimate of this run, printed and refused when it cannot fit;
    with ``plan``, for its runs and the blocks the block-wise objective will train."""
    from .estimate import blocks_estimate, check_blocks_fit
    from .registry import fusion_rule

    source = s.source
    if select not in ("similarity", "block_influence", "angular", "sleb"):
        select = "block_influence"
    objective = None
    if fusion_rule(fuse).distill:
        objective = s.distill_objective or ("logit" if source.distill_objective_fits() else "blockwise")
        if objective == "blockwise" and s.distill_trainable == "blocks":
            why = "asked for by --distill-objective" if s.distill_objective else "chosen because the two models do not fit in memory together"
            raise LfgraphError(f"--distill-trainable blocks trains every block above a cut through the logits; the block-wise objective "
                               f"({why}) trains each run's kept block and the block after it: give --distill-trainable neighbors "
                               "(or maps), or --distill-objective logit where both models fit in memory")
    runs = trained = None
    if plan is not None:
        from .passes.blockwise_distillation import BlockwiseSettings

        index = {source.blocks.block_name(i): i for i in range(source.blocks.num_blocks)}
        ends = [max(index[n] for n in (f.keep, *f.absorb)) for f in plan.fusions]
        runs = len(plan.fusions)
        neighbors = BlockwiseSettings().trainable == "neighbors"
        trained = runs + (sum(1 for e in ends if e + 1 < source.blocks.num_blocks) if neighbors else 0)
    opts = s.calibration_options
    est = blocks_estimate(source.blocks, n_drop=n_drop, select=select, fuse=fuse, objective=objective, windows=opts.windows,
                          seq_len=opts.seq_len, eval_windows=s.eval_windows, eval_seq_len=s.eval_seq_len, onnx=s.onnx,
                          completions=s.eval_windows > 0 and source.distill_objective_fits(), runs=runs, trained=trained)
    check_blocks_fit(est, windows=opts.windows, seq_len=opts.seq_len, fuse=fuse)
    return est


class Budget(Stage):
    """Block by block: the estimate of peak memory and time for the recipe the plan stage
    will use (the selection's worst case: Block Influence may pick a run a block), printed,
    and a run that cannot fit refused naming the option that would make it fit (before any
    block but the first is read)."""

    name = "budget"
    label = "estimate"
    requires = ("source", "graph")

    def run(self, s: CompressState) -> None:
        from .sources import CheckpointSource

        source = s.source
        if not isinstance(source, CheckpointSource):
            return
        if s.given_plan is not None:
            s.blocks_estimate = _blocks_estimate(s, *_plan_recipe(s.given_plan), plan=s.given_plan)
        else:
            chosen = resolve_recipe(source, s.mode, s.select, s.fuse, s.target, s.target_kind, s.calibration_options, s.metric, s.scope)
            s.blocks_estimate = _blocks_estimate(s, chosen.select, chosen.fuse, max(1, round(s.target * source.blocks.num_blocks)))
        s.say(s.blocks_estimate.summary())
        if s.onnx:  # what ONNX Runtime cannot run is known from the config: said now, not found after the work
            from .deploy.genai_builder import builder_refusal, has_tokenizer

            refusal = builder_refusal(source.blocks.ckpt.config, has_tokenizer(source.blocks.ckpt.folder))
            if refusal:
                s.say(f"no ONNX will be written: {refusal}; the checkpoint only (--no-onnx says so up front)")


class PlanBudget(Stage):
    """Block by block, once the selection has made the plan: the estimate again for its
    runs (fewer than the worst case when the removed blocks are contiguous), printed, and
    refused when it cannot fit, before the refit and the distillation."""

    name = "plan budget"
    label = "estimate"
    requires = ("source", "plan")

    def run(self, s: CompressState) -> None:
        from .sources import CheckpointSource

        if not isinstance(s.source, CheckpointSource) or s.given_plan is not None:
            return
        before = s.blocks_estimate
        s.blocks_estimate = _blocks_estimate(s, *_plan_recipe(s.plan), plan=s.plan)
        if before is None or abs(s.blocks_estimate.peak_bytes - before.peak_bytes) > 0.02 * before.peak_bytes:
            s.say(f"for this plan: {s.blocks_estimate.summary()}")


class Plan(Stage):
    """The plan from file (matched to the model), or one made by the resolved recipe."""

    name = "plan"
    requires = ("source", "graph")
    provides = ("plan", "recipe", "blocks")

    def run(self, s: CompressState) -> None:
        source, graph, opts = s.source, s.graph, s.calibration_options
        if s.given_plan is not None:
            plan = s.plan = s.given_plan
            plan.check_applies_to(graph.fingerprint())
            s.recipe = f"plan from file: mode {plan.mode}, fuse {plan.fuse}"
            if fusion_rule(plan.fuse).needs_calibration:
                s.calibration = source.calibration(opts)
        else:
            chosen = resolve_recipe(source, s.mode, s.select, s.fuse, s.target, s.target_kind, opts, s.metric, s.scope)
            s.notes.extend(chosen.notes)
            if chosen.needs_calibration:
                s.calibration = source.calibration(opts)
            metric, scope = s.metric or "bures", s.scope or "adjacent"
            s.say(f"planning: select {chosen.select}, fuse {chosen.fuse}, target {s.target} of {s.target_kind}")
            plan = s.plan = plan_model(source, graph, s.target, mode=s.mode, select=chosen.select, fuse=chosen.fuse, metric=metric,
                                       scope=scope, target_kind=s.target_kind, calibration=s.calibration, progress=not s.quiet,
                                       distill_trainable=s.distill_trainable)
            s.recipe = describe(s.mode, chosen.select, chosen.fuse, metric, scope, chosen.is_default, source.family)
        achieved = plan.provenance.get("achieved")
        if achieved is not None and s.given_plan is None and abs(achieved - s.target) > 1e-6:
            s.notes.append(f"target {s.target} of {s.target_kind} rounds to {achieved:.1%} of "
                           f"{plan.provenance.get('achieved_kind', s.target_kind)} actually removed")
        removed = sum(len(f.absorb) for f in plan.fusions) if plan.mode == "merge" else 0
        s.blocks = (len(graph.blocks), len(graph.blocks) - removed)


class Rewrite(Stage):
    name = "rewrite"
    requires = ("source", "graph", "plan")
    provides = ("result", "compressed")

    def message(self, s: CompressState) -> str:
        return f"rewriting: {len(s.plan.fusions)} fusions"

    def run(self, s: CompressState) -> None:
        s.result = rewrite(s.source, s.graph, s.plan, calibration=s.calibration, progress=not s.quiet)
        s.compressed = s.result.model
        s.notes.extend(getattr(s.source, "notes", []))
        for r in s.result.log.records if s.result.log is not None else []:
            if r.action == "distill" and r.detail.get("objective") == "blockwise":
                d = r.detail
                gains = ", ".join(f"{b} {a:.3g} -> {z:.3g}" for b, a, z in zip(d["blocks"], d["heldout_start"], d["heldout_best"]))
                s.notes.append(f"block-wise distillation ({d['trainable']}, {d['steps']} steps a block, {d['seconds']:.0f} s): relative "
                               f"hidden-state error on held-out calibration windows, closed form -> trained: {gains}")
            if r.action == "distill" and r.detail.get("kl_start") is not None:
                d = r.detail
                what = "distilled maps" + TRAINED_WITH_THE_MAPS.get(str(d.get("trainable")), "")
                s.notes.append(f"{what}: KL to the original on held-out calibration windows {d['kl_start']:.4g} -> {d['kl_best']:.4g} "
                               f"(best of {d['steps']} steps at step {d['best_step']}, {d['seconds']:.0f} s"
                               + (f", {d['sampled_windows']} windows sampled from the original added to the training windows)"
                                  if d.get("sampled_windows") else ")"))


class Heal(Stage):
    """Fine-tune the rewritten model by distillation from the original (``--heal N``)."""

    name = "heal"
    requires = ("source", "compressed", "plan")
    provides = ("compressed",)

    def message(self, s: CompressState) -> str:
        return f"healing: {s.heal_steps} steps of distillation from the original"

    def run(self, s: CompressState) -> None:
        s.compressed, s.heal_curve = s.source.heal(s.compressed, s.plan, s.calibration_options, s.heal_steps,
                                                   dict(s.heal_options or {}), progress=not s.quiet)


class Write(Stage):
    name = "write"
    requires = ("source", "output", "compressed", "plan", "recipe", "staged")
    provides = ("metadata",)

    def message(self, s: CompressState) -> str:
        return f"writing {s.out.name}" + (" (deploy folder)" if s.output.kind == "deploy-folder" else "")

    def run(self, s: CompressState) -> None:
        s.metadata = {"lfgraph.version": __version__, "lfgraph.plan": s.plan.to_json(), "lfgraph.recipe": s.recipe,
                      "lfgraph.source_model": s.source.name}
        if isinstance(s.spec, (str, os.PathLike)):  # so that `lfgraph visualize OUT.onnx` finds the original
            s.metadata["lfgraph.source_spec"] = str(s.spec) if str(s.spec) in ALIASES else os.path.abspath(str(s.spec))
        s.output.write(s.compressed, s.staged, s.metadata, s.plan)
        if getattr(s.output, "kind", "") == "checkpoint-folder" and getattr(s.output, "why", "") and hasattr(s.output, "onnx_wanted"):
            s.notes.append(f"no ONNX: {s.output.why}")


class Verify(Stage):
    """The export check: the written output computes what the rewritten model computes."""

    name = "verify"
    label = "write"
    requires = ("output", "compressed", "staged")
    provides = ("parity",)

    def message(self, s: CompressState) -> str:
        return "checking what was written on ONNX Runtime"

    def run(self, s: CompressState) -> None:
        s.parity = s.output.check(s.compressed, s.staged, s.rtol)


class Size(Stage):
    """The original to compare against, both sizes and parameter counts; a compressed file
    larger than the original is refused."""

    name = "size"
    label = "write"
    requires = ("source", "output", "compressed", "staged", "metadata")
    provides = ("original", "file_bytes", "params")

    def run(self, s: CompressState) -> None:
        s.original = s.output.original(s.quiet)
        size_before, size_after = s.output.size(s.original), s.output.size(s.staged)
        # the plan and recipe written into the metadata are lfgraph's own few kB, not the model
        added = sum(len(k) + len(v) for k, v in s.metadata.items())
        if s.output.larger_is_error and size_after - added > size_before:
            raise LfgraphError(
                f"the compressed file ({size_after / 1e6:.1f} MB) would be larger than the original ({size_before / 1e6:.1f} MB): "
                "nothing was written; its weights are probably built by constant subgraphs the rewrite had to materialise"
            )
        s.file_bytes = (size_before, size_after)
        s.params = (s.source.parameter_count(None), s.source.parameter_count(s.compressed))


class Quality(Stage):
    """The compressed model against the original (the source's measure)."""

    name = "quality"
    label = "write"
    requires = ("source", "output", "compressed", "staged")

    def message(self, s: CompressState) -> str | None:
        if s.eval_windows > 0 or s.source.family not in ("causal-lm", "encoder"):
            return "measuring quality against the original"
        return None

    def run(self, s: CompressState) -> None:
        notes = getattr(s.source, "notes", [])
        seen = len(notes)
        s.quality = s.source.quality(s.compressed, s.output.model_file(s.staged), s.source.verification_feed(),
                                     s.eval_windows, s.eval_seq_len)
        s.notes.extend(notes[seen:])  # what the measure could not do (block by block: completions that do not fit)


class Time(Stage):
    name = "time"
    label = "write"
    requires = ("output", "original", "staged")
    provides = ("latency",)

    def message(self, s: CompressState) -> str:
        return "timing both models on ONNX Runtime"

    def run(self, s: CompressState) -> None:
        s.latency = s.output.latency(s.original, s.staged)


class WriteLog(Stage):
    """The rewrite log (``--log``), for the visualizer."""

    name = "log"
    label = ""  # as before: a failure here names no stage
    requires = ("result",)

    def run(self, s: CompressState) -> None:
        write_text_atomic(s.log_path, s.result.log.to_json())


class Page(Stage):
    """The visualizer's page of the run (``--report``)."""

    name = "page"
    label = "report"
    requires = ("report",)

    def run(self, s: CompressState) -> None:
        write_report_page(s.report, s.report_path)


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


# ---------------------------------------------------------------------------------------
# a with-past ONNX decoder: whole layers and their cache inputs/outputs removed
# (:mod:`lfgraph.deploy`). Export check: the written decoder's greedy tokens on ONNX Runtime
# equal onnxruntime-genai's from the written folder (when it has ``genai_config.json``), and
# its logits are finite. Quality: top-1 agreement of prefill logits with the original
# decoder on held-out text (the folder's tokenizer) or fixed token ids.


class LoadDecoder(Stage):
    name = "load"
    provides = ("output", "model_name", "source_kind")

    def run(self, s: CompressState) -> None:
        src = Path(s.spec)
        s.output = OnnxDecoderOutput(src, s.out)
        s.model_name, s.source_kind = src.stem, "onnx decoder"


class PlanDecoder(Stage):
    """The plan from file, or Block Influence measured on the ONNX decoder."""

    name = "plan"
    requires = ("output",)
    provides = ("plan", "recipe")

    def message(self, s: CompressState) -> str | None:
        if s.given_plan is None:
            return f"planning: Block Influence measured on the ONNX decoder, target {s.target} of its layers"
        return None

    def run(self, s: CompressState) -> None:
        from .deploy import plan_decoder_onnx

        s.plan = s.given_plan if s.given_plan is not None else plan_decoder_onnx(s.output.src, s.target)
        s.recipe = f"mode merge, select {s.plan.provenance.get('select', 'plan from file')}, fuse {s.plan.fuse} (ONNX decoder with KV cache)"


class WriteDecoder(Stage):
    name = "write"
    requires = ("output", "plan", "staged")
    provides = ("blocks", "file_bytes", "params")

    def message(self, s: CompressState) -> str:
        return f"removing decoder layers and their cache inputs/outputs, writing {s.out.name}"

    def run(self, s: CompressState) -> None:
        from .deploy import compress_decoder_onnx

        rep = compress_decoder_onnx(s.output.src, s.staged, plan=s.plan)
        s.blocks, s.file_bytes = rep.layers, rep.file_bytes
        s.params = (onnx_params(s.output.src), onnx_params(s.output.model_file(s.staged)))


class VerifyDecoder(Stage):
    name = "verify"
    label = "write"
    requires = ("output", "staged")
    provides = ("parity", "decoder_logits")

    def run(self, s: CompressState) -> None:
        from .deploy.generation import OrtDecoder, genai_greedy
        from .verify import OutputCheck, VerifyReport

        src, model_file = s.output.src, s.output.model_file(s.staged)
        original, compressed = OrtDecoder(src), OrtDecoder(model_file)
        tok = folder_tokenizer(src.parent)
        if tok is not None:
            from .calibration import heldout_windows

            ids = heldout_windows(tok, 1, 128).numpy()
        else:
            ids = ((np.arange(128) * 7 + 3) % 100)[None, :].astype(np.int64)
        head_dim = genai_head_dim(src.parent)
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
        s.parity, s.decoder_logits = parity, (ref, got)


class QualityDecoder(Stage):
    name = "quality"
    label = "write"
    requires = ("decoder_logits",)

    def run(self, s: CompressState) -> None:
        from .evaluate import output_quality

        ref, got = s.decoder_logits
        s.quality = output_quality({"logits": ref}, {"logits": got},
                                   "prefill logits of 128 held-out tokens, original vs compressed decoder on ORT", "onnx-decoder")


class TimeDecoder(Stage):
    name = "time"
    label = "write"
    requires = ("output", "staged", "decoder_logits")
    provides = ("latency",)

    def message(self, s: CompressState) -> str:
        return "timing both decoders on ONNX Runtime"

    def run(self, s: CompressState) -> None:
        from .outputs import decode_latency

        s.latency = decode_latency(s.output.src, s.output.model_file(s.staged), int(s.decoder_logits[0].shape[-1]))


def is_decoder_with_past(spec: Any) -> bool:
    """``spec`` is an ``.onnx`` decoder with a KV cache (lfgraph's, onnxruntime-genai's or
    Optimum's layout)."""
    if not is_onnx_spec(spec):
        return False
    import onnx

    from .deploy import is_decoder_with_past as with_past

    try:
        return with_past(onnx.load(str(spec), load_external_data=False))
    except Exception:
        return False  # not readable here: the ONNX source's own checks say why


def folder_tokenizer(folder: Path) -> Any:
    from .models import _tokenizer_or_none

    try:
        return _tokenizer_or_none(folder)
    except LfgraphError:
        return None


def genai_head_dim(folder: Path) -> int | None:
    cfg = folder / "genai_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text())["model"]["decoder"].get("head_size")


def onnx_params(path: Path) -> int:
    """Floating-point initializer elements (each stored tensor once)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type in floats and len(t.dims) > 0))


# ---------------------------------------------------------------------------------------
# the lists


def build_stages(s: CompressState, decoder: bool | None = None) -> list[Stage]:
    """The stages of this run, in order: the ONNX decoder's list for a with-past ``.onnx``
    decoder (``decoder``: decided from ``s.spec`` when ``None``), else the Source's, with
    the optional stages (estimate, heal, log, page) where their options ask for them."""
    if decoder is None:
        decoder = is_decoder_with_past(s.spec)
    if decoder:
        return [CheckOptions(), LoadDecoder(), PlanDecoder(), Staging(), WriteDecoder(), VerifyDecoder(), QualityDecoder(),
                TimeDecoder(), Finish(), Report()]
    stages: list[Stage] = [CheckOptions()]
    path = isinstance(s.spec, (str, os.PathLike)) and not is_onnx_spec(s.spec)
    if path:
        stages.append(Estimate())
    stages += [Load(), Trace()]
    if path and s.engine != "in-memory" and (str(s.spec) in ALIASES or (Path(s.spec) / "config.json").is_file()):
        stages.append(Budget())  # the engine may read its blocks one at a time
    stages.append(Plan())
    if path and s.engine != "in-memory":
        stages.append(PlanBudget())
    stages.append(Rewrite())
    if isinstance(s.heal_steps, (int, float)) and s.heal_steps > 0:
        stages.append(Heal())
    stages += [Staging(), Write(), Verify(), Size(), Quality(), Time(), Finish()]
    if s.log_path:
        stages.append(WriteLog())
    stages.append(Report())
    if s.report_path:
        stages.append(Page())
    return stages
