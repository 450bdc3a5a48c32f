"""The Python API behind the CLI: analyze → plan → rewrite → export → verify.

Each function takes a model *spec* (an alias such as ``smollm2``, a Hugging Face folder, a
``.gguf`` file, or an ``.onnx`` file) or an already loaded :class:`~lfgraph.models.LoadedModel`,
so that scripts and the CLI share one code path::

    from lfgraph import pipeline
    report = pipeline.compress("smollm2", "out/smollm2-lf.onnx", target=0.25, mode="merge")
    print(report.table())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import LfgraphError
from .export import ExportReport, VerifyReport, alternating_latency, export_onnx, verify_onnx
from .fileio import write_text_atomic
from .frontends.torch_fx import build_layer_graph
from .graph import LayerGraph
from .models import LoadedModel, cache_dir, load_model
from .passes.analysis import Analysis, analyze
from .passes.base import PassResult
from .passes.planner import make_plan
from .passes.rewrite_torch import apply_plan, unique_parameter_count
from .plan import FusionPlan
from .report import before_after_table, ratio, size_rows

#: Selection criteria beside the weight-similarity planner (``similarity``).
SELECTIONS = ("similarity", "block_influence", "angular", "sleb")
#: SLEB's calibration budget (windows, tokens each) for language models.
SLEB_WINDOWS, SLEB_TOKENS = 2, 64
#: Fusion rules as the CLI names them (``aligned-mean`` is ``mean`` with neuron alignment).
FUSIONS = ("remove", "mean", "aligned-mean", "calibrated")
#: The default (selection, fusion) per model family, from the measurements in README
#: ("Which layers to fuse, and how"): causal LMs and the ResNet-style CNN do best with Block
#: Influence selection and the calibrated refit. BERT-style encoders are post-LayerNorm,
#: which the refit refuses, so they get ShortGPT-style deletion (not measured against the
#: alternatives). Without calibration data only weight similarity can select, and deleting
#: the selected blocks beat averaging them on both measured models.
DEFAULT_RECIPES = {
    "causal-lm": ("block_influence", "calibrated"),
    "encoder": ("block_influence", "remove"),
    "vision": ("block_influence", "calibrated"),
    "generic": ("similarity", "remove"),
}


def default_recipe(model: LoadedModel, mode: str) -> tuple[str, str]:
    """(selection, fusion) used when the user names neither."""
    if mode == "tie":
        return "similarity", "mean"  # tying shares the mean weight by definition
    recipe = DEFAULT_RECIPES.get(model.family, DEFAULT_RECIPES["generic"])
    has_data = model.family in ("causal-lm", "encoder") or model.calibration is not None
    return recipe if has_data else DEFAULT_RECIPES["generic"]


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"lfgraph: {msg}", flush=True)


def load(spec: str | LoadedModel) -> LoadedModel:
    """A loaded model from a spec (or the given one unchanged)."""
    return spec if isinstance(spec, LoadedModel) else load_model(spec)


def trace(model: LoadedModel) -> LayerGraph:
    """The model's LayerGraph (torch.export)."""
    g = build_layer_graph(model.module, model.example_inputs, model_name=model.name)
    return g


def analyze_model(spec: str | LoadedModel, metric: str = "bures", progress: bool = True) -> tuple[LoadedModel, LayerGraph, Analysis]:
    model = load(spec)
    graph = trace(model)
    return model, graph, analyze(graph, metric, progress=progress)


def calibration_tokens(model: LoadedModel, n_windows: int = 16, seq_len: int = 256, text_file: str | None = None) -> torch.Tensor:
    """Calibration windows for a language model (a part of the bundled corpus kept apart
    from evaluation, or the user's text file)."""
    from .calibration import calibration_windows, load_calibration_text

    if model.tokenizer is None:
        raise LfgraphError(f"{model.name} has no tokenizer: calibration text needs a language model")
    text = load_calibration_text(text_file) if text_file else None
    return calibration_windows(model.tokenizer, n_windows, seq_len, text=text)


def plan_model(
    model: LoadedModel,
    graph: LayerGraph,
    target: float,
    mode: str = "merge",
    select: str = "similarity",
    fuse: str = "aligned-mean",
    metric: str = "bures",
    scope: str = "adjacent",
    target_kind: str = "blocks",
    calibration: torch.Tensor | None = None,
    analysis: Analysis | None = None,
    progress: bool = True,
) -> FusionPlan:
    """A FusionPlan by weight similarity (``select="similarity"``) or by an activation-based
    selection criterion (Block Influence, Gromov angular distance, SLEB)."""
    if select not in SELECTIONS:
        raise LfgraphError(f"unknown selection {select!r}: choose one of {', '.join(SELECTIONS)}")
    if fuse not in FUSIONS:
        raise LfgraphError(f"unknown fusion {fuse!r}: choose one of {', '.join(FUSIONS)}")
    rule, align = ("mean", True) if fuse == "aligned-mean" else (fuse, False)
    if select == "similarity":
        plan = make_plan(graph, metric=metric, target=target, target_kind=target_kind, scope=scope, mode=mode,
                         fuse=rule, align=align, analysis=analysis, progress=progress)
        plan.provenance["select"] = "similarity"
        return plan
    if mode != "merge":
        raise LfgraphError(f"selection {select!r} picks blocks to remove: use it with --mode merge")
    if target_kind != "blocks":
        raise LfgraphError(f"selection {select!r} takes a fraction of blocks (--target-kind blocks)")
    from .passes.selection import runs_to_plan, select_runs

    if not (0.0 < target < 1.0):
        raise LfgraphError(f"target {target} is out of range: give a fraction strictly between 0 and 1 (e.g. 0.25)")
    if calibration is None:
        raise LfgraphError(f"selection {select!r} needs calibration data")
    # only blocks with an identity skip can be dropped; the target counts all blocks
    blocks = [b.name for b in graph.removable_blocks()]
    if not blocks:
        raise LfgraphError(f"{graph.model_name or 'the model'} has no blocks with an identity skip path: merge cannot remove any")
    n_drop = max(1, round(target * len(graph.blocks)))
    if n_drop > len(blocks) - 1:
        raise LfgraphError(f"target {target} asks to remove {n_drop} of {len(graph.blocks)} blocks but only {len(blocks) - 1} can go: lower the target")
    if select == "sleb" and isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        # SLEB scores every remaining block at every step (layers² forward passes): on CPU
        # it gets the budget that took 80-380 s in tools/bench_depth.py
        calibration = calibration[:SLEB_WINDOWS, :SLEB_TOKENS]
    runs = select_runs(select, model.module, blocks, calibration, n_drop, progress=progress)
    container = blocks[0].rpartition(".")[0]
    provenance = {
        "lfgraph_version": __version__, "model": graph.model_name, "model_fingerprint": graph.fingerprint(),
        "source": graph.source, "select": select, "target": target, "target_kind": "blocks",
        "blocks_before": len(graph.blocks), "blocks_after": len(graph.blocks) - n_drop, "params_before": graph.total_params,
    }
    return runs_to_plan(runs, container, fuse=rule, align=align, provenance=provenance)


def rewrite(model: LoadedModel, graph: LayerGraph, plan: FusionPlan, calibration: torch.Tensor | None = None, progress: bool = True) -> PassResult:
    """Apply ``plan`` to a copy of the model (the loaded model is not modified)."""
    return apply_plan(model.module, graph, plan, calibration=calibration, progress=progress)


def export_inputs(model: LoadedModel) -> tuple[tuple[torch.Tensor, ...], list[str], dict[str, dict[int, str]]]:
    """Example inputs, input names and dynamic axes used for export."""
    if model.family in ("causal-lm", "encoder"):
        ids = model.example_inputs[0]
        mask = torch.ones_like(ids)
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        return (ids, mask), ["input_ids", "attention_mask"], axes
    names = list(model.input_names)[: len(model.example_inputs)]
    return tuple(model.example_inputs), names, {n: {0: "batch"} for n in names}


def verification_inputs(model: LoadedModel, names: list[str]) -> dict[str, torch.Tensor]:
    """Real inputs of another shape than the export example: two sequences of different
    length (one padded) for language models, a new batch size for others."""
    if model.family in ("causal-lm", "encoder"):
        tok = model.tokenizer
        texts = ["The quick brown fox jumps over the lazy dog near the river bank.",
                 "Layer fusion merges similar layers of a trained network into one, so the model gets shallower and faster."]
        enc = tok(texts, return_tensors="pt", padding=True) if tok.pad_token else None
        if enc is None:
            tok.pad_token = tok.eos_token
            enc = tok(texts, return_tensors="pt", padding=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    x = model.example_inputs[0]
    g = torch.Generator().manual_seed(0)
    return {names[0]: torch.randn((3, *x.shape[1:]), generator=g, dtype=x.dtype)}


def latency_inputs(model: LoadedModel, names: list[str]) -> dict[str, "np.ndarray"]:
    """A fixed input for timing: one sequence of 128 tokens for language models, else the
    verification batch."""
    if model.family in ("causal-lm", "encoder"):
        vocab = min(len(model.tokenizer), 1000) if model.tokenizer is not None else 100
        ids = np.arange(128, dtype=np.int64)[None, :] % vocab
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return {k: v.numpy() for k, v in verification_inputs(model, names).items()}


def original_onnx(model: LoadedModel, graph: LayerGraph, quiet: bool = False) -> Path:
    """The uncompressed model exported once and cached by weight fingerprint (for the
    before/after comparison)."""
    folder = cache_dir() / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{graph.fingerprint()}.onnx"
    if not path.is_file():
        _progress(f"exporting the original {model.name} once for comparison (cached in {folder})", quiet)
        args, names, axes = export_inputs(model)
        export_onnx(model.module, args, path, names, list(model.output_names), axes)
    return path


@dataclass
class CompressReport:
    """Everything ``compress`` measured; ``table()`` renders the before/after table."""

    model: str
    plan: FusionPlan
    out: Path
    blocks: tuple[int, int]
    params: tuple[int, int]
    file_bytes: tuple[int, int]
    verify: VerifyReport
    latency_ms: tuple[float, float]
    recipe: str
    perplexity: tuple[float, float] | None = None
    seconds: float = 0.0
    log_records: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            *size_rows(self.blocks, self.params, self.file_bytes, self.latency_ms),
            ("max error vs torch", "", f"{self.verify.max_rel:.2e} rel", ""),
        ]
        if self.perplexity:
            rows.append(("held-out perplexity", f"{self.perplexity[0]:.2f}", f"{self.perplexity[1]:.2f}", ratio(*self.perplexity)))
        lines = before_after_table(f"lfgraph compress {self.model}: {self.recipe}", rows)
        lines.append(f"  verification on {self.verify.provider}: {'✓ passed' if self.verify.ok else '✗ FAILED'}")
        lines.extend(self.verify.lines())
        lines.append(f"  written: {self.out}  ({self.seconds:.0f} s)")
        return "\n".join(lines)


def compress(
    spec: str | LoadedModel,
    out: str | Path,
    plan: FusionPlan | str | Path | None = None,
    target: float = 0.25,
    mode: str = "merge",
    select: str | None = None,
    fuse: str | None = None,
    metric: str = "bures",
    scope: str = "adjacent",
    target_kind: str = "blocks",
    calibration_text: str | None = None,
    calibration_windows: int = 16,
    calibration_seq_len: int = 256,
    eval_perplexity: int = 0,
    log_path: str | Path | None = None,
    quiet: bool = False,
) -> CompressReport:
    """Compress a model to ``out`` (ONNX) and verify it on ONNX Runtime.

    With ``plan`` the given plan is applied (it must have been made for this model);
    otherwise one is made from ``target`` and the selection/fusion options. ``select`` and
    ``fuse`` default to the best measured recipe for the model family. With
    ``eval_perplexity`` > 0, held-out perplexity on that many 512-token windows is measured
    before and after (language models only).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".onnx":
        raise LfgraphError(f"output {out} must end in .onnx")
    if not out.parent.exists():
        raise LfgraphError(f"output folder {out.parent} does not exist: create it or choose another -o path")
    _progress("loading the model", quiet)
    model = load(spec)
    _progress("tracing with torch.export", quiet)
    graph = trace(model)
    calibration = None
    if plan is not None:
        plan = plan if isinstance(plan, FusionPlan) else FusionPlan.load(plan)
        plan.check_applies_to(graph.fingerprint())
        recipe = f"plan from file: mode {plan.mode}, fuse {plan.fuse}"
        if plan.fuse == "calibrated":
            calibration = calibration_for(model, calibration_text, calibration_windows, calibration_seq_len)
    else:
        default_select, default_fuse = default_recipe(model, mode)
        chosen_select = select or default_select
        chosen_fuse = fuse or default_fuse
        is_default = select is None and fuse is None
        needs_data = chosen_select != "similarity" or chosen_fuse == "calibrated"
        if needs_data:
            calibration = calibration_for(model, calibration_text, calibration_windows, calibration_seq_len)
        _progress(f"planning: select {chosen_select}, fuse {chosen_fuse}, target {target} of {target_kind}", quiet)
        plan = plan_model(model, graph, target, mode=mode, select=chosen_select, fuse=chosen_fuse, metric=metric,
                          scope=scope, target_kind=target_kind, calibration=calibration, progress=not quiet)
        recipe = (f"mode {mode}, select {chosen_select}"
                  + (f" ({metric}, {scope})" if chosen_select == "similarity" else "")
                  + f", fuse {chosen_fuse}" + (" [default for " + model.family + " models]" if is_default else ""))
    _progress(f"rewriting: {len(plan.fusions)} fusions", quiet)
    result = rewrite(model, graph, plan, calibration=calibration, progress=not quiet)
    compressed = result.model.eval()
    metadata = {
        "lfgraph.version": __version__,
        "lfgraph.plan": plan.to_json(),
        "lfgraph.recipe": recipe,
        "lfgraph.source_model": model.name,
    }
    _progress(f"exporting to {out}", quiet)
    args, names, axes = export_inputs(model)
    rep: ExportReport = export_onnx(compressed, args, out, names, list(model.output_names), axes, metadata)
    if log_path:
        write_text_atomic(log_path, result.log.to_json())
    _progress("verifying on ONNX Runtime", quiet)
    vin = verification_inputs(model, names)
    verify = verify_onnx(out, compressed, vin)
    orig_path = original_onnx(model, graph, quiet)
    _progress("timing both models on ONNX Runtime", quiet)
    (before_ms, _), (after_ms, _) = alternating_latency([orig_path, out], latency_inputs(model, names), runs=10)
    blocks_before = len(graph.blocks)
    blocks_after = blocks_before - (sum(len(f.absorb) for f in plan.fusions) if plan.mode == "merge" else 0)
    ppl = None
    if eval_perplexity and model.family == "causal-lm":
        from .calibration import heldout_windows, perplexity

        _progress(f"held-out perplexity on {eval_perplexity} windows of 512 tokens", quiet)
        windows = heldout_windows(model.tokenizer, eval_perplexity, 512)
        ppl = (perplexity(model.module, windows, progress=not quiet), perplexity(compressed, windows, progress=not quiet))
    return CompressReport(
        model=model.name, plan=plan, out=out, blocks=(blocks_before, blocks_after),
        params=(unique_parameter_count(model.module), unique_parameter_count(compressed)),
        file_bytes=(_onnx_bytes(orig_path), rep.file_bytes), verify=verify,
        latency_ms=(before_ms, after_ms), recipe=recipe, perplexity=ppl,
        seconds=time.perf_counter() - t0, log_records=len(result.log.records),
    )


def calibration_for(model: LoadedModel, text_file: str | None, n: int, seq_len: int) -> Any:
    if model.family in ("causal-lm", "encoder"):
        return calibration_tokens(model, n, seq_len, text_file)
    if model.calibration is None:
        raise LfgraphError(f"{model.name} needs calibration inputs for this selection/fusion: pass them in the Python API")
    return model.calibration


def _onnx_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


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
    return "\n".join(lines)


def metadata_plan(onnx_path: str | Path) -> FusionPlan:
    """The plan stored in an lfgraph ONNX file's metadata."""
    from .export import read_metadata

    meta = read_metadata(onnx_path)
    if "lfgraph.plan" not in meta:
        raise LfgraphError(f"{onnx_path} was not written by lfgraph compress (no plan in its metadata)")
    return FusionPlan.from_json(meta["lfgraph.plan"])

