"""``compress_checkpoint``: the streaming compress of a safetensors checkpoint folder.

    check options → open headers → calibration windows → estimate (refuse if it cannot fit)
      → meta skeleton → fingerprint of the head → selection pass (block by block; each
      block's layers hashed for the fingerprint) → plan
      → [calibrated: refit from the selection's states entering the first run, block by block
         over the runs] → write shards (staged) → report

Same plan as the in-memory path (``lfgraph.pipeline``) on the same folder and options, and
the same weights: bit for bit with ``remove``, to rounding with the calibrated rules (the
refit starts from the hidden states the selection pass computed, batched differently from
the in-memory refit's); the output is a Hugging Face checkpoint folder, plus float32 ONNX written by
onnxruntime-genai's builder and checked against it when ONNX Runtime can hold the model
(:mod:`lfgraph.stream.onnx`; the in-memory exporter would need the whole model traced).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..allocator import return_freed_memory
from ..errors import LfgraphError
from ..fileio import check_outputs, commit_folder, failed_path, staging_folder
from ..options import COUNT, FRACTION, SEQ_LEN, check
from ..passes.base import RewriteLog
from ..passes.selection import Run, runs_to_plan
from ..plan import FusionPlan
from ..recipes import refit_provenance, split_fusion_rule
from ..registry import FUSION_RULE_REGISTRY
from .calibrate import calibration_ids, stack_input
from .checkpoint import Checkpoint
from .estimate import Estimate, check_fits, estimate
from .onnx import CHECK_RTOL, ONNX_CHOICES, TOKENIZER_FILES, OnnxResult, has_tokenizer, wants_onnx, write_onnx
from .refit import IN_MEMORY_CONTAINER, refit_runs
from .select import STREAM_SELECTIONS, score_blocks, select_runs
from .skeleton import LAYERS_PATH, Skeleton
from .write import write_checkpoint

#: Fusion rules the streaming path applies (closed form; the distilling rules train the
#: whole model and need it in memory).
STREAM_FUSION_RULES = tuple(r.name for r in FUSION_RULE_REGISTRY.values() if r.streams)


@dataclass
class StreamReport:
    """What a streaming compress did: the plan, sizes before/after, time per stage, bytes
    read and written, the estimate made before the work and the peak memory measured."""

    model: str
    out: Path
    plan: FusionPlan
    blocks: tuple[int, int]
    params: tuple[int, int]
    estimate: Estimate
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    peak_rss_bytes: int = 0
    files: list[Path] = field(default_factory=list)
    log: RewriteLog = field(default_factory=RewriteLog)
    onnx: OnnxResult | None = None
    onnx_reason: str = ""
    exit_code: int = 0

    def table(self) -> str:
        """A few lines for people."""
        GB = 1 << 30
        p = self.plan.provenance
        rows = [
            f"lfgraph compress --stream {self.model} -> {self.out}",
            f"  recipe      select {p.get('select')}, fuse {self.plan.fuse}" + (f" ({p['refit']} refit)" if "refit" in p else ""),
            f"  blocks      {self.blocks[0]} -> {self.blocks[1]}   ({'; '.join(_fusion_text(f) for f in self.plan.fusions)})",
            f"  parameters  {self.params[0]:,} -> {self.params[1]:,}",
            f"  read        {self.bytes_read / GB:.2f} GB   written {self.bytes_written / GB:.2f} GB",
            f"  peak memory {self.peak_rss_bytes / GB:.2f} GB (estimated {self.estimate.peak_bytes / GB:.2f} GB)",
            "  time        " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()) + f" (estimated {self.estimate.seconds:.0f} s of compute)",
            "  output      Hugging Face checkpoint" + (" + float32 model.onnx and genai_config.json (onnxruntime-genai's builder)" if self.onnx else f"; no ONNX: {self.onnx_reason}"),
        ]
        if self.onnx is not None:
            o = self.onnx
            rows.append(f"  onnx        built in {o.seconds:.1f} s, builder peak {o.builder_peak_bytes / GB:.2f} GB; export check: prefill logits vs the checkpoint "
                        f"max rel {o.check_rel:.1e} {'✓' if o.passed else f'✗ (> {CHECK_RTOL:g}): written to {self.out}'}")
        return "\n".join(rows)


def _fusion_text(f: Any) -> str:
    index = lambda name: name.rsplit(".", 1)[1]  # noqa: E731
    return f"keep {index(f.keep)} absorb {', '.join(index(a) for a in f.absorb)}"


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"lfgraph: {msg}", file=sys.stderr, flush=True)


def _bar(total: int | None, desc: str, progress: bool, unit: str = "block") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress,
                **({"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}))


def check_stream_options(src: Path, out: Path, target: float, select: str, fuse: str, onnx: str = "auto") -> None:
    """Refuse what the streaming path cannot do, with one line each, before reading weights."""
    if select not in STREAM_SELECTIONS:
        raise LfgraphError(f"the streaming path selects by {' or '.join(STREAM_SELECTIONS)}, not {select!r}: "
                           "choose one of them, or use the in-memory path (without --stream)")
    if fuse not in STREAM_FUSION_RULES:
        if fuse in FUSION_RULE_REGISTRY and FUSION_RULE_REGISTRY[fuse].distill:
            raise LfgraphError(f"--fuse {fuse} trains the whole model and needs it in memory: use --fuse calibrated on the streaming path, "
                               "or the in-memory path (without --stream)")
        raise LfgraphError(f"the streaming path fuses by {', '.join(STREAM_FUSION_RULES)}, not {fuse!r}: use the in-memory path (without --stream)")
    check("--target", target, FRACTION)
    if onnx not in ONNX_CHOICES:
        raise LfgraphError(f"onnx must be one of {', '.join(ONNX_CHOICES)}, got {onnx!r}")
    if onnx == "fp32" and src.is_dir() and not has_tokenizer(src):
        raise LfgraphError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): onnxruntime-genai's builder needs them "
                           "to write ONNX; add them, or write the checkpoint alone (onnx='none' / --no-onnx)")
    if out.suffix.lower() == ".onnx":
        raise LfgraphError("the streaming path writes a deploy folder (checkpoint, and model.onnx when it fits), not a lone .onnx file: "
                           "give a folder for -o")
    if not src.is_dir():
        raise LfgraphError(f"model {src} is not a folder: the streaming path reads a Hugging Face checkpoint folder (config.json + safetensors)")


def build_plan(skeleton: Skeleton, runs: list[Run], *, select: str, fuse: str, target: float, fingerprint: str | None) -> FusionPlan:
    """The plan the in-memory path makes for the same runs (``lfgraph.pipeline.plan_model``:
    ``runs_to_plan`` with its provenance, then the refit provenance and the fraction removed)."""
    L = skeleton.num_layers
    n_drop = sum(len(r.absorb) for r in runs)
    rule, align = split_fusion_rule(fuse)
    provenance = {
        "lfgraph_version": __version__, "model": skeleton.ckpt.folder.name, "source": "torch", "select": select,
        "target": target, "target_kind": "blocks", "blocks_before": L, "blocks_after": L - n_drop,
        "params_before": skeleton.parameter_count(),
    }
    if fingerprint is not None:
        provenance["model_fingerprint"] = fingerprint
    plan = runs_to_plan(runs, IN_MEMORY_CONTAINER, fuse=rule, align=align, provenance=provenance)
    plan.provenance.update(refit_provenance(fuse))
    plan.provenance["achieved"] = round(n_drop / L, 4)
    plan.provenance["achieved_kind"] = "blocks"
    return plan


def compress_checkpoint(
    src_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    target: float = 0.25,
    select: str = "block_influence",
    fuse: str = "calibrated",
    calibration_text: str | None = None,
    calibration_tokens: str | None = None,
    calibration_windows: int = 16,
    calibration_seq_len: int = 256,
    progress: bool = True,
    fingerprint: bool = True,
    check_memory: bool = True,
    overwrite: bool = False,
    onnx: str = "auto",
) -> StreamReport:
    """Compress the causal LM checkpoint in ``src_folder`` by ``target`` of its decoder
    blocks into the Hugging Face checkpoint folder ``out_folder``, never holding the model.

    Expects a Llama-style decoder folder (Llama, Qwen2, Qwen3, Mistral): ``config.json`` and
    ``model.safetensors`` or shards with ``model.safetensors.index.json``; tokenizer files
    (or ``calibration_tokens``) for the calibration windows. ``select``: ``block_influence``
    or ``angular``; ``fuse``: ``remove``, ``calibrated`` or ``calibrated-map``. Calibration
    options as :func:`lfgraph.pipeline.compress`'s.

    Guarantees: the plan is the one the in-memory path makes for the same folder and options,
    and so is the model fingerprint it records; the weights are the in-memory path's, bit
    for bit with ``remove``, and to rounding with ``calibrated`` / ``calibrated-map`` (float32
    compute; the refit starts from the hidden states the selection pass computed in its own
    batches, which float32 products may round differently from the in-memory refit's
    batches: promised to 1e-5 of the largest magnitude, measured bit for bit on the models
    of ``tests/stream/test_equivalence.py``;
    refitted tensors written in the stored dtype); the input is only read; ``out_folder`` is checked and appears only complete by the rules of
    :mod:`lfgraph.fileio` (``overwrite`` as ``--overwrite``); ``fingerprint=False`` skips the model fingerprint (the blocks' layers
    hashed as the selection pass reads them, the head read once more) and the plan then has
    no ``model_fingerprint``. Before any weight is read the peak memory is
    estimated and, with ``check_memory``, a run that cannot fit raises ``LfgraphError``
    naming the options that would make it fit. ``onnx`` (:data:`~lfgraph.stream.onnx.ONNX_CHOICES`):
    whether the folder also gets float32 ``model.onnx`` and ``genai_config.json`` from
    onnxruntime-genai's builder, checked against the written checkpoint (prefill logits);
    ``auto`` when ONNX Runtime could hold it in the memory available. A failed check puts
    the folder at ``OUT.failed/`` (exit code 1), never at ``out_folder``.
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    src, out = Path(src_folder), Path(out_folder)
    check_stream_options(src, out, target, select, fuse, onnx)
    check("--calibration-windows", calibration_windows, COUNT)
    check("--calibration-seq-len", calibration_seq_len, SEQ_LEN)
    check_outputs({"-o": out}, [src, calibration_text, calibration_tokens], overwrite, folders=["-o"])
    ckpt = Checkpoint(src)
    return_freed_memory()
    L = ckpt.num_layers
    n_drop = max(1, round(target * L))
    if n_drop > L - 1:
        raise LfgraphError(f"target {target} asks to remove {n_drop} of {L} blocks but only {L - 1} can go: lower the target")
    ids = calibration_ids(src, calibration_windows, calibration_seq_len, calibration_text, calibration_tokens)
    rule, _ = split_fusion_rule(fuse)
    est = estimate(ckpt, n_drop=n_drop, select=select, fuse=rule, windows=calibration_windows, seq_len=calibration_seq_len, fingerprint=fingerprint)
    _say(est.summary(), progress)
    if check_memory:
        check_fits(est, windows=calibration_windows, seq_len=calibration_seq_len, fuse=rule)
    seconds["prepare"] = time.perf_counter() - t_start

    skeleton = Skeleton(ckpt)
    fp, hasher, outside = None, None, {}
    if fingerprint:
        # the layers outside the blocks (lm_head) are read here; the blocks' layers are hashed
        # by the selection pass from the blocks it reads anyway
        t0 = time.perf_counter()
        from .fingerprint import BlockHasher, outside_block_digests

        with _bar(None, "fingerprint", progress, unit="layer") as bar:
            outside = outside_block_digests(skeleton, bar)
        hasher = BlockHasher()
        seconds["fingerprint"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs = stack_input(skeleton, [ids])
    with _bar(L, f"selection ({select})", progress) as bar:
        try:
            # a refit follows: keep the states entering the blocks a run can start at (a run
            # starts at most at block L - n_drop - 1), for the refit to start from
            scores = score_blocks(skeleton, inputs, select, n_drop, bar, hasher=hasher,
                                  keep_states=L - n_drop if rule == "calibrated" else 0)
        finally:
            if hasher is not None:
                hasher.close()
    del inputs
    if hasher is not None:
        fp = hasher.fingerprint(skeleton, outside)
    runs = select_runs(scores, select, L, n_drop)
    plan = build_plan(skeleton, runs, select=select, fuse=fuse, target=target, fingerprint=fp)
    seconds["selection"] = time.perf_counter() - t0
    _say(f"plan: {', '.join(f'keep {r.keep} absorb {r.absorb}' for r in runs)}", progress)

    changed: dict[str, Any] = {}
    log = RewriteLog()
    if rule == "calibrated":
        t0 = time.perf_counter()
        first, last = min(r.blocks[0] for r in runs), max(r.blocks[-1] for r in runs)
        with _bar(last + 1 - first, "calibrated refit", progress) as bar:
            res = refit_runs(skeleton, runs, ids, refit=str(plan.provenance.get("refit", "full")), progress=bar, states=scores.states)
        changed, log = res.changed, res.log
        seconds["refit"] = time.perf_counter() - t0
    else:
        for r in runs:
            for i in r.absorb:
                log.add("merge", "remove", f"{IN_MEMORY_CONTAINER}.{i}", [f"{IN_MEMORY_CONTAINER}.{r.keep}"], fuse=rule)

    t0 = time.perf_counter()
    dropped = {i for r in runs for i in r.absorb}
    kept = [i for i in range(L) if i not in dropped]
    dropped_params = sum(e.numel for n, e in ckpt.tensors.items()
                         if n.startswith(f"{LAYERS_PATH}.") and int(n.split(".")[2]) in dropped)
    params_before = skeleton.parameter_count()
    params_after = params_before - dropped_params
    onnx_result, exit_code, target_folder = None, 0, out
    with staging_folder(out) as folder:
        with _bar(0, "writing", progress, unit="B") as bar:
            bar.total = sum(e.nbytes for e in ckpt.tensors.values())
            written = write_checkpoint(ckpt, folder, kept, changed, bar)
        plan.save(folder / "plan.json")
        seconds["write"] = time.perf_counter() - t0
        write, why = wants_onnx(onnx, params_after, written.bytes_written, tokenizer=has_tokenizer(src))
        _say(f"ONNX: {'writing float32 ONNX with onnxruntime-genai' if write else 'not written'} ({why})", progress)
        if write:
            onnx_result = write_onnx(folder, ids)
            seconds["onnx"] = onnx_result.seconds
            seconds["onnx check"] = onnx_result.check_seconds
            if not onnx_result.passed:
                exit_code, target_folder = 1, failed_path(out)
        commit_folder(folder, target_folder)
    seconds["total"] = time.perf_counter() - t_start

    return StreamReport(
        model=src.name, out=target_folder, plan=plan, blocks=(L, len(kept)), params=(params_before, params_after),
        estimate=est, seconds=seconds, bytes_read=ckpt.bytes_read, bytes_written=written.bytes_written,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        files=sorted(p for p in target_folder.iterdir() if not p.name.startswith(".")), log=log,
        onnx=onnx_result, onnx_reason=why, exit_code=exit_code,
    )
