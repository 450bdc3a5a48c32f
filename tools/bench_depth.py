"""Depth-reduction benchmark: every selection x fusion combination, one shot, no training.

Language model (SmolLM2-135M-Instruct, 30 decoder layers): drop 10%, 20%, 30% of the layers
(3, 6, 9) with each selection criterion (Block Influence = ShortGPT, angular distance =
Gromov et al., SLEB, weight similarity) and each fusion rule (remove, mean, aligned mean,
calibrated); print held-out perplexity on the bundled corpus's held-out part and the
seconds spent selecting and fusing. The reference is the better of ShortGPT and Gromov
deletion at each level.

Vision (``zoo.ResNetCNN`` trained for under a minute on a synthetic but learnable task):
drop 1 and 2 identity-skip blocks, same grid, test accuracy.

Run (about 20-40 minutes on 2 busy CPU cores with the defaults):

    python tools/bench_depth.py                 # both parts
    python tools/bench_depth.py --no-cnn --levels 3 6
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lfgraph import calibration as C
from lfgraph.passes.block_stack import remove_blocks, split_block_name
from lfgraph.passes.calibrated_fusion import calibrated_merge_plan
from lfgraph.passes.selection import Run, angular, block_influence_scores, runs_from_dropped, runs_to_plan, runs_from_order, similarity, sleb_order

SELECTIONS = ("block_influence", "angular", "sleb", "similarity")
FUSIONS = ("remove", "mean", "aligned-mean", "calibrated")
PENDING = "pending"


@dataclass
class Cell:
    value: float | str
    select_s: float
    fuse_s: float
    runs: str
    extra: str = ""


def _apply_plan() -> Callable[..., Any] | None:
    try:
        from lfgraph.passes.rewrite_torch import apply_plan
    except ImportError:
        return None
    return apply_plan


def fuse(model: nn.Module, graph: Any, runs: list[Run], container: str, fusion: str, calib: torch.Tensor, calib_options: dict) -> nn.Module | str:
    """The compressed model for one combination, or ``PENDING`` when the rule is unavailable."""
    apply_plan = _apply_plan()
    if fusion == "calibrated":
        plan = runs_to_plan(runs, container, fuse="calibrated")
        return calibrated_merge_plan(model, plan, calib, **calib_options).model
    if fusion == "remove":
        if apply_plan is not None and graph is not None:
            return apply_plan(model, graph, runs_to_plan(runs, container, fuse="remove")).model
        out = copy.deepcopy(model)
        remove_blocks(out, [f"{container}.{i}" for r in runs for i in r.absorb])
        return out
    if apply_plan is None or graph is None:
        return PENDING
    plan = runs_to_plan(runs, container, fuse="mean", align=(fusion == "aligned-mean"))
    return apply_plan(model, graph, plan).model


def run_grid(
    title: str, model: nn.Module, graph: Any, names: list[str], levels: list[int], selections: list[str], fusions: list[str],
    select_data: torch.Tensor, sleb_data: torch.Tensor, calib: torch.Tensor, score: Callable[[nn.Module], tuple[float, str]],
    metric: str, lower_is_better: bool, calib_options: dict, batch_size: int,
) -> dict[int, dict[tuple[str, str], Cell]]:
    """Select, fuse and score every combination; print one table per level as it completes."""
    container = split_block_name(names[0])[0]
    allowed = sorted(split_block_name(n)[1] for n in names)
    selected: dict[str, dict[int, tuple[list[Run], float]]] = {s: {} for s in selections}

    if "block_influence" in selections:
        t = time.perf_counter()
        bi = block_influence_scores(model, names, select_data, batch_size)
        dt = time.perf_counter() - t
        order = sorted(allowed, key=lambda i: (bi[i], i))
        for n in levels:
            selected["block_influence"][n] = (runs_from_order(order, allowed, n, bi), dt)
    if "angular" in selections:
        for n in levels:
            t = time.perf_counter()
            runs = angular(model, names, select_data, n, batch_size=batch_size)
            selected["angular"][n] = (runs, time.perf_counter() - t)
    if "sleb" in selections:
        t = time.perf_counter()
        stamps: list[float] = []
        order_sleb = sleb_order(model, names, sleb_data, max(levels), batch_size=batch_size, on_step=lambda *_: stamps.append(time.perf_counter() - t))
        for n in levels:
            selected["sleb"][n] = (runs_from_dropped([i for i, _ in order_sleb[:n]], allowed, dict(order_sleb[:n])), stamps[n - 1])
    if "similarity" in selections:
        from lfgraph.passes.analysis import analyze

        t = time.perf_counter()
        analysis = analyze(graph, "bures", scope="adjacent") if graph is not None else None
        dt = time.perf_counter() - t
        for n in levels:
            t = time.perf_counter()
            if graph is None:
                selected["similarity"][n] = ([], 0.0)
                continue
            runs = similarity(model, names, None, n, graph=graph, analysis=analysis)
            selected["similarity"][n] = (runs, dt + time.perf_counter() - t)

    original, _ = score(model)
    print(f"\n{title}: original {metric} {original:.3f}", flush=True)
    results: dict[int, dict[tuple[str, str], Cell]] = {}
    cache: dict[tuple[str, str], tuple[float | str, str, float]] = {}
    for n in levels:
        results[n] = {}
        for s in selections:
            runs, sel_s = selected[s][n]
            desc = " ".join(f"[{r.blocks[0]}-{r.blocks[-1]}:{r.keep}]" for r in runs) or "-"
            for f in fusions:
                if not runs:
                    results[n][(s, f)] = Cell(PENDING, sel_s, 0.0, desc)
                    continue
                key = (repr([(r.blocks, r.keep) for r in runs]), f)
                if key not in cache:  # two criteria that pick the same runs share one result
                    t = time.perf_counter()
                    out = fuse(model, graph, runs, container, f, calib, calib_options)
                    fuse_s = time.perf_counter() - t
                    value, extra = (out, "") if isinstance(out, str) else score(out)
                    cache[key] = (value, extra, fuse_s)
                    del out
                value, extra, fuse_s = cache[key]
                results[n][(s, f)] = Cell(value, sel_s, fuse_s, desc, extra)
        print_level(title, n, results[n], original, metric, lower_is_better, total_blocks=_stack_len(model, container))
    return results


def _stack_len(model: nn.Module, container: str) -> int:
    return len(model.get_submodule(container))


def print_level(title: str, n: int, cells: dict[tuple[str, str], Cell], original: float, metric: str, lower_is_better: bool, total_blocks: int) -> None:
    print(f"\n{title} -- drop {n} of {total_blocks} blocks ({100 * n / total_blocks:.0f}%); original {metric} {original:.3f}")
    print(f"{'selection':<16} {'fusion':<13} {metric:>9} {'select_s':>9} {'fuse_s':>8}  runs [first-last:kept]")
    for (s, f), c in cells.items():
        v = c.value if isinstance(c.value, str) else f"{c.value:.3f}"
        print(f"{s:<16} {f:<13} {v:>9} {c.select_s:>9.1f} {c.fuse_s:>8.1f}  {c.runs}{'  ' + c.extra if c.extra else ''}")
    numeric = {k: c.value for k, c in cells.items() if not isinstance(c.value, str)}
    if not numeric:
        return
    pick = min if lower_is_better else max
    best = pick(numeric, key=numeric.__getitem__)
    deletions = {k: numeric[k] for k in (("block_influence", "remove"), ("angular", "remove")) if k in numeric}
    line = f"best: {best[0]} + {best[1]} = {numeric[best]:.3f}"
    if deletions:
        ref = pick(deletions, key=deletions.__getitem__)
        line += f"; better of ShortGPT/Gromov deletion: {ref[0]} + remove = {deletions[ref]:.3f}"
        if lower_is_better:
            line += f"; ratio best/deletion = {numeric[best] / deletions[ref]:.3f}"
    print(line, flush=True)


# ---------------------------------------------------------------------------------------
# language model
# ---------------------------------------------------------------------------------------


def bench_lm(args: argparse.Namespace) -> None:
    from lfgraph.frontends.torch_fx import build_layer_graph
    from lfgraph.models import load_model

    lm = load_model("smollm2")
    model, tok = lm.module, lm.tokenizer
    n_layers = len(lm.hf_model.model.layers)
    names = [f"model.model.layers.{i}" for i in range(n_layers)]
    held = C.heldout_windows(tok, args.heldout_windows, args.seq_len)
    calib = C.calibration_windows(tok, args.calib_windows, args.seq_len)
    select_data = calib[:: max(1, args.calib_windows // args.select_windows)][: args.select_windows]
    sleb_data = C.calibration_windows(tok, args.sleb_windows, args.sleb_seq_len)
    graph = None
    if "similarity" in args.selections or any(f in ("mean", "aligned-mean") for f in args.fusions):
        t = time.perf_counter()
        graph = build_layer_graph(model, lm.example_inputs, model_name=lm.name)
        print(f"layer graph built in {time.perf_counter() - t:.1f} s", flush=True)
    print(
        f"SmolLM2-135M: held-out {args.heldout_windows} x {args.seq_len} tokens, calibration {args.calib_windows} x {args.seq_len} "
        f"(selection {select_data.shape[0]} windows, SLEB {args.sleb_windows} x {args.sleb_seq_len}); apply_plan "
        f"{'available' if _apply_plan() else 'missing (mean columns pending)'}",
        flush=True,
    )
    run_grid(
        "SmolLM2-135M", model, graph, names, args.levels, args.selections, args.fusions, select_data, sleb_data, calib,
        lambda m: (C.perplexity(m, held, batch_size=args.batch_size), ""), "ppl", True, {"batch_size": args.batch_size}, args.batch_size,
    )


# ---------------------------------------------------------------------------------------
# ResNet-style CNN on a synthetic, learnable task
# ---------------------------------------------------------------------------------------


def synthetic_images(n: int, classes: int = 10, size: int = 16, seed: int = 0, noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of class-dependent smooth patterns, randomly shifted, scaled and noised."""
    g = torch.Generator().manual_seed(1234)  # the same templates for every split
    coarse = torch.randn(classes, 3, 4, 4, generator=g)
    templates = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y]
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(a), int(b)), dims=(1, 2)) for img, (a, b) in zip(x, shifts)])
    x = x * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + noise * torch.randn(x.shape, generator=g)
    return x, y


def train_cnn(steps: int, seed: int = 0) -> nn.Module:
    """``zoo.ResNetCNN`` trained for a fixed number of Adam steps (deterministic; ~1 minute)."""
    from lfgraph_study.zoo import ResNetCNN, train_classifier

    torch.manual_seed(seed)
    model = ResNetCNN(stages=((16, 3), (32, 3)), num_classes=10)
    x, y = synthetic_images(6000, seed=1)
    t0 = time.perf_counter()
    loss = train_classifier(model, x, y, steps, seed)
    print(f"CNN trained {steps} steps (batch 64) in {time.perf_counter() - t0:.0f} s, last loss {float(loss):.3f}", flush=True)
    return model


def bench_cnn(args: argparse.Namespace) -> None:
    from lfgraph.frontends.torch_fx import build_layer_graph

    model = train_cnn(args.cnn_train_steps)
    x_test, y_test = synthetic_images(3000, seed=2)
    x_cal, _ = synthetic_images(args.cnn_calib, seed=3)
    graph = build_layer_graph(model, (x_test[:2],), model_name="ResNetCNN")
    with torch.no_grad():
        reference = model(x_test).argmax(-1)

    def score(m: nn.Module) -> tuple[float, str]:
        # agreement with the original's predictions: how faithfully the compressed model
        # reproduces it (accuracy alone can rise when an undertrained block is dropped)
        with torch.no_grad():
            agree = float((m(x_test).argmax(-1) == reference).float().mean())
        return C.accuracy(m, x_test, y_test), f"agrees with original {agree:.3f}"

    names = [b.name for b in graph.removable_blocks()]
    print(f"ResNetCNN: removable blocks {names}; test {x_test.shape[0]} images, calibration {x_cal.shape[0]}", flush=True)
    run_grid(
        "ResNetCNN", model, graph, names, args.cnn_levels, args.selections, args.fusions, x_cal[:256], x_cal[:128], x_cal,
        score, "accuracy", False, {"batch_size": 64}, 64,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, nargs="+", default=[3, 6, 9], help="decoder layers to drop (of 30)")
    p.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
    p.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=FUSIONS)
    p.add_argument("--heldout-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=64, help="windows for the calibrated fit (a quarter chooses the ridge strength)")
    p.add_argument("--select-windows", type=int, default=8, help="calibration windows read by Block Influence and angular distance")
    p.add_argument("--sleb-windows", type=int, default=2)
    p.add_argument("--sleb-seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-lm", action="store_true")
    p.add_argument("--no-cnn", action="store_true")
    p.add_argument("--cnn-levels", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cnn-train-steps", type=int, default=200)
    p.add_argument("--cnn-calib", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not args.no_cnn:
        bench_cnn(args)
    if not args.no_lm:
        bench_lm(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
