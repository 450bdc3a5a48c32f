"""Default compress, then healing of ALL parameters on the same 32x256 calibration windows
(24 train, 8 held out for the best state), logit KL T=1: does more capacity on the same
calibration budget generalise to the held-out texts?"""
import sys, json, time, torch
from lfgraph_study.study import lm_track
from lfgraph_study.baselines.interface import run_method
from lfgraph.retrain.heal import HealConfig, heal
torch.set_num_threads(1)
out, target, steps, lr = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
track = lm_track("smollm2", 32, 256, 8, 512)
res = run_method("lfgraph", track.model, target, track.calibration)
one = track.score(res.model)
print("one-shot", one, flush=True)
t0 = time.perf_counter()
cfg = HealConfig(steps=steps, lr=lr, batch_size=2, objective="distill", temperature=1.0, trainable="all",
                 eval_data=track.calibration[24:], eval_every=10, keep_best=True, eval_at_start=True, progress=False)
with torch.enable_grad():
    r = heal(res.model, track.model, track.calibration[:24], cfg)
healed = track.score(res.model.eval()); print("healed", healed, flush=True)
evals = [(int(e[0]), float(e[1])) for e in r.evals]
print("healed", healed, "evals", evals, flush=True)
json.dump({"target": target, "steps": steps, "lr": lr, "original": track.original, "one_shot": one, "healed": healed,
           "evals": evals, "heal_seconds": time.perf_counter() - t0}, open(out, "w"), indent=1)
