"""Ablation of the study: lfgraph's default cut (angular + calibrated map), then only the
square map ``M`` of each refitted down projection (``W <- M W``, ReplaceMe's ``T``) trained
by logit distillation from the original on the same calibration windows.

The closed-form map fits the hidden state after the cut; this asks how much is left by
fitting what perplexity measures (the next-token distribution) instead, with the same data
and the same capacity (nothing else trains). Calibration: the study's 32 x 256 tokens; the
last 8 windows are held out for early stopping (KL every 10 steps, best state kept).
Scores: the study's two held-out texts (``lfgraph_study.study.lm_track``).

    OMP_NUM_THREADS=1 python tools/study_distilled_map.py --target 0.1 --steps 60 --out map.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lfgraph_study.baselines import run_method
from lfgraph.fileio import write_text_atomic
from lfgraph_study.study import lm_track


class OutputMap(nn.Module):
    """Parametrization ``W -> M W`` with ``M`` (out x out) starting at the identity."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.M = nn.Parameter(torch.eye(d))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return self.M @ W


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=2, help="windows per step")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    track = lm_track("smollm2", 32, 256, 8, 512)
    res = run_method("lfgraph", track.model, args.target, track.calibration)
    student, keep = res.model, res.details["keep"]
    one_shot = track.score(student)
    print("one shot", one_shot, res.details, flush=True)
    for p in student.parameters():
        p.requires_grad_(False)
    layers = student.model.model.layers  # blocks below each run keep their index
    maps = []
    for k in keep:
        proj = layers[k].mlp.down_proj
        parametrize.register_parametrization(proj, "weight", OutputMap(proj.weight.shape[0]))
        maps.append(proj.parametrizations.weight[0].M)
    train, val = track.calibration[:24], track.calibration[24:]
    teacher_cache: dict = {}

    def kl(ids: torch.Tensor, key: tuple) -> torch.Tensor:
        if key not in teacher_cache:  # the teacher's log-probabilities, once per window (fp16)
            with torch.no_grad():
                teacher_cache[key] = F.log_softmax(track.model(ids).float(), -1).half()
        t = teacher_cache[key].float()
        return (t.exp() * (t - F.log_softmax(student(ids).float(), -1))).sum(-1).mean()

    def val_kl() -> float:
        with torch.no_grad():
            return float(sum(kl(val[j : j + args.batch], ("v", j)) for j in range(0, len(val), args.batch))) / (len(val) // args.batch)

    opt = torch.optim.Adam(maps, lr=args.lr)
    best = (val_kl(), 0, [m.detach().clone() for m in maps])
    curve = [{"step": 0, "val_kl": best[0]}]
    g = torch.Generator().manual_seed(0)
    t0 = time.process_time()
    for step in range(1, args.steps + 1):
        i = int(torch.randint(0, len(train) // args.batch, (1,), generator=g)) * args.batch
        loss = kl(train[i : i + args.batch], ("t", i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps:
            v = val_kl()
            curve.append({"step": step, "val_kl": v, "cpu_s": round(time.process_time() - t0, 1)})
            print(curve[-1], flush=True)
            if v < best[0]:
                best = (v, step, [m.detach().clone() for m in maps])
    with torch.no_grad():
        for m, b in zip(maps, best[2]):
            m.copy_(b)
    for k in keep:
        parametrize.remove_parametrizations(layers[k].mlp.down_proj, "weight", leave_parametrized=True)
    scores = track.score(student.eval())
    print("distilled map", scores, flush=True)
    write_text_atomic(args.out, json.dumps({"settings": vars(args), "details": res.details, "one_shot": one_shot, "curve": curve,
                                            "best_step": best[1], "distilled_map": scores, "original": track.original}, indent=1))


if __name__ == "__main__":
    main()
