"""One level of the study with the calibrated-distill rule and chosen distillation settings.

    OMP_NUM_THREADS=1 python neighbors_driver.py OUT.json TARGET SAMPLED STEPS LR NEIGHBORS [SELECT]

NEIGHBORS 1 trains the blocks around each cut with the maps (``trainable="neighbors"``),
0 the maps alone. The runs in this folder were made on 1 Dec 2026 from a work tree where
the same behaviour was an experimental flag (``train_neighbors=True``: the block holding
the map and the next block of the renumbered stack, which is the first block after the
cut); this is the same driver with the option as it landed.
"""
import json
import sys
from pathlib import Path

import torch

from lfgraph.passes.map_distillation import DistillSettings
from lfgraph_study.study import lm_track, sweep

torch.set_num_threads(1)
out, target, sampled, steps, lr, neigh = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6] == "1"
select = sys.argv[7] if len(sys.argv) > 7 else "angular"
label = f"s{sampled}d{steps}lr{lr:g}n{int(neigh)}=lfgraph"
settings = DistillSettings(steps=steps, sampled_windows=sampled, lr=lr, trainable="neighbors" if neigh else "maps")
opts = {label: {"select": select, "fuse": "calibrated-distill", "distill": settings}}
track = lm_track("smollm2", 32, 256, 8, 512)
print("original", track.original, flush=True)
sweep(track, [label], [target], opts, log=lambda s: print(s, flush=True),
      on_row=lambda rows: Path(out).write_text(json.dumps({"original": track.original, "rows": rows}, indent=1, default=str)))
