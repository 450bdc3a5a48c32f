"""One level of the study with the calibrated-distill rule and a chosen trainable set.

    OMP_NUM_THREADS=1 python blocks_driver.py OUT.json TARGET SAMPLED STEPS TRAINABLE [SELECT] [LR]

TRAINABLE is ``maps``, ``neighbors`` or ``blocks`` (``DistillSettings.trainable``); LR
defaults to the set's own (``DEFAULT_LR``: 1e-4 for ``blocks``). The runs in this folder
were made on 1 Dec 2026 from a work tree where ``blocks`` was an experimental override of
the ``neighbors`` set (every surviving block instead of the two around the cut, lr 1e-4
given for everything), so their JSON records ``trainable: neighbors``; this is the same
driver with the option as it landed.
"""
import json
import sys
from pathlib import Path

import torch

from lfgraph.passes.map_distillation import DistillSettings
from lfgraph_study.study import lm_track, sweep

torch.set_num_threads(1)
out, target, sampled, steps, trainable = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
select = sys.argv[6] if len(sys.argv) > 6 else "angular"
lr = float(sys.argv[7]) if len(sys.argv) > 7 else None
settings = DistillSettings(steps=steps, sampled_windows=sampled, lr=lr, trainable=trainable)
label = f"s{sampled}d{steps}lr{settings.learning_rate:g}{trainable}=lfgraph"
opts = {label: {"select": select, "fuse": "calibrated-distill", "distill": settings}}
track = lm_track("smollm2", 32, 256, 8, 512)
print("original", track.original, flush=True)
sweep(track, [label], [target], opts, log=lambda s: print(s, flush=True),
      on_row=lambda rows: Path(out).write_text(json.dumps({"original": track.original, "rows": rows}, indent=1, default=str)))
