import sys, json, torch
from pathlib import Path
from lfgraph_study.study import lm_track, sweep
from lfgraph.passes.map_distillation import DistillSettings
torch.set_num_threads(1)
out, target, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 3e-4
label = f"d{steps}lr{lr:g}=lfgraph"
opts = {label: {"select": "angular", "fuse": "calibrated-distill", "distill": DistillSettings(steps=steps, lr=lr)}}
track = lm_track("smollm2", 32, 256, 8, 512)
print("original", track.original, flush=True)
sweep(track, [label], [target], opts, log=lambda s: print(s, flush=True),
      on_row=lambda rows: Path(out).write_text(json.dumps({"original": track.original, "rows": rows}, indent=1, default=str)))
