"""The study on SmolLM2-135M: the depth peers and lfgraph at 10/20/30% of the decoder
layers, one calibration budget for all, plus the ablation of lfgraph's calibrated rule.

Partial results are written after every (method, target) to ``--out`` (study.json/.csv/.md,
plots), so a run cut short still leaves its table. Run (single thread, ~1-2 h on a busy CPU):

    OMP_NUM_THREADS=1 python tools/study_smollm2.py --out docs/study/smollm2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lfgraph_study.study import lm_track, sweep, write_outputs

#: The peers and lfgraph's default first, then lfgraph's other recipes and the ablation of
#: its calibrated rule: how much the refit may move (full down-projection refit vs. a
#: ReplaceMe-style d x d map), the ridge strength (fixed vs. chosen on held-out windows),
#: the attention output projection refitted too. The ablation rows are closed-form variants
#: (no distillation): each names its fusion rule, since the family's default now distils.
METHODS = [
    "shortgpt", "gromov", "replaceme-lstsq", "replaceme-cosine", "linearpatch", "lfgraph", "lfgraph-angular", "laco", "sleb",
    "lfgraph-map=lfgraph", "lfgraph-angular-map=lfgraph-angular", "lfgraph-attn=lfgraph", "lfgraph-angular-attn=lfgraph-angular",
    "lfgraph-ridge0.1=lfgraph", "lfgraph-sleb",
]
MAP, FULL = {"fuse": "calibrated-map"}, {"fuse": "calibrated"}
OPTIONS = {
    "lfgraph-map": MAP, "lfgraph-angular-map": MAP,
    "lfgraph-attn": FULL | {"fit_attention": True}, "lfgraph-angular-attn": FULL | {"fit_attention": True},
    "lfgraph-ridge0.1": FULL | {"strengths": (0.1,)},
}
#: The ablation of the closed-form rule (each a variant of ``lfgraph``'s selection with the
#: full refit): ``--methods lfgraph-repair-all=lfgraph ...``.
#: ``repair-N``: the N blocks after each run also get a square map refitted towards the
#: original model's hidden states (``repair_next``); ``attn``: the attention output
#: projection refitted too; ``sleb-select``: SLEB's selection (reduced budget) instead of
#: the default's; ``keep-last``: the run's last block is kept and refitted instead of its first.
ABLATION = {name: FULL | o for name, o in {
    "lfgraph-ridge0.3": {"strengths": (0.3,)}, "lfgraph-ridge1": {"strengths": (1.0,)}, "lfgraph-ridge3": {"strengths": (3.0,)},
    "lfgraph-repair-2": {"repair_next": 2}, "lfgraph-repair-all": {"repair_next": 1000}, "lfgraph-attn": {"fit_attention": True},
    "lfgraph-sleb-select": {"select": "sleb"}, "lfgraph-keep-last": {"keep": "last"},
}.items()}
OPTIONS |= ABLATION
#: The distilled map (``calibrated-map-distill``: the closed-form map, then trained by logit
#: KL on the calibration windows; ``calibrated-distill``: the full refit, then the map) after
#: the default's selection and after angular selection.
DISTILLED = {
    "lfgraph-distill": {"fuse": "calibrated-map-distill"},
    "lfgraph-full-distill": {"fuse": "calibrated-distill"},
    "lfgraph-angular-full-distill": {"fuse": "calibrated-distill"},
    "lfgraph-angular-full": {"fuse": "calibrated"},
}
OPTIONS |= DISTILLED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/study/smollm2")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-tokens", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--sleb", nargs=2, type=int, default=[4, 128], metavar=("WINDOWS", "TOKENS"))
    ap.add_argument("--cloze", type=int, default=0, metavar="N",
                    help="also score a zero-shot cloze task of N items from the licence texts through lm-eval (needs lfgraph[lm-eval])")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks, include = [], None
    if args.cloze:
        from lfgraph_study.harness import write_cloze_task
        from lfgraph.cache import cache_dir
        from lfgraph_study.study import licenses_text

        include = cache_dir() / "lm-eval-tasks"
        write_cloze_task(licenses_text(), include, "cloze_licenses", n=args.cloze)
        tasks = ["cloze_licenses"]
    track = lm_track("smollm2", args.calib_windows, args.calib_tokens, args.eval_windows, args.eval_tokens, tasks, include)
    track.protocol["sleb_budget"] = f"{args.sleb[0]} windows x {args.sleb[1]} tokens (SLEB and lfgraph-sleb selection only)"
    print("original", track.original, flush=True)
    options = dict(OPTIONS)
    options["sleb"] = {"max_windows": args.sleb[0], "max_tokens": args.sleb[1]}
    options["lfgraph-sleb"] = {"sleb_budget": tuple(args.sleb)}
    options["lfgraph-sleb-select"] = options["lfgraph-sleb-select"] | {"sleb_budget": tuple(args.sleb)}
    out = Path(args.out)
    sweep(track, args.methods, args.targets, options, log=lambda s: print(s, flush=True), on_row=lambda rows: write_outputs(track, rows, out))


if __name__ == "__main__":
    main()
