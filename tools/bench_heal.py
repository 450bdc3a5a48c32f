"""Healing benchmark on SmolLM2-135M: held-out perplexity one-shot and while healing.

For each fraction of decoder layers removed (default 25 %), the model is rewritten once
(``pipeline.plan_model`` with Block Influence selection and the calibrated fusion, the
causal-LM default), then healed by distillation from the original on the calibration text
under each trainable set (``all``, ``neighbors``, ``lora``) for the same number of steps,
held-out perplexity measured every ``--eval-every`` steps. CPU seconds (``process_time``,
held-out evaluation excluded) and tokens/s are measured for every setting in one run.

    OMP_NUM_THREADS=1 python tools/bench_heal.py --fractions 0.25 --steps 40 --out heal.json

``python tools/bench_heal.py gamma`` instead measures whether eq. 6's γ matters for the
``freeze`` retraining mode (tiny MLP task, γ as eq. 6 gives it vs 0 vs ½).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from lfgraph import pipeline
from lfgraph.calibration import heldout_windows, mean_nll
from lfgraph.fileio import write_text_atomic
from lfgraph.retrain.heal import HealConfig, heal


def cpu_clock() -> float:
    return time.process_time()


def steps_for_budget(compressed: torch.nn.Module, teacher: torch.nn.Module, calib: torch.Tensor, plan, trainable: str,
                     args: argparse.Namespace, minutes: float, probe_steps: int = 4) -> int:
    """Steps that fill ``minutes`` of CPU time, from a short probe run on a copy.

    The probe's time includes setting up (e.g. wrapping LoRA adapters), so the estimate
    errs on the short side; the curve records the CPU time actually spent.
    """
    probe = copy.deepcopy(compressed)
    c = cpu_clock()
    heal(probe, teacher, calib, HealConfig(steps=probe_steps, batch_size=args.batch_size, trainable=trainable, plan=plan,
                                           lr=args.lr.get(trainable), progress=False, keep_best=False))
    per_step = (cpu_clock() - c) / probe_steps
    steps = max(1, int(minutes * 60 / per_step))
    print(f"  {trainable}: {per_step:.1f} CPU-s/step -> {steps} steps for {minutes:g} CPU-min", file=sys.stderr, flush=True)
    return steps


def budget_for(args: argparse.Namespace, trainable: str) -> float | None:
    """The CPU-minute budget of ``trainable``: ``--cpu-minutes`` gives one for all sets or
    one per set of ``--trainable``, in order; None = run ``--steps``."""
    if not args.cpu_minutes:
        return None
    if len(args.cpu_minutes) == 1:
        return args.cpu_minutes[0]
    if len(args.cpu_minutes) != len(args.trainable):
        raise SystemExit(f"--cpu-minutes: give one budget, or one per trainable set ({len(args.trainable)})")
    return args.cpu_minutes[args.trainable.index(trainable)]


def run_lm(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = pipeline.load("smollm2")
    graph = pipeline.trace(model)
    calib = pipeline.calibration_tokens(model, args.windows, args.seq_len)
    held = heldout_windows(model.tokenizer, args.heldout, args.heldout_len)
    nll = lambda m: mean_nll(m, held, batch_size=4)  # noqa: E731
    with torch.no_grad():
        base = nll(model.module)
    print(f"original: held-out ppl {math.exp(base):.2f}", file=sys.stderr, flush=True)
    out = {"original_ppl": math.exp(base), "settings": args.__dict__, "fractions": {}}
    for fraction in args.fractions:
        plan = pipeline.plan_model(model, graph, fraction, mode="merge", select="block_influence", fuse="calibrated",
                                   calibration=calib[: args.select_windows], progress=False)
        compressed = pipeline.rewrite(model, graph, plan, calibration=calib[: args.select_windows], progress=False).model.eval()
        with torch.no_grad():
            one_shot = nll(compressed)
        print(f"{fraction:.0%}: one-shot ppl {math.exp(one_shot):.2f}", file=sys.stderr, flush=True)
        rows = {}
        for trainable in args.trainable:
            budget = budget_for(args, trainable)
            steps = args.steps if budget is None else steps_for_budget(compressed, model.module, calib, plan, trainable, args, budget)
            student = copy.deepcopy(compressed)
            cpu0 = cpu_clock()
            marks: list[tuple[int, float, float]] = []
            eval_cpu = [0.0]

            def evaluate(m: torch.nn.Module) -> float:
                c = cpu_clock()
                value = nll(m)
                marks.append((len(marks), value, c - cpu0 - eval_cpu[0]))
                print(f"  eval {trainable}: ppl {math.exp(value):.2f} after {marks[-1][2] / 60:.2f} CPU-min", file=sys.stderr, flush=True)
                eval_cpu[0] += cpu_clock() - c
                return value

            cfg = HealConfig(steps=steps, batch_size=args.batch_size, trainable=trainable, plan=plan,
                             lr=args.lr.get(trainable), eval_every=args.eval_every, evaluate=evaluate,
                             progress=True, desc=f"{fraction:.0%} {trainable}", keep_best=False, warmup=0.1)
            res = heal(student, model.module, calib, cfg)
            curve = [{"step": s, "ppl": math.exp(v), "cpu_min": cpu_m / 60, "wall_train_s": w}
                     for (s, v, w), (_, _, cpu_m) in zip(res.evals, marks)]
            rows[trainable] = {"steps": steps, "curve": curve, "tokens_per_s": res.tokens_per_second, "trainable_params": res.trainable_params,
                               "lr": cfg.learning_rate, "train_loss": res.losses}
            print(f"  {trainable}: {[(c['step'], round(c['ppl'], 2), round(c['cpu_min'], 2)) for c in curve]} "
                  f"{res.tokens_per_second:.0f} tok/s", file=sys.stderr, flush=True)
            out["fractions"][str(fraction)] = {"one_shot_ppl": math.exp(one_shot), "removed": plan.absorbed, "rows": rows}
            if args.out:  # after every setting, so a run cut short keeps what it measured
                write_text_atomic(args.out, json.dumps(out, indent=1))
    return out


def table(out: dict) -> str:
    lines = ["| removed | trainable | lr | trainable params | step | CPU-min | held-out ppl | gap closed | tokens/CPU-s | tokens/s (wall) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = out["original_ppl"]
    per_step = out["settings"]["batch_size"] * out["settings"]["seq_len"]
    for fraction, f in out["fractions"].items():
        one = f["one_shot_ppl"]
        lines.append(f"| {float(fraction):.0%} | one-shot | | | 0 | 0 | {one:.2f} | 0 % | | |")
        for trainable, r in f["rows"].items():
            for c in r["curve"]:
                closed = (one - c["ppl"]) / (one - base) if one != base else float("nan")
                lines.append(f"| {float(fraction):.0%} | {trainable} | {r['lr']:.0e} | {r['trainable_params'] / 1e6:.1f} M | {c['step']} | "
                             f"{c['cpu_min']:.1f} | {c['ppl']:.2f} | {closed:.0%} | {c['step'] * per_step / (60 * c['cpu_min']):.0f} | "
                             f"{r['tokens_per_s']:.0f} |")
    return f"original held-out ppl {base:.2f}\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- eq. 6's gamma


def run_gamma(args: argparse.Namespace) -> str:
    """Retrain a fused pair of a trained MLP under ``freeze`` with γ from eq. 6, 0 and ½.

    Only the fused pair trains (the paper's scheme (2)), so the rest of the network cannot
    make up for what the pair's retraining misses; the loss is measured on held-out samples.
    """
    import torch.nn.functional as F

    from lfgraph_study.loops import retrain
    from lfgraph.retrain.modes import install_retrain_mode
    from lfgraph_study.zoo import MLP

    torch.set_num_threads(1)
    rows = ["| seed | γ (eq. 6) | held-out loss, tied untrained | γ = eq. 6 | γ = 0 | γ = ½ | mean mode |",
            "|---|---|---|---|---|---|---|"]
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2048, 16, generator=g)
        y = (torch.tanh(x @ torch.randn(16, 16, generator=g)) @ torch.randn(16, 4, generator=g)).argmax(1)
        xt, yt, xh, yh = x[:1536], y[:1536], x[1536:], y[1536:]
        data = [(xt[i : i + 64], yt[i : i + 64]) for i in range(0, len(xt), 64)]
        torch.manual_seed(seed)
        model = MLP(16, 64, 4, 4)
        retrain(model, [], "mean", data, steps=400, lr=1e-2, progress=False)  # a trained network

        def loss(m: torch.nn.Module) -> float:
            with torch.no_grad():
                return float(F.cross_entropy(m.eval()(xh), yh))

        pair = [["net.2", "net.4"]]
        gamma = install_retrain_mode(copy.deepcopy(model), pair, "freeze").info()[0]["gamma"]
        gamma = float(next(iter(gamma.values())))
        before = loss(retrain(copy.deepcopy(model), pair, "freeze", data, steps=0, progress=False))
        common = dict(steps=args.gamma_steps, lr=3e-3, progress=False, trainable="fused")
        results = []
        for override in (None, 0.0, 0.5):
            opts = {} if override is None else {"gamma": override}
            results.append(loss(retrain(copy.deepcopy(model), pair, "freeze", data, mode_options=opts, **common)))
        mean = loss(retrain(copy.deepcopy(model), pair, "mean", data, **common))
        rows.append(f"| {seed} | {gamma:.4f} | {before:.4f} | " + " | ".join(f"{r:.4f}" for r in results) + f" | {mean:.4f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="lm", choices=["lm", "gamma", "table"])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25])
    p.add_argument("--trainable", nargs="+", default=["all", "neighbors", "lora"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cpu-minutes", type=float, nargs="+", default=None,
                   help="instead of --steps: as many steps as fill this much CPU time (probed), one budget for every "
                        "trainable set or one per set of --trainable")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=int, default=128, help="calibration windows to heal on")
    p.add_argument("--select-windows", type=int, default=16, help="calibration windows for selection and the calibrated fusion")
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--heldout-len", type=int, default=256)
    p.add_argument("--lr-all", type=float, default=None)
    p.add_argument("--lr-neighbors", type=float, default=None)
    p.add_argument("--lr-lora", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--gamma-steps", type=int, default=60)
    p.add_argument("--out", default=None, help="JSON results (written after each setting); 'table' reads it")
    args = p.parse_args()
    if args.what == "gamma":
        print(run_gamma(args))
        return
    if args.what == "table":
        print(table(json.loads(Path(args.out).read_text())))
        return
    args.lr = {"all": args.lr_all, "neighbors": args.lr_neighbors, "lora": args.lr_lora}
    out = run_lm(args)
    del args.lr
    print(table(out))


if __name__ == "__main__":
    main()
