"""The paper's Table 1 on this project's CNNs: layer fusion by weight tying at 25-80% of the
parameters, one shot and after retraining with each retraining mode (mean, freeze, mix).

For each model (a ResNet-style CNN and a WideResNet-style one: the same basic blocks, 2x
wider and half as deep), trained by this script on the synthetic 10-class task of the
study's vision track (scikit-learn, for its digits, is not installed here), and each
fraction of parameters to make redundant:

- one shot: the planner ties the closest layers (``make_plan(mode="tie")``, Bures metric,
  global ranking) and each tie set takes the mean of its weights; no training;
- retrained: ``lfgraph_study.loops.iterative_compress`` in 3 compression steps on the paper's
  exponential curriculum, the retraining budget split exponentially over the steps
  (more later), under each retraining mode; the task loss on the training images;
- reference: the uncompressed model trained for the same extra steps (so that a gain from
  more training is not read as a gain from fusion).

Test accuracy on held-out images. Writes ``table1.json`` and ``table1.md`` to ``--out``.

    OMP_NUM_THREADS=1 python tools/study_table1.py --out docs/study/cnn
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from lfgraph.calibration import accuracy
from lfgraph.errors import LfgraphError
from lfgraph.fileio import write_text_atomic
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan, unique_parameter_count
from lfgraph_study.loops import iterative_compress
from lfgraph.retrain.schedule import retraining_steps
from lfgraph_study.study import synthetic_images
from lfgraph_study.zoo import ResNetCNN, train_classifier, wide_resnet

MODELS = {
    "resnet": ("ResNet-style: 2 stages x 8 basic blocks, 16/32 channels", lambda: ResNetCNN(stages=((16, 8), (32, 8)))),
    "wide-resnet": ("WideResNet-style: 2 stages x 4 basic blocks, widen factor 2 (32/64 channels)", lambda: wide_resnet(widen=2, blocks=4)),
}
MODES = ("mean", "freeze", "mix")


def one_shot(model: nn.Module, example: torch.Tensor, fraction: float, metric: str) -> tuple[nn.Module, float]:
    graph = build_layer_graph(model, (example,))
    plan = make_plan(graph, metric=metric, target=fraction, target_kind="params", scope="global", mode="tie", fuse="mean", align=False)
    tied = apply_plan(model, graph, plan).model.eval()
    return tied, 1.0 - unique_parameter_count(tied) / unique_parameter_count(model)


def run_model(key: str, args: argparse.Namespace, log) -> dict:
    describe, build = MODELS[key]
    x, y = synthetic_images(args.train + args.test, seed=args.seed)
    xtr, ytr, xte, yte = x[: args.train], y[: args.train], x[args.train :], y[args.train :]
    torch.manual_seed(args.seed)
    model = build()
    train_classifier(model, xtr, ytr, args.train_steps, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(args.train, generator=g)
    data = [(xtr[order[i : i + 64]], ytr[order[i : i + 64]]) for i in range(0, args.train - 63, 64)]

    def acc(m: nn.Module) -> float:
        with torch.no_grad():
            return accuracy(m.eval(), xte, yte)

    reference = copy.deepcopy(model)
    train_classifier(reference, xtr, ytr, args.retrain_steps, args.seed + 2, lr=args.lr)
    out = {"model": describe, "params": unique_parameter_count(model), "original": acc(model),
           "original_trained_more": acc(reference), "rows": []}
    log(f"{key}: {out['params']} parameters, accuracy {out['original']:.4f} ({out['original_trained_more']:.4f} after {args.retrain_steps} more steps)")
    schedule = retraining_steps(args.retrain_steps, 3, "exponential")
    for fraction in args.fractions:
        row: dict = {"fraction": fraction}
        try:
            tied, achieved = one_shot(model, xtr[:8], fraction, args.metric)
        except LfgraphError as e:
            row["error"] = str(e)
            out["rows"].append(row)
            log(f"  {fraction:.0%}: {e}")
            continue
        row["one_shot"] = {"accuracy": acc(tied), "achieved": achieved}
        for mode in MODES:
            t0 = time.process_time()
            compressed, history = iterative_compress(
                model, (xtr[:8],), data, fraction, compression_steps=3, steps_per_compression=schedule, mode=mode,
                metric=args.metric, lr=args.lr, progress=False,
            )
            row[mode] = {"accuracy": acc(compressed), "achieved": history[-1].achieved, "cpu_s": round(time.process_time() - t0, 1)}
        out["rows"].append(row)
        log(f"  {fraction:.0%}: one shot {row['one_shot']['accuracy']:.4f} (achieved {achieved:.1%}); "
            + ", ".join(f"{m} {row[m]['accuracy']:.4f}" for m in MODES))
    return out


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "# The paper's Table 1 on the project's CNNs (layer fusion by tying, one shot and retrained)",
        "",
        f"Synthetic 10-class 3x16x16 images (seed {args.seed}): {args.train} for training, {args.test} for test. "
        f"Each model trained {args.train_steps} Adam steps (lr 3e-3). Fusion: tie sets planned by the `{args.metric}` "
        "metric with global ranking at the given fraction of parameters; one shot = each set takes its mean, no "
        f"training. Retrained = `iterative_compress` in 3 steps on the exponential curriculum, {args.retrain_steps} "
        f"AdamW steps in all (lr {args.lr:g}, batch 64, split {retraining_steps(args.retrain_steps, 3, 'exponential')}), "
        "task loss. 'trained more' = the uncompressed model given the same extra steps. Test accuracy; "
        "'achieved' = the share of unique parameters actually removed. Made with `tools/study_table1.py`.",
        "",
    ]
    for key, r in results.items():
        lines += [f"## {r['model']}", "",
                  f"{r['params']:,} parameters; accuracy {r['original']:.4f}, trained more {r['original_trained_more']:.4f}.", "",
                  "| fraction | achieved | one shot | mean | freeze | mix |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {row['fraction']:.0%} | not reachable: {row['error']} | | | | |")
                continue
            best = max(row[m]["accuracy"] for m in MODES)
            cells = [f"**{row[m]['accuracy']:.4f}**" if row[m]["accuracy"] == best else f"{row[m]['accuracy']:.4f}" for m in MODES]
            lines.append(f"| {row['fraction']:.0%} | {row['mean']['achieved']:.1%} | {row['one_shot']['accuracy']:.4f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/study/cnn")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.65, 0.8])
    ap.add_argument("--metric", default="bures")
    ap.add_argument("--train", type=int, default=2048)
    ap.add_argument("--test", type=int, default=768)
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--retrain-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for key in args.models:
        results[key] = run_model(key, args, lambda s: print(s, flush=True))
        write_text_atomic(out / "table1.json", json.dumps({"settings": vars(args), "results": results}, indent=1))
        write_text_atomic(out / "table1.md", markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
