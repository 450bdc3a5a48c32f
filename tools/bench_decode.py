"""Decode throughput of SmolLM2 on ONNX Runtime (CPU): original vs depth-compressed.

For batch 1, a 128-token prompt (held-out text) and 64 greedy new tokens, this times the
decode steps (after prefill) of:

- the original with-past decoder exported by ``lfgraph.deploy.export_decoder_with_past``
  (standard ONNX ops, ``position_ids`` input),
- the same with 25% and 50% of the 30 decoder layers removed (Block Influence selection,
  fuse ``remove``; the layers are cut straight from the ONNX graph with
  ``lfgraph.deploy.compress_decoder_onnx``, which the tests show generates the same tokens
  as the PyTorch plan),
- with ``--builder``: the same three from onnxruntime-genai's model builder (fused
  ``GroupQueryAttention`` graph), to compare the two export routes.

Runs alternate (every model once per round) so machine noise hits all alike. The "ideal"
speed-up is the inverse of the fraction of per-token work that remains: per-token FLOPs of
the decoder layers (2 x linear weights + attention over the average context) plus the
lm_head (2 x hidden x vocab; the embedding lookup is free). Also prints file sizes and greedy
sample text from the original and the compressed models.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_decode.py --threads 1 --rounds 3 [--builder]
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    _t = argparse.ArgumentParser(add_help=False)
    _t.add_argument("--threads", type=int, default=1)
    for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_v] = str(_t.parse_known_args(sys.argv[1:])[0].threads)

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lfgraph import pipeline  # noqa: E402
from lfgraph.calibration import heldout_windows  # noqa: E402
from lfgraph.deploy.checkpoint import save_hf_checkpoint  # noqa: E402
from lfgraph.deploy.decoder_onnx import build_with_genai_builder, export_decoder_with_past  # noqa: E402
from lfgraph.deploy.generation import OrtDecoder, timed_generation  # noqa: E402
from lfgraph.deploy.onnx_compress import compress_decoder_onnx, layers_from_plan  # noqa: E402
from lfgraph.models import smollm2_folder  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain what a neural network is in two sentences."]


def per_token_flops(cfg, n_layers: int, context: float) -> float:
    """Per-token FLOPs of ``n_layers`` decoder layers plus the lm_head at ``context`` tokens."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    kv = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    linear = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * cfg.intermediate_size
    attention = 2 * 2 * heads * hd * context  # scores and weighted values
    return n_layers * (2 * linear + attention) + 2 * h * cfg.vocab_size


def file_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--builder", action="store_true", help="also time onnxruntime-genai's model builder graphs")
    ap.add_argument("--sample-tokens", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_decode."))
    print(f"threads {args.threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, ORT intra-op {args.threads}); work dir {work}", flush=True)

    model = pipeline.load("smollm2")
    graph = pipeline.trace(model)
    cfg = model.hf_model.config
    n = cfg.num_hidden_layers
    calib = pipeline.calibration_tokens(model, n_windows=4, seq_len=128)
    plans = {t: pipeline.plan_model(model, graph, t, select="block_influence", fuse="remove", calibration=calib, progress=False)
             for t in args.targets}

    t = time.perf_counter()
    variants: dict[str, Path] = {}
    orig = work / "lfgraph-original"
    orig.mkdir()
    export_decoder_with_past(model.hf_model, orig)
    print(f"exported the original with its KV cache in {time.perf_counter() - t:.0f} s", flush=True)
    variants["original"] = orig
    for tgt, plan in plans.items():
        variants[f"-{tgt:.0%} layers"] = compress_decoder_onnx(orig, work / f"lfgraph-{tgt}", plan=plan).out
    if args.builder:
        t = time.perf_counter()
        borig = work / "builder-original"
        build_with_genai_builder(smollm2_folder(), borig)
        print(f"onnxruntime-genai builder on the original in {time.perf_counter() - t:.0f} s", flush=True)
        variants["builder original"] = borig
        for tgt, plan in plans.items():
            variants[f"builder -{tgt:.0%} layers"] = compress_decoder_onnx(borig, work / f"builder-{tgt}", plan=plan).out

    # also check the compressed checkpoint route once: HF folder of the 25% model
    hf25 = pipeline.rewrite(model, graph, plans[args.targets[0]], progress=False).model.model
    save_hf_checkpoint(hf25, work / "hf-25", tokenizer_source=smollm2_folder())

    prompt = [int(x) for x in heldout_windows(model.tokenizer, 1, args.prompt_tokens)[0]]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    decs = {k: OrtDecoder(p / "model.onnx", threads=args.threads) for k, p in variants.items()}
    for d in decs.values():  # warm-up
        timed_generation(d, prompt[:16], 2, head_dim)
    decode: dict[str, list[float]] = {k: [] for k in decs}
    prefill: dict[str, list[float]] = {k: [] for k in decs}
    for r in range(args.rounds):
        for k, d in decs.items():
            p, dt, _ = timed_generation(d, prompt, args.new_tokens, head_dim)
            prefill[k].append(p)
            decode[k].append(dt)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    context = args.prompt_tokens + args.new_tokens / 2
    full = per_token_flops(cfg, n, context)
    print(f"\nSmolLM2-135M-Instruct, ORT {__import__('onnxruntime').__version__} CPU, {args.threads} thread(s), batch 1, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.rounds} alternating rounds (median)\n")
    print("| model | layers | file MB | prefill ms | decode tok/s | speed-up | ideal | of ideal |")
    print("|---|---|---|---|---|---|---|---|")
    base = {"": statistics.median(decode["original"])}
    if args.builder:
        base["builder "] = statistics.median(decode["builder original"])
    for k in decs:
        prefix = "builder " if k.startswith("builder") else ""
        removed = 0
        for tgt, plan in plans.items():
            if k.endswith(f"-{tgt:.0%} layers"):
                removed = len(layers_from_plan(plan))
        med = statistics.median(decode[k])
        speed = base[prefix] / med
        ideal = full / per_token_flops(cfg, n - removed, context)
        print(f"| {k} | {n - removed} | {file_mb(variants[k]):.0f} | {statistics.median(prefill[k]) * 1e3:.0f} | "
              f"{args.new_tokens / med:.1f} | {speed:.2f}x | {ideal:.2f}x | {speed / ideal:.0%} |")
    if args.builder:
        print(f"\nbuilder vs lfgraph export, original: {base[''] / base['builder ']:.2f}x decode speed")

    print("\nsample text (greedy, chat template, ORT):")
    tok = model.tokenizer
    for text in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
        print(f"\nprompt: {text}")
        for k in ["original", *[f"-{t:.0%} layers" for t in args.targets]]:
            out = decs[k].greedy(ids, args.sample_tokens, eos=[tok.eos_token_id], head_dim=head_dim)
            print(f"  {k:>12}: {tok.decode(out, skip_special_tokens=True).strip()!r}")


if __name__ == "__main__":
    main()
