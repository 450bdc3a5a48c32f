import sys, json, torch
from pathlib import Path
from lfgraph_study.study import lm_track, sweep
from lfgraph.passes.map_distillation import DistillSettings
torch.set_num_threads(1)
out, target, sampled, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
select = sys.argv[5] if len(sys.argv) > 5 else "angular"
top_p = 0.95
label = f"s{sampled}d{steps}p{top_p:g}=lfgraph"
opts = {label: {"select": select, "fuse": "calibrated-distill", "distill": DistillSettings(steps=steps, sampled_windows=sampled, top_p=top_p)}}
track = lm_track("smollm2", 32, 256, 8, 512)
print("original", track.original, flush=True)
sweep(track, [label], [target], opts, log=lambda s: print(s, flush=True),
      on_row=lambda rows: Path(out).write_text(json.dumps({"original": track.original, "rows": rows}, indent=1, default=str)))
