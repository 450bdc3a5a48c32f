"""``lfgraph-study``: every method x every target on one model, one protocol, one shot
(and healed, with ``--heal STEPS``).

Language models: each method of :data:`lfgraph_study.baselines.METHODS` compresses the model at
each target from the same calibration windows (the bundled corpus's calibration pool);
each compressed model is scored on two held-out texts that calibration never sees:

- ``pydoc-heldout``: the bundled corpus's held-out part (``lfgraph.calibration``);
- ``licenses``: the free-software licence texts in ``/usr/share/common-licenses`` (legal
  English, another kind of text than Python's documentation);

by perplexity (non-overlapping windows spread over each text, every position but the first
scored) and by next-token top-1 agreement with the original model (share of positions where
the compressed model's most likely next token is the original's). Vision models (the
project's ResNet-style CNN on its synthetic task): test accuracy and agreement.

Outputs in ``--out``: ``study.json`` (protocol + rows), ``study.csv``, ``study.md`` (tables
with the winner at each level), one ``study_<metric>.png`` per metric (metric vs compression,
one line per method, log axis when the values span a decade or more) and each curve's
inflection point (:func:`inflection_point`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.options import COUNT, FRACTION, SEQ_LEN, STEPS, add_overwrite_option
from lfgraph.fileio import atomic_path, check_outputs, commit_folder, png_metadata, staging_folder, write_text_atomic

LICENSES_DIR = Path("/usr/share/common-licenses")
DEFAULT_METHODS = ("shortgpt", "gromov", "sleb", "laco", "replaceme-lstsq", "replaceme-cosine", "linearpatch", "lfgraph")
DEFAULT_TARGETS = (0.1, 0.2, 0.3)


# ---------------------------------------------------------------------------------------
# evaluation texts and scores
# ---------------------------------------------------------------------------------------


def licenses_text(folder: Path = LICENSES_DIR) -> str:
    """Every distinct licence file of ``folder`` (symbolic links followed once), sorted by
    name, joined by blank lines. Raises ``LfgraphError`` when there is none."""
    seen: set[str] = set()
    parts = []
    for p in sorted(folder.glob("*")) if folder.is_dir() else []:
        real = os.path.realpath(p)
        if p.is_file() and real not in seen:
            seen.add(real)
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise LfgraphError(f"no licence texts in {folder}: install the base-files package or give another text")
    return "\n\n".join(parts)


def eval_windows(tokenizer: Any, n_windows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The two held-out texts as ``(n_windows, seq_len)`` token windows each."""
    from lfgraph.calibration import _tokenize, heldout_windows, windows_from_tokens

    return {
        "pydoc-heldout": heldout_windows(tokenizer, n_windows, seq_len),
        "licenses": windows_from_tokens(_tokenize(tokenizer, licenses_text()), n_windows, seq_len, "licence texts"),
    }


@torch.no_grad()
def lm_scores(module: nn.Module, windows: torch.Tensor, reference_top1: torch.Tensor | None, batch_size: int = 2) -> tuple[float, float, torch.Tensor]:
    """``(perplexity, top-1 agreement with reference_top1, this model's top-1)`` on windows.

    Perplexity scores every position's next token (all but the last position of a window);
    agreement compares the argmax at the same positions (1.0 when no reference is given)."""
    nll, count, top1 = 0.0, 0, []
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = module(ids)[:, :-1].float()
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
        top1.append(logits.argmax(-1))
    top = torch.cat(top1)
    agree = 1.0 if reference_top1 is None else float((top == reference_top1).float().mean())
    return math.exp(nll / count), agree, top


# ---------------------------------------------------------------------------------------
# inflection point
# ---------------------------------------------------------------------------------------


def inflection_point(xs: list[float], ys: list[float], y0: float, higher_is_worse: bool = True) -> float | None:
    """The compression at which a curve starts to rise exponentially.

    ``xs`` (ascending compression) and ``ys`` (the metric), with ``y0`` the uncompressed
    value. The loss is ``log(y / y0)`` (perplexity) or ``log(y0 / y)`` (accuracy,
    ``higher_is_worse=False``), and its slope per unit of compression is taken on each
    segment from ``(0, 0)`` through the points. The inflection is the start of the segment
    whose slope is the largest multiple (at least 2x) of the mean slope before it, that mean
    floored at a tenth of the whole curve's mean slope (so a flat start does not make any
    rise look like a knee). ``None`` when the curve rises at one rate (no bend of 2x) or has
    fewer than 2 points.
    """
    pts = [(0.0, 0.0)] + [
        (x, math.log(max(y, 1e-12) / y0) if higher_is_worse else math.log(y0 / max(y, 1e-12))) for x, y in zip(xs, ys)
    ]
    slopes = [(b[1] - a[1]) / max(b[0] - a[0], 1e-12) for a, b in zip(pts, pts[1:])]
    overall = (pts[-1][1] - pts[0][1]) / max(pts[-1][0] - pts[0][0], 1e-12)
    floor = max(0.1 * overall, 1e-9)
    best, best_ratio = None, 2.0
    for k in range(1, len(slopes)):
        before = max(sum(slopes[:k]) / k, floor)
        ratio = slopes[k] / before
        if ratio >= best_ratio:
            best, best_ratio = pts[k][0], ratio
    return best


# ---------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------


@dataclass
class Track:
    """A model and how to score it: ``score(model) -> {metric: value}`` (with the original
    model's values in ``original``), ``lower_is_better`` per metric, the calibration data."""

    name: str
    model: nn.Module
    calibration: torch.Tensor
    score: Callable[[nn.Module], dict[str, float]]
    lower_is_better: dict[str, bool]
    protocol: dict[str, Any]
    original: dict[str, float] = field(default_factory=dict)


def lm_track(spec: str, calib_windows: int, calib_tokens: int, eval_windows_n: int, eval_tokens: int,
             lm_eval_tasks: Sequence[str] = (), lm_eval_include: str | None = None, lm_eval_limit: int | None = None) -> Track:
    """A causal LM (alias, folder or .gguf) with the two held-out texts, plus zero-shot
    ``lm_eval_tasks`` through lm-eval when given (:mod:`lfgraph_study.harness`; ``lm_eval_include``
    a folder of local task files, ``lm_eval_limit`` examples per task)."""
    from lfgraph.calibration import calibration_windows
    from lfgraph.models import load_model

    loaded = load_model(spec)
    if loaded.family != "causal-lm":
        raise LfgraphError(f"{spec} is not a causal language model: the study's language track needs one")
    calib = calibration_windows(loaded.tokenizer, calib_windows, calib_tokens)
    texts = eval_windows(loaded.tokenizer, eval_windows_n, eval_tokens)
    reference: dict[str, torch.Tensor] = {}
    for name, w in texts.items():
        _, _, reference[name] = lm_scores(loaded.module, w, None)

    task_directions: dict[str, bool] = {}  # lm-eval metric -> lower is better, as each task declares it

    def score(m: nn.Module) -> dict[str, float]:
        out = {}
        for name, w in texts.items():
            ppl, agree, _ = lm_scores(m, w, reference[name])
            out[f"ppl_{name}"], out[f"top1_{name}"] = ppl, agree
        if lm_eval_tasks:
            from .harness import task_scores

            out |= task_scores(m, loaded.tokenizer, lm_eval_tasks, lm_eval_include, lm_eval_limit, lower_is_better=task_directions)
        return out

    lower = {f"ppl_{n}": True for n in texts} | {f"top1_{n}": False for n in texts}
    protocol = {
        "model": loaded.name, "calibration": f"{calib_windows} windows x {calib_tokens} tokens from the bundled corpus's calibration pool (pydoc_data.topics, first 70%)",
        "evaluation": {n: f"{eval_windows_n} non-overlapping windows x {eval_tokens} tokens spread evenly over the text, {eval_windows_n * (eval_tokens - 1)} next-token predictions scored" for n in texts},
        "texts": {"pydoc-heldout": "pydoc_data.topics, last 30% of its tokens (never used for calibration)", "licenses": f"every distinct file of {LICENSES_DIR}, sorted by name"},
        "agreement": "share of positions where the compressed model's top-1 next token equals the original model's",
    }
    if lm_eval_tasks:
        protocol["zero_shot"] = (f"lm-eval tasks {', '.join(lm_eval_tasks)}" + (f" from {lm_eval_include}" if lm_eval_include else "")
                                 + (f", at most {lm_eval_limit} examples each" if lm_eval_limit else ""))
    t = Track(loaded.name, loaded.module, calib, score, lower, protocol)
    t.original = score(loaded.module)
    t.lower_is_better |= {k: task_directions.get(k, False) for k in t.original if k not in lower}
    return t


def vision_track(steps: int = 300, seed: int = 0, n_train: int = 2048, n_calib: int = 256, n_test: int = 768) -> Track:
    """The project's ResNet-style CNN trained for ``steps`` on the synthetic task of
    ``lfgraph_study.zoo``'s benchmarks (scikit-learn is not installed here, so its digits are not
    available); ``n_calib`` calibration and ``n_test`` test images apart from training."""
    from lfgraph.calibration import accuracy
    from .zoo import ResNetCNN, train_classifier

    x, y = synthetic_images(n_train + n_calib + n_test, seed=seed)
    a, b = n_train, n_train + n_calib
    xtr, ytr, xcal, xte, yte = x[:a], y[:a], x[a:b], x[b:], y[b:]
    torch.manual_seed(seed)
    model = ResNetCNN(stages=((16, 4), (32, 4)))
    train_classifier(model, xtr, ytr, steps, seed)
    with torch.no_grad():
        ref = model(xte).argmax(-1)

    def score(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            pred = m(xte).argmax(-1)
        return {"accuracy": accuracy(m, xte, yte), "top1_agreement": float((pred == ref).float().mean())}

    protocol = {
        "model": "ResNetCNN (2 stages x 4 basic blocks, 16/32 channels) trained by the study",
        "data": f"synthetic 10-class 3x16x16 images of lfgraph's benchmark task (seeded); {steps} Adam steps on {n_train} images",
        "calibration": f"{n_calib} images apart from training and test", "evaluation": f"{n_test} test images: accuracy and top-1 agreement with the original",
    }
    t = Track("resnet-cnn", model, xcal, score, {"accuracy": False, "top1_agreement": False}, protocol)
    t.original = score(model)
    return t


def synthetic_images(n: int, classes: int = 10, size: int = 16, seed: int = 0, noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a fixed random pattern plus noise (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return patterns[y] + noise * torch.randn(n, 3, size, size, generator=g), y


def _options_for(label: str, options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The options of ``label`` (``"name=method"`` or ``"method"``): keyed by the whole label
    or by its name."""
    options = options or {}
    if label in options:
        return dict(options[label])
    return dict(options.get(label.partition("=")[0], {}))


def sweep(
    track: Track, methods: list[str], targets: list[float], options: dict[str, dict[str, Any]] | None = None,
    log: Callable[[str], None] = print, on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    heal_steps: int = 0, heal_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every method at every target on ``track``: one row per (method, target) with the
    method's :meth:`~lfgraph_study.baselines.MethodResult.row` and its scores (or ``error``).

    A method may be a label ``"name=method"`` (e.g. ``"lfgraph-map=lfgraph"``) so that one
    method runs under several option sets; ``options`` are keyed by the label's name (or the
    whole label). ``on_row(rows)``
    is called after each row (to save partial results).

    ``heal_steps`` > 0: each depth method's result is then also healed (distillation from
    the original on the calibration data, :func:`lfgraph.retrain.heal`, every parameter
    trainable, ``heal_options`` into its ``HealConfig``) and scored again as a second row,
    method ``"<label>+heal"`` with ``healed`` = steps and ``heal_cpu_s``. Width methods
    (masks, clusters) are not healed: plain fine-tuning would undo what they removed."""
    from .baselines import METHODS, run_method

    rows: list[dict[str, Any]] = []
    for label in methods:
        method = label.partition("=")[2] or label
        if method not in METHODS:
            raise LfgraphError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
        for target in targets:
            t0 = time.perf_counter()
            try:
                res = run_method(method, track.model, target, track.calibration, **_options_for(label, options))
            except LfgraphError as e:
                rows.append({"method": label.partition("=")[0], "target": target, "error": str(e)})
                log(f"{label} @ {target}: {e}")
                continue
            row = res.row() | track.score(res.model)
            row["method"] = label.partition("=")[0]
            row["eval_seconds"] = round(time.perf_counter() - t0 - res.seconds, 2)
            rows.append(row)
            log(f"{label} @ {target}: " + ", ".join(f"{k} {row[k]:.4g}" for k in track.lower_is_better) + f" ({res.seconds:.1f} s)")
            if heal_steps > 0 and METHODS[method].kind == "depth":
                rows.append(_healed_row(track, res.model, row, heal_steps, heal_options or {}))
                log(f"{rows[-1]['method']} @ {target}: " + ", ".join(f"{k} {rows[-1][k]:.4g}" for k in track.lower_is_better)
                    + f" ({rows[-1]['heal_cpu_s']:.0f} CPU-s of healing)")
            del res
            if on_row is not None:
                on_row(rows)
    return rows


def _healed_row(track: Track, model: nn.Module, row: dict[str, Any], steps: int, options: dict[str, Any]) -> dict[str, Any]:
    """Heal ``model`` in place (distillation from ``track.model`` on the calibration data)
    and score it: ``row`` with the new scores, method ``+heal``, steps and CPU seconds."""
    from lfgraph.retrain.heal import HealConfig, heal

    config = HealConfig(**({"steps": steps, "progress": False, "keep_best": False, "objective": "distill"} | options))
    t0 = time.process_time()
    heal(model, track.model, track.calibration, config)
    cpu = time.process_time() - t0
    model.eval()
    return row | track.score(model) | {"method": f"{row['method']}+heal", "healed": steps, "heal_cpu_s": round(cpu, 1)}


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------


def summary_markdown(track: Track, rows: list[dict[str, Any]], best_of: list[str] | None = None, ours: str = "lfgraph") -> str:
    """Tables (one per metric: methods x targets), the winner per level, ``ours`` relative to
    the best of ``best_of`` (default: every other method), inflection points, protocol."""
    ok = [r for r in rows if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    targets = sorted({r["target"] for r in rows})
    lines = [f"# lfgraph study: {track.name}", "", "## Protocol", ""]
    lines += [f"- {k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in track.protocol.items()]
    for metric, lower in track.lower_is_better.items():
        lines += ["", f"## {metric} ({'lower' if lower else 'higher'} is better; original {track.original.get(metric, float('nan')):.4g})", ""]
        lines.append("| method | " + " | ".join(f"{t:g}" for t in targets) + " | inflection |")
        lines.append("|---" * (len(targets) + 2) + "|")
        for m in methods:
            cells, xs, ys = [], [], []
            for t in targets:
                r = next((r for r in ok if r["method"] == m and r["target"] == t), None)
                cells.append(f"{r[metric]:.4g}" if r else "–")
                if r:
                    xs.append(r["depth_fraction"] or r["weight_fraction"])
                    ys.append(r[metric])
            knee = inflection_point(xs, ys, track.original[metric], higher_is_worse=lower) if xs else None
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {'none' if knee is None else f'{knee:.3g}'} |")
        lines.append("")
        for t in targets:
            at = [r for r in ok if r["target"] == t]
            if not at:
                continue
            best = (min if lower else max)(at, key=lambda r: r[metric])
            rel = ""
            for healed in (False, True):  # one shot against one shot, healed against healed
                state = [r for r in at if bool(r.get("healed")) == healed]
                name = f"{ours}+heal" if healed else ours
                # peers: the other methods, not lfgraph's own variants (those are ablations)
                peers = [r for r in state if not r["method"].startswith(ours)
                         and (best_of is None or r["method"].removesuffix("+heal") in best_of)]
                mine = next((r for r in state if r["method"] == name), None)
                if peers and mine:
                    peer = (min if lower else max)(peers, key=lambda r: r[metric])
                    rel += f"; {name} / best peer ({peer['method']}) = {mine[metric] / peer[metric]:.3f}"
            lines.append(f"- {t:g}: best {best['method']} ({best[metric]:.4g}){rel}")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "## Not measured", ""] + [f"- {r['method']} @ {r['target']}: {r['error']}" for r in errors]
    lines += ["", "## Seconds per method (selection + rewrite)", "", "| method | " + " | ".join(f"{t:g}" for t in targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for m in methods:
        cells = [next((f"{r['seconds']:.1f}" for r in ok if r["method"] == m and r["target"] == t), "–") for t in targets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(track: Track, rows: list[dict[str, Any]], out: Path, ours: str = "lfgraph") -> list[Path]:
    """study.json, study.csv, study.md and one plot per metric in ``out`` (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "study.json", json.dumps({"track": track.name, "protocol": track.protocol, "original": track.original,
                                                      "lower_is_better": track.lower_is_better, "rows": rows}, indent=1, default=str))
    metrics = list(track.lower_is_better)
    cols = ["method", "target", "depth_fraction", "weight_fraction", *metrics, "seconds", "removed", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "removed": " ".join(r.get("removed", []))})
    write_text_atomic(out / "study.csv", buf.getvalue())
    write_text_atomic(out / "study.md", summary_markdown(track, rows, ours=ours))
    paths = [out / "study.json", out / "study.csv", out / "study.md"]
    paths += plot_study(track, rows, out)
    return paths


def merge_studies(inputs: list[Path], out: Path, ours: str = "lfgraph") -> list[Path]:
    """Merge the ``study.json`` of several runs of one track (e.g. methods run in two
    processes) into one set of outputs in ``out``. Raises ``LfgraphError`` when the runs
    differ in model or protocol (their numbers would not be comparable)."""
    runs = [json.loads((Path(p) / "study.json").read_text()) for p in inputs]
    first = runs[0]
    for r in runs[1:]:
        keep = {k: v for k, v in r["protocol"].items() if k != "sleb_budget"}
        if r["track"] != first["track"] or keep != {k: v for k, v in first["protocol"].items() if k != "sleb_budget"}:
            raise LfgraphError(f"studies {inputs} differ in model or protocol: they cannot share a table")
    protocol = dict(first["protocol"])
    # a run's SLEB budget matters only if it ran a SLEB selection
    budgets = sorted({r["protocol"].get("sleb_budget", "") for r in runs if any("sleb" in row["method"] for row in r["rows"])} - {""})
    protocol.pop("sleb_budget", None)
    if budgets:
        protocol["sleb_budget"] = "; ".join(budgets)
    # runs written before the direction of each metric was stored: any run that has it
    lower = next((r["lower_is_better"] for r in runs if "lower_is_better" in r), None)
    if lower is None:
        raise LfgraphError(f"none of {inputs} says which metrics are better lower: rerun one of them")
    track = Track(first["track"], None, None, lambda m: {}, lower, protocol, first["original"])  # type: ignore[arg-type]
    rows = [row for r in runs for row in r["rows"]]
    return write_outputs(track, rows, out, ours)


def plot_study(track: Track, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per metric: metric vs compression (depth fraction, else weight fraction), one
    line per method, the original as a dashed line; log y axis when values span >= 10x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    paths = []
    for metric, lower in track.lower_is_better.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        values = [r[metric] for r in ok] + [track.original[metric]]
        for m in dict.fromkeys(r["method"] for r in ok):
            pts = sorted((r["depth_fraction"] or r["weight_fraction"], r[metric]) for r in ok if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(track.original[metric], color="k", linestyle="--", linewidth=0.8, label="original")
        if values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_yscale("log")
        ax.set_xlabel("compression (fraction of depth removed; of weights for width methods)")
        ax.set_ylabel(metric)
        ax.set_title(f"{track.name}: {metric}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"study_{metric}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png", metadata=png_metadata())
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lfgraph-study`` (:mod:`lfgraph_study.cli`), on ``p``."""
    from .baselines import METHODS

    p.add_argument("model", help="a causal LM (smollm2, a Hugging Face folder, a .gguf) or 'cnn' for the vision track")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"methods to compare (default: %(default)s); choices: {', '.join(METHODS)}")
    p.add_argument("--targets", nargs="+", type=FRACTION, default=list(DEFAULT_TARGETS), help="fractions of depth (width methods: of weights)")
    p.add_argument("--out", default="study", help="folder for study.json/.csv/.md and plots (default: %(default)s)")
    p.add_argument("--calib-windows", type=COUNT, default=32)
    p.add_argument("--calib-tokens", type=SEQ_LEN, default=256)
    p.add_argument("--eval-windows", type=COUNT, default=8, help="held-out windows per text")
    p.add_argument("--eval-tokens", type=SEQ_LEN, default=512)
    p.add_argument("--sleb-windows", type=COUNT, default=4, help="SLEB's reduced calibration budget (windows)")
    p.add_argument("--sleb-tokens", type=SEQ_LEN, default=128, help="SLEB's reduced calibration budget (tokens per window)")
    add_overwrite_option(p)
    p.add_argument("--cnn-steps", type=COUNT, default=300, help="training steps of the vision track's CNN")
    p.add_argument("--lm-eval", nargs="+", default=[], metavar="TASK",
                   help="also score zero-shot lm-eval tasks (needs 'lfgraph[lm-eval]'; offline: local task files via --lm-eval-include)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="folder of lm-eval task YAMLs (e.g. written by lfgraph_study.harness.write_cloze_task)")
    p.add_argument("--lm-eval-limit", type=COUNT, metavar="N", help="at most N examples per lm-eval task")
    p.add_argument("--heal", type=STEPS, default=0, metavar="STEPS",
                   help="also heal each depth method's result for STEPS steps (distillation from the original on the "
                        "calibration data, all parameters) and score it again as '<method>+heal'")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the study the arguments describe; prints the summary and the files written."""
    # checked before the model is loaded (the numbers by their argparse rules)
    check_outputs({"--out": args.out}, [args.model, args.lm_eval_include], args.overwrite, folders=["--out"])
    if args.lm_eval:  # checked before the model is loaded
        from .harness import _harness

        if args.model == "cnn":
            raise LfgraphError("--lm-eval scores language models: the cnn track has no text tasks")
        if args.lm_eval_include and not Path(args.lm_eval_include).is_dir():
            raise LfgraphError(f"lm-eval task folder {args.lm_eval_include} does not exist: give a folder of task YAML files")
        _harness()
    if args.model == "cnn":
        track = vision_track(args.cnn_steps)
    else:
        track = lm_track(args.model, args.calib_windows, args.calib_tokens, args.eval_windows, args.eval_tokens,
                         args.lm_eval, args.lm_eval_include, args.lm_eval_limit)
    budget = {"max_windows": args.sleb_windows, "max_tokens": args.sleb_tokens}
    options = {"sleb": budget, "lfgraph-sleb": {"sleb_budget": (args.sleb_windows, args.sleb_tokens)}}
    track.protocol["sleb_budget"] = f"{args.sleb_windows} windows x {args.sleb_tokens} tokens"
    print(f"lfgraph study {track.name}: original " + ", ".join(f"{k} {v:.4g}" for k, v in track.original.items()), flush=True)
    if args.heal:
        track.protocol["healing"] = f"{args.heal} steps of distillation from the original on the calibration data, all parameters (rows '+heal')"
    rows = sweep(track, list(args.methods), sorted(args.targets), options, log=lambda s: print(f"  {s}", flush=True), heal_steps=args.heal)
    out = Path(args.out)
    with staging_folder(out) as staged:
        names = [p.name for p in write_outputs(track, rows, staged)]
        commit_folder(staged, out)
    print((out / "study.md").read_text())
    print("written: " + ", ".join(str(out / n) for n in names))
    return 0
