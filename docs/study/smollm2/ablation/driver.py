import sys, json, torch
from pathlib import Path
from lfgraph_study.study import lm_track, sweep, write_outputs
torch.set_num_threads(1)
labels = sys.argv[2].split(",")
targets = [float(t) for t in sys.argv[3].split(",")]
OPTS = {
 "rep2": {"repair_next": 2}, "rep30": {"repair_next": 30}, "rep1": {"repair_next": 1},
 "orig": {"target": "original"}, "full": {"refit": "full"}, "attn": {"fit_attention": True},
 "sleb": {"select": "sleb", "sleb_budget": (4, 128)}, "bi": {"select": "block_influence"},
 "s0.3": {"strengths": (0.3,)}, "s1": {"strengths": (1.0,)}, "s3": {"strengths": (3.0,)}, "s10": {"strengths": (10.0,)},
 "last": {"keep": "last"}, "best": {"keep": "best"}, "noclip": {"token_weighting": "none"},
 "rep30full": {"repair_next": 30, "refit": "full"},
}
methods = [f"{l}=lfgraph" if l in OPTS else l for l in labels]
opts = {f"{l}=lfgraph": OPTS[l] for l in labels if l in OPTS}
track = lm_track("smollm2", 32, 256, 8, 512)
print("original", track.original, flush=True)
sweep(track, methods, targets, opts, log=lambda s: print(s, flush=True), on_row=lambda rows: Path(sys.argv[1]).write_text(json.dumps(rows, indent=1, default=str)))
