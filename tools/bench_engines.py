"""Quality of the two block sources on SmolLM2-135M: the same checkpoint compressed with the
default recipe held in memory (``--in-memory``), block by block (``--stream``: the default
objective, which is logit distillation wherever the model fits twice in memory), and block
by block with the block-wise objective forced (``--stream --distill-objective blockwise``,
what a model too large to hold gets), at 10/20/30% of the decoder layers.

    python tools/bench_engines.py --out docs/study/engines [--targets 0.1 0.2 0.3]

Each compressed checkpoint is written (``onnx=False``), reloaded with transformers in float32
and scored, with the original, on windows of:

- ``calib-val``: the calibration pool (the bundled corpus's first 70%) at positions between
  the calibration windows (half a stride on: disjoint from them) -- the calibration-side
  validation that defaults are chosen on;
- three held-out texts of different kinds: ``pydoc-heldout`` (the bundled corpus's held-out
  30%: English documentation prose), ``licenses`` (``/usr/share/common-licenses``: legal
  English), ``python-code`` (Python's own standard-library sources: code).

Perplexity scores every next token; ``top-1`` is agreement with the original's argmax at the
same positions. Writes ``engines.json`` and ``engines.md`` (a table: config x level x text)
to ``--out`` after every run, so a run cut short still leaves its table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {
    "in-memory": dict(engine="in-memory"),
    "checkpoint": dict(engine="stream"),
    "checkpoint-blockwise": dict(engine="stream", distill_objective="blockwise"),
}
#: standard-library modules whose sources make the code text (large, plain Python)
CODE_MODULES = ("argparse", "dataclasses", "functools", "inspect", "json.decoder", "json.encoder", "pathlib", "shutil",
                "subprocess", "tarfile", "typing", "zipfile")


@contextlib.contextmanager
def blockwise_settings(config: str):
    """``checkpoint-blockwise:steps=120:lr=3e-4``: the block-wise objective's settings with
    these fields changed, for the run (the defaults otherwise)."""
    from lfgraph.passes import blockwise_distillation as bd

    fields = dict(kv.split("=", 1) for kv in config.split(":")[1:])
    original = bd.BlockwiseSettings
    kinds = {f.name: f.type for f in dataclasses.fields(original)}
    values = {k: (int(v) if kinds[k] in ("int", int) else float(v) if kinds[k] in ("float", float) else v) for k, v in fields.items()}
    bd.BlockwiseSettings = functools.partial(original, **values) if values else original
    try:
        yield
    finally:
        bd.BlockwiseSettings = original


def code_text() -> str:
    import importlib
    import inspect

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)


def texts(tokenizer, n: int, seq_len: int, calib_windows: int) -> dict[str, torch.Tensor]:
    from lfgraph.calibration import _tokenize, corpus_split, heldout_windows, windows_from_tokens
    from lfgraph_study.study import licenses_text

    pool, _ = corpus_split(tokenizer)
    stride = len(pool) // calib_windows
    return {
        "calib-val": windows_from_tokens(pool[stride // 2:], n, seq_len, "calibration pool"),
        "pydoc-heldout": heldout_windows(tokenizer, n, seq_len),
        "licenses": windows_from_tokens(_tokenize(tokenizer, licenses_text()), n, seq_len, "licence texts"),
        "python-code": windows_from_tokens(_tokenize(tokenizer, code_text()), n, seq_len, "Python sources"),
    }


@torch.no_grad()
def scores(model, windows: torch.Tensor, reference: torch.Tensor | None) -> tuple[float, float, torch.Tensor]:
    nll, count, top = 0.0, 0, []
    for i in range(0, windows.shape[0], 2):
        ids = windows[i : i + 2]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
        top.append(logits.argmax(-1))
    t = torch.cat(top)
    return math.exp(nll / count), 1.0 if reference is None else float((t == reference).float().mean()), t


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def write_table(rows: list[dict], base: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").write_text(json.dumps({"original": base, "runs": rows}, indent=1))
    names = list(base)
    lines = ["| config | layers removed | " + " | ".join(f"{n} ppl (top-1)" for n in names) + " | recipe | seconds |",
             "|---|---|" + "---|" * len(names) + "---|---|",
             "| original | 0 | " + " | ".join(f"{base[n]:.2f}" for n in names) + " | | |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['target']:.0%} | " + " | ".join(f"{r['ppl'][n]:.2f} ({r['top1'][n]:.3f})" for n in names)
                     + f" | {r['recipe']} | {r['seconds']:.0f} |")
    (out / "engines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/study/engines")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS),
                    help=f"of {', '.join(CONFIGS)}; checkpoint-blockwise:steps=120:lr=3e-4 (any BlockwiseSettings field) for a variant "
                         "of the block-wise objective's settings")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--calibration-windows", type=int, default=16, help="as compress's default")
    ap.add_argument("--checkpoint-targets", nargs="+", type=float, default=None,
                    help="run the checkpoint config (the same default objective as in memory where the model fits) at these targets only")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in OUT/engines.json and skip them")
    args = ap.parse_args()

    from lfgraph.models import smollm2_folder
    from lfgraph.pipeline import compress
    from transformers import AutoTokenizer

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    windows = texts(tok, args.eval_windows, args.eval_seq_len, args.calibration_windows)
    original = load(folder)
    base, ref = {}, {}
    for name, w in windows.items():
        base[name], _, ref[name] = scores(original, w, None)
    del original
    out = Path(args.out)
    rows: list[dict] = []
    if args.resume and (out / "engines.json").is_file():
        rows = json.loads((out / "engines.json").read_text())["runs"]
    done = {(r["config"], r["target"]) for r in rows}
    work = Path(tempfile.mkdtemp(prefix="lfgraph-engines-"))
    try:
        for target in args.targets:
            for config in args.configs:
                if (config, target) in done or (config == "checkpoint" and args.checkpoint_targets is not None
                                                and not any(abs(target - t) < 1e-9 for t in args.checkpoint_targets)):
                    continue
                dest = work / f"{config}-{target}"
                t0 = time.perf_counter()
                with blockwise_settings(config):
                    r = compress(str(folder), dest, target=target, onnx=False, quiet=True, eval_windows=0,
                                 calibration_windows=args.calibration_windows, **CONFIGS[config.split(":")[0]])
                seconds = time.perf_counter() - t0
                model = load(dest)
                ppl, top1 = {}, {}
                for name, w in windows.items():
                    ppl[name], top1[name], _ = scores(model, w, ref[name])
                del model
                rows.append({"config": config, "target": target, "recipe": r.recipe, "seconds": seconds, "ppl": ppl, "top1": top1,
                             "plan": [[f.keep, list(f.absorb)] for f in r.plan.fusions], "notes": r.notes})
                write_table(rows, base, out)
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
