"""Layer fusion beside the paper's comparison methods, at equal compression.

Run by people, not imported by lfgraph:

    .venv/bin/python tools/compare_methods.py                       # the CNN tables (~6 min on 1 core)
    .venv/bin/python tools/compare_methods.py --skip-cnn --smollm   # SmolLM2-135M perplexity (~5 min)

What it does:

1. Trains the project CNN (``lfgraph_study.zoo.ResNetCNN``) for a fixed number of steps on a
   synthetic, learnable 10-class image task (noisy, shifted, rescaled low-frequency colour
   templates, 16x16 pixels).
2. **Without retraining**: at each fraction ``f`` (default 10/20/30 %) of the weights of the
   fully-connected and convolution layers, compresses it by layer fusion (the planner with
   ``mode="tie"``, ``target_kind="params"``, Bures metric, global and adjacent scope, then
   ``apply_plan``) and by every baseline in ``lfgraph_study.baselines.BASELINES``, and prints
   test accuracy with the share of layer weights actually removed.
3. **With retraining** at one fraction: layer fusion retrained under each retraining mode
   (mean / freeze / mix) and iteratively (3 compression steps, exponential schedule),
   versus magnitude pruning (mask kept) and SVD retrained for the same number of steps.
4. Optionally (``--smollm``), SmolLM2-135M perplexity on held-out windows
   (``lfgraph.calibration``) without retraining: layer fusion (Euclidean metric by default,
   the paper's Table 2 "layer averaging"; Bures needs ~10 min of analysis on one core)
   beside pruning and SVD (``--smollm-methods`` adds ``kmeans``/``dae``, slower).

Equal compression: layer fusion's planner target is a share of *all* parameters, so it is
asked for ``f × layer weights / all parameters``. It removes whole layers, so it overshoots
(by up to one layer); each baseline is then run at the share layer fusion actually removed,
and the achieved share is printed beside every number.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lfgraph_study.baselines import BASELINES, compress_baseline, compression_stats, layer_weight_count
from lfgraph.errors import LfgraphError
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.passes.analysis import analyze
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan
from lfgraph_study.loops import iterative_compress, retrain, retraining_steps
from lfgraph_study.zoo import ResNetCNN

CLASSES, SIZE = 10, 16


# --------------------------------------------------------------------------- task


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` labelled images: a class template, random brightness, ±3 px shift, strong noise."""
    templates = F.interpolate(
        torch.randn(CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )
    templates = templates / templates.flatten(1).std(1)[:, None, None, None]
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=g)
    x = templates[y] * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 1.8 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    shifts = torch.randint(-3, 4, (n, 2), generator=g).tolist()
    x = torch.stack([torch.roll(xi, (a, b), (1, 2)) for xi, (a, b) in zip(x, shifts)])
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x) - size + 1, size)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches(x, y, 250)) / len(y))


def train_cnn(steps: int, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> ResNetCNN:
    torch.manual_seed(0)
    model = ResNetCNN()
    data = batches(x, y, batch)
    return retrain(model, [], "mean", data, steps=steps, lr=3e-3, progress=False).eval()


# --------------------------------------------------------------------------- layer fusion


_ANALYSES: dict[tuple[int, str], tuple[Any, Any]] = {}


def lf_plan(model: nn.Module, example: tuple[Any, ...], fraction: float, scope: str, metric: str = "bures") -> tuple[Any, Any]:
    """The planner's tie plan that removes ``fraction`` of the layer weights.

    The graph and the all-pairs analysis depend only on the model, so they are made once
    per model and metric (on SmolLM2 they take about a minute and a half on one core).
    """
    key = (id(model), metric)
    if key not in _ANALYSES:
        graph = build_layer_graph(model, example)
        _ANALYSES[key] = (graph, analyze(graph, metric))
    graph, analysis = _ANALYSES[key]
    target = fraction * layer_weight_count(model) / graph.total_params
    plan = make_plan(
        graph, metric=metric, target=target, target_kind="params", scope=scope, mode="tie", fuse="mean", align=False, analysis=analysis
    )
    return graph, plan


def lf_compress(model: nn.Module, example: tuple[Any, ...], fraction: float, scope: str, metric: str = "bures") -> nn.Module:
    graph, plan = lf_plan(model, example, fraction, scope, metric)
    return apply_plan(model, graph, plan).model.eval()


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, inputs: list[torch.Tensor]) -> nn.Module:
    """Recompute BatchNorm running statistics on ``inputs`` (no weights change).

    Tying changes what each convolution outputs, so the BatchNorm statistics measured on
    the original network no longer fit; a few forward passes fix that without training.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    model.train()
    for xb in inputs:
        model(xb)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def fused_sets_of(graph: Any, plan: Any) -> list[list[str]]:
    return [[graph.node(f.keep).ref, *(graph.node(a).ref for a in f.absorb)] for f in plan.fusions]


def removed_share(original: nn.Module, compressed: nn.Module) -> float:
    """Share of the original's layer weights gone (tied weights count once)."""
    return 1.0 - layer_weight_count(compressed) / layer_weight_count(original)


# --------------------------------------------------------------------------- tables


def cell(value: float | None, achieved: float | None, fmt: str) -> str:
    if value is None:
        return "n/a"
    return fmt.format(value) + (f" ({achieved:.0%})" if achieved is not None else "")


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print(line.replace("+", "-"))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def no_retraining_rows(
    model: nn.Module,
    example: tuple[Any, ...],
    fractions: list[float],
    evaluate: Callable[[nn.Module], float],
    data: list[Any],
    methods: list[str],
    fmt: str,
    scopes: tuple[str, ...] = ("global", "adjacent"),
    metric: str = "bures",
) -> list[list[str]]:
    """One row per method, one column per target fraction.

    Layer fusion removes whole layers and so overshoots the target; the baselines are then
    run at the share the first LF scope actually removed, so every column compares equal
    compression.
    """
    rows: dict[str, list[str]] = {f"LF tie, {metric}, {scope}": [] for scope in scopes}
    recalibrate = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    bn_row = f"LF tie, {metric}, {scopes[0]} + BN re-estimated"
    if recalibrate:
        rows[bn_row] = []
    rows.update({method: [] for method in methods})
    for f in fractions:
        at = None
        for scope in scopes:
            name = f"LF tie, {metric}, {scope}"
            try:
                out = lf_compress(model, example, f, scope, metric)
                share = removed_share(model, out)
                rows[name].append(cell(evaluate(out), share, fmt))
                if at is None:
                    at = share
                    if recalibrate:
                        rows[bn_row].append(cell(evaluate(reestimate_batchnorm(out, data)), share, fmt))
            except LfgraphError as e:
                print(f"  LF {scope} @ {f:.0%}: {e}", file=sys.stderr)
                rows[name].append(cell(None, None, fmt))
                if recalibrate and scope == scopes[0]:
                    rows[bn_row].append(cell(None, None, fmt))
        for method in methods:
            t0 = time.time()
            out = compress_baseline(model, method, f if at is None else at, data=data)
            rows[method].append(cell(evaluate(out), compression_stats(out)["achieved"], fmt))
            print(f"  {method} @ {f:.0%}: {time.time() - t0:.1f} s", file=sys.stderr)
    return [[name, *cells] for name, cells in rows.items()]


# --------------------------------------------------------------------------- retraining


def retrain_pruned(model: nn.Module, data: list[Any], steps: int, lr: float) -> nn.Module:
    """Fine-tune a pruned model with its zeros kept (gradients masked)."""
    handles = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(w, nn.Parameter):
            mask = (w.detach() != 0).to(w.dtype)
            handles.append(w.register_hook(lambda g, mask=mask: g * mask))
    retrain(model, [], "mean", data, steps=steps, lr=lr, progress=False)
    for h in handles:
        h.remove()
    return model


def retraining_rows(
    model: nn.Module, example: tuple[Any, ...], fraction: float, steps: int, data: list[Any], evaluate: Callable[[nn.Module], float], lr: float
) -> list[list[str]]:
    rows = []
    graph, plan = lf_plan(model, example, fraction, "global")
    sets = fused_sets_of(graph, plan)
    tied = apply_plan(model, graph, plan).model
    share = removed_share(model, tied)
    rows.append(["LF (global bures), no retraining", cell(evaluate(tied), share, "{:.1%}"), "0"])
    for mode in ("mean", "freeze", "mix"):
        t0 = time.time()
        out = retrain(copy.deepcopy(model), sets, mode, data, steps=steps, lr=lr, progress=False)
        rows.append([f"LF {mode}, retrained", cell(evaluate(out), removed_share(model, out), "{:.1%}"), str(steps)])
        print(f"  LF {mode} retrain: {time.time() - t0:.1f} s", file=sys.stderr)
    t0 = time.time()
    target = fraction * layer_weight_count(model) / sum(p.numel() for p in model.parameters())
    out, history = iterative_compress(
        model, example, data, target, compression_steps=3, steps_per_compression=retraining_steps(steps, 3, "exponential"),
        mode="mean", schedule_kind="exponential", lr=lr, progress=False,
    )
    fractions = ", ".join(f"{h.achieved:.0%}" for h in history[1:])
    rows.append([f"LF mean, iterative x3 (exp.; {fractions})", cell(evaluate(out), removed_share(model, out), "{:.1%}"), str(steps)])
    print(f"  LF iterative: {time.time() - t0:.1f} s", file=sys.stderr)
    for method in ("prune-layer", "prune-global", "svd"):
        t0 = time.time()
        compressed = compress_baseline(model, method, share)  # equal to what LF removed
        before = evaluate(compressed)
        compressed.train()
        if method.startswith("prune"):
            out = retrain_pruned(compressed, data, steps, lr)
        else:
            out = retrain(compressed, [], "mean", data, steps=steps, lr=lr, progress=False)
        achieved = compression_stats(compressed)["achieved"]
        rows.append([f"{method}, no retraining", cell(before, achieved, "{:.1%}"), "0"])
        rows.append([f"{method}, retrained", cell(evaluate(out), achieved, "{:.1%}"), str(steps)])
        print(f"  {method} retrain: {time.time() - t0:.1f} s", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- SmolLM2


def smollm_rows(fractions: list[float], methods: list[str], n_windows: int, seq_len: int, metric: str) -> tuple[float, list[list[str]]]:
    from lfgraph.calibration import calibration_windows, heldout_windows, perplexity
    from lfgraph.models import load_model

    loaded = load_model("smollm2")
    model = loaded.module.eval()
    windows = heldout_windows(loaded.tokenizer, n_windows, seq_len)
    data = list(calibration_windows(loaded.tokenizer, 4, seq_len).split(2))

    def ppl(m: nn.Module) -> float:
        with torch.no_grad():
            return perplexity(m, windows, batch_size=2)

    base = ppl(model)
    rows = no_retraining_rows(model, loaded.example_inputs, fractions, ppl, data, methods, "{:.2f}", ("global", "adjacent"), metric)
    return base, rows


def cnn_tables(args: argparse.Namespace) -> None:
    """Train the CNN, then print the no-retraining and retraining tables."""
    start = time.time()
    xtr, ytr = synthetic_images(8192, seed=1)
    xte, yte = synthetic_images(1000, seed=2)
    train = batches(xtr, ytr, 64)
    cnn = train_cnn(args.train_steps, xtr, ytr)
    example = (xte[:2],)

    def evaluate(m: nn.Module) -> float:
        return accuracy(m, xte, yte)

    base = evaluate(cnn)
    print(
        f"ResNetCNN: {sum(p.numel() for p in cnn.parameters())} parameters, {layer_weight_count(cnn)} in conv/fc weights; "
        f"trained {args.train_steps} steps in {time.time() - start:.0f} s; test accuracy {base:.1%}",
        flush=True,
    )
    header = ["method (no retraining)", *(f"target {f:.0%}" for f in args.fractions)]
    rows = no_retraining_rows(cnn, example, args.fractions, evaluate, [xb for xb, _ in train[:8]], sorted(BASELINES), "{:.1%}")
    print_table(
        f"CNN test accuracy without retraining (original {base:.1%}). In parentheses: share of conv/fc weights removed\n"
        "(kmeans: share of distinct values removed). LF removes whole layers and overshoots the target; the baselines\n"
        "are run at the share LF-global removed. 'BN re-estimated': BatchNorm statistics recomputed on 8 training\n"
        "batches (no training; dae also uses those batches).",
        header, rows,
    )
    sys.stdout.flush()

    if not args.skip_retraining:
        rows = retraining_rows(cnn, example, args.retrain_fraction, args.retrain_steps, train, evaluate, args.lr)
        print_table(
            f"CNN test accuracy at a {args.retrain_fraction:.0%} target, with retraining (original {base:.1%}); "
            "baselines at the share LF removed",
            ["method", "accuracy (removed)", "retraining steps"], rows,
        )
        sys.stdout.flush()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--train-steps", type=int, default=250)
    ap.add_argument("--retrain-steps", type=int, default=200)
    ap.add_argument("--retrain-fraction", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-retraining", action="store_true")
    ap.add_argument("--skip-cnn", action="store_true", help="only the SmolLM2 part (with --smollm)")
    ap.add_argument("--smollm", action="store_true", help="also compare on SmolLM2-135M (perplexity)")
    ap.add_argument("--smollm-methods", nargs="+", default=["prune-layer", "prune-global", "svd"], choices=sorted(BASELINES))
    ap.add_argument("--smollm-windows", type=int, default=8)
    ap.add_argument(
        "--smollm-metric", default="euclidean",
        help="LF metric on SmolLM2 (the paper's Table 2 'layer averaging (Euclidean distance)'; bures takes ~10 min on one core)",
    )
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()

    if not args.skip_cnn:
        cnn_tables(args)
    if args.smollm:
        t0 = time.time()
        base_ppl, rows = smollm_rows(args.fractions, args.smollm_methods, args.smollm_windows, args.seq_len, args.smollm_metric)
        print_table(
            f"SmolLM2-135M held-out perplexity without retraining (original {base_ppl:.2f}; "
            f"{args.smollm_windows} windows x {args.seq_len} tokens). In parentheses: share of linear weights removed\n"
            "(the tied embedding/LM head is never compressed); the baselines are run at the share LF removed.",
            ["method (no retraining)", *(f"target {f:.0%}" for f in args.fractions)], rows,
        )
        print(f"(SmolLM2 part: {time.time() - t0:.0f} s)")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
