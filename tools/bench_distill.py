"""Distillation benchmark: the default fusion rule's distillation (``calibrated-distill``,
:func:`lfgraph.passes.map_distillation.distill_maps`) before and after a change, against
its FLOP floor on this machine.

For each model, the closed-form refit runs once per process, then ``distill_maps`` is timed
(wall and CPU seconds) with the default settings (120 steps, batch 2, 72 windows sampled
from the original, the blocks around each cut training with the maps) or those given. The
code under test is imported from a folder: ``--before REV`` extracts the package at a git
revision (default: the branch point with main) into a temporary folder; the working tree is
"after"; "before-passive" is the old code with OpenMP's passive wait policy, which the new
code sets on import. Each (model, code) runs in its own process, alternating before/after, so that the
noise of a shared machine falls on both.

The floor is the issue's: ``6 x P_path x tokens + 2 x P_teacher x tokens`` FLOPs (a forward
and backward through the trained path, a teacher forward, per training token), divided by
this machine's fp32 matmul rate measured in the same process right before and after the
run (a 2048 x 2048 product, best of 5, the mean of the two). ``P_path``: the matmul
parameters a training step passes through, from the lowest trained block up (the blocks
and the output head); ``P_teacher``: the teacher's blocks and head. The embedding lookup is
no matmul and is not counted; neither is sampling (shown apart).

    python tools/bench_distill.py                              # toy and SmolLM2, defaults
    python tools/bench_distill.py --models toy --steps 40 --sampled 24 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Runs fused per model (block indices, the first kept): SmolLM2's are the main job's plan
#: at 25% (Block Influence); the toy's one run of two.
RUNS = {"smollm2": [list(range(11, 18)), list(range(24, 27))], "toy": [[1, 2]]}


# --------------------------------------------------------------------------- child


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an ``n x n`` product on this machine now (best of ``repeats``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def build(model_name: str):
    """(teacher, calibration windows 16 x 256): SmolLM2, or a 4-layer random Llama with
    SmolLM2's vocabulary (6.4M parameters, most of them the tied embedding)."""
    import torch

    from transformers import LlamaConfig, LlamaForCausalLM

    from lfgraph.models import CausalLMLogits, load_model
    from lfgraph.pipeline import calibration_tokens

    loaded = load_model("smollm2")
    calib = calibration_tokens(loaded, 16, 256)
    if model_name == "smollm2":
        return loaded.module.eval(), calib
    del loaded
    # built here, not from lfgraph_study.zoo: the child runs on the lfgraph package alone (extract())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    toy = CausalLMLogits(LlamaForCausalLM(cfg).eval()).eval()
    return toy, calib


def matmul_params(model, first: int = 0) -> int:
    """Matmul parameters from block ``first`` of the stack up: the blocks and the head."""
    from lfgraph.models import inner_hf_model  # in the before and the after code alike

    stack = max((m for m in model.modules() if type(m).__name__ == "ModuleList"), key=len)
    head = inner_hf_model(model).get_output_embeddings()
    return sum(p.numel() for b in list(stack)[first:] for p in b.parameters()) + (head.weight.numel() if head is not None else 0)


def child(args: argparse.Namespace) -> None:
    import lfgraph  # noqa: F401  (before torch: the after code sets OpenMP's wait policy on import)
    import torch

    from lfgraph.passes.calibrated_fusion import blocks_to_train, calibrated_merge
    from lfgraph.passes.map_distillation import DistillSettings, distill_maps

    teacher, calib = build(args.child)
    stack_path = next(n for n, m in teacher.named_modules() if type(m).__name__ == "ModuleList")
    n = len(teacher.get_submodule(stack_path))
    runs = RUNS[args.child]
    closed = calibrated_merge(teacher, [[f"{stack_path}.{i}" for i in r] for r in runs], calib, keep="first")
    student = closed.model
    gone = {i for r in runs for i in r[1:]}
    alive = [i for i in range(n) if i not in gone]
    picked = blocks_to_train(list(range(n)), [r[0] for r in runs], runs, "neighbors")
    stack = student.get_submodule(stack_path)
    blocks = [stack[alive.index(i)] for i in picked]
    # refit records name blocks by their index before the absorbed ones were removed
    projections = []
    for r in closed.log.records:
        if r.action == "refit":
            index, proj = r.target[len(stack_path) + 1 :].split(".", 1)
            projections.append(stack[alive.index(int(index))].get_submodule(proj))
    first = min(alive.index(i) for i in picked)
    settings = DistillSettings(steps=args.steps, sampled_windows=args.sampled)
    rate0 = matmul_rate()
    t, c = time.perf_counter(), time.process_time()
    curve = distill_maps(student, teacher, projections, calib, settings, blocks=blocks)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rate = (rate0 + matmul_rate()) / 2
    print(json.dumps({
        "wall": wall, "cpu": cpu, "threads": torch.get_num_threads(), "gflops": rate,
        "tokens": curve["tokens"], "train_seconds": curve["seconds"], "steps": curve["steps"],
        "sampling_seconds": curve.get("sampling_seconds"), "cache_seconds": curve.get("cache_seconds"),
        "teacher_cache": curve.get("teacher_cache"), "frozen_blocks": curve.get("frozen_blocks"),
        "kl_start": curve.get("kl_start"), "kl_best": curve.get("kl_best"), "best_step": curve["best_step"],
        "p_path": matmul_params(student, first), "p_teacher": matmul_params(teacher),
    }))


# --------------------------------------------------------------------------- parent


def extract(rev: str, into: Path) -> Path:
    """The ``lfgraph`` package at git revision ``rev``, written under ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "lfgraph"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_child(code: Path, model: str, args: argparse.Namespace, env_extra: dict[str, str]) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}, "PYTHONPATH": str(code), **env_extra}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model, "--steps", str(args.steps), "--sampled", str(args.sampled)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise SystemExit(f"{model} with {code} failed (exit status {out.returncode}; negative: killed by that signal):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(model: str, label: str, r: dict) -> str:
    floor = (6 * r["p_path"] + 2 * r["p_teacher"]) * r["tokens"] / (r["gflops"] * 1e9)
    opt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    return (f"| {model} | {label} | {r['steps']} | {r['tokens']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['tokens'] / r['wall']:.0f} "
            f"| {opt(r['sampling_seconds'])} | {opt(r['cache_seconds'])} | {r['train_seconds']:.1f} | {r['gflops']:.0f} "
            f"| {r['p_path'] / 1e6:.1f} / {r['p_teacher'] / 1e6:.1f} | {floor:.1f} | {r['wall'] / floor:.2f} "
            f"| {(r['wall'] - (r['sampling_seconds'] or 0)) / floor:.2f} | {r['kl_start']:.4f} → {r['kl_best']:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["toy", "smollm2"], choices=sorted(RUNS))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--sampled", type=int, default=72)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["before", "before-passive", "after"], choices=["before", "before-passive", "after"],
                   help="before: the old code as it ran; before-passive: the same with OMP_WAIT_POLICY=PASSIVE (what the after "
                        "code sets), to tell the caching's share from the wait policy's")
    p.add_argument("--before", default=None, help="git revision of the 'before' code (default: merge-base with main)")
    p.add_argument("--json", default=None, help="also write every run's measurements here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rev = args.before or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True, capture_output=True,
                                        text=True).stdout.strip()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        before = extract(rev, Path(tmp))
        print(f"before: {rev[:10]}; after: the working tree; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}", flush=True)
        print("| model | code | steps | train tokens | wall s | CPU s | tokens/s | sampling s | cache s | train loop s | GEMM GFLOP/s "
              "| P path / teacher (M) | floor s | wall / floor | without sampling / floor | held-out KL |")
        print("|" + "---|" * 16, flush=True)
        for model in args.models:
            for k in range(args.repeats):
                for label in args.variants:
                    code = REPO if label == "after" else before
                    r = run_child(code, model, args, {"OMP_WAIT_POLICY": "PASSIVE"} if label == "before-passive" else {})
                    results.append({"model": model, "code": label, "repeat": k, **r})
                    print(row(model, label, r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
