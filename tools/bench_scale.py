"""Scale benchmark of the streaming path on synthetic Llama-architecture checkpoints.

    python tools/bench_scale.py 0.5B 1B [--fuse remove] [--select block_influence] [--windows 8 --seq-len 128]

For each size it writes (once, cached) a checkpoint with the dimensions of a real model of
that size and random bf16 weights, sharded like the real ones, under
``$LFGRAPH_CACHE/synthetic/`` (default ``~/.cache/lfgraph/synthetic/``, outside the
repository), with SmolLM2's tokenizer beside it (the calibration and the quality measure
read text); then compresses it at 25% with :func:`lfgraph.pipeline.compress` (the engine
chosen as ``lfgraph compress`` chooses it, the family's default recipe unless ``--select`` /
``--fuse``) in a fresh subprocess and prints one table row: wall time, peak resident memory
of the child (its ``VmHWM``), the estimate printed before the work, bytes read (the
estimate's count, and the child's ``/proc/self/io`` disk reads) and written, and the floors:
the FLOPs of every pass the run makes (selection, refit, distillation with its backward
passes, the quality measure of both models: the estimate's count by phase) divided by the
float32 matmul rate measured in the same run (the compute runs in float32; the bf16 rate is
printed too), and the bytes read and written divided by the disk throughput measured in the
same run. ``ratio`` is wall time over the larger floor. The cost exponent is the log-log slope of wall time against parameter count.
``--delete`` removes the synthetic checkpoints afterwards. Results are written as JSON lines
to ``--json`` when given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: Dimensions of real models of each size (Qwen2.5-0.5B's shape for 0.5B, Llama 3.2 1B / 3B and
#: Llama 3.1 8B for the others), all written as Llama-architecture checkpoints.
SIZES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=True, shard_gb=None),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=True, shard_gb=None),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=True, shard_gb=5.0),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=False, shard_gb=5.0),
}

_CHILD = r"""
import json, resource, sys, time
import torch
from lfgraph.pipeline import compress
src, out, select, fuse, windows, seq_len, eval_windows, eval_seq_len, onnx, engine, objective, bw_steps = sys.argv[1:13]
if int(bw_steps):  # fewer block-wise steps than the default: a memory measurement, its time counted for these steps
    import functools
    from lfgraph.passes import blockwise_distillation as bd
    bd.BlockwiseSettings = functools.partial(bd.BlockwiseSettings, steps=int(bw_steps))
t0 = time.perf_counter()
r = compress(src, out, target=0.25, select=select or None, fuse=fuse or None, calibration_windows=int(windows),
             calibration_seq_len=int(seq_len), eval_windows=int(eval_windows), eval_seq_len=int(eval_seq_len),
             onnx=onnx == "auto", engine=engine, distill_objective=objective or None, quiet=True)
status = open("/proc/self/status").read()
hwm = int(status.split("VmHWM:")[1].split()[0]) * 1024
ru = resource.getrusage(resource.RUSAGE_SELF)
children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the ONNX builder's child, when it ran
io = dict(l.split(": ") for l in open("/proc/self/io").read().split("\n") if l)
est = r.estimate
q = r.quality
# the floor's FLOPs: the estimate's count by phase, for the plan this run made (its runs,
# the blocks the block-wise objective trained) rather than the worst case it planned for
flops = {}
if est is not None:
    from lfgraph.blocks import CheckpointBlocks
    from lfgraph.estimate import blocks_estimate
    distilled = [rec.detail for rec in (r.log.records if r.log else []) if rec.action == "distill"]
    ran = distilled[0].get("objective") if distilled else None
    trained = sum(len(d.get("blocks", [])) for d in distilled)
    prov = r.plan.provenance
    actual = blocks_estimate(CheckpointBlocks(src), n_drop=sum(len(f.absorb) for f in r.plan.fusions), select=prov.get("select", "block_influence"),
                             fuse=r.plan.fuse + ("-distill" if prov.get("distill_steps") and r.plan.fuse == "calibrated" else ""),
                             objective=ran,
                             windows=int(windows), seq_len=int(seq_len), eval_windows=int(eval_windows), eval_seq_len=int(eval_seq_len),
                             runs=len(r.plan.fusions), trained=trained, rates={"float32": 1.0})
    flops = actual.flops
print(json.dumps({"seconds": r.stage_seconds, "wall_in_child": time.perf_counter() - t0, "peak_rss": hwm, "children_peak": children_peak,
                  "cpu_s": ru.ru_utime + ru.ru_stime, "disk_read": int(io["read_bytes"]), "disk_written": int(io["write_bytes"]),
                  "estimate_peak": est.peak_bytes if est else None, "estimate_phase": est.peak_phase if est else None,
                  "estimate_seconds": est.seconds if est else None, "estimate_flops": est.flops if est else {}, "plan_flops": flops,
                  "estimate_read": est.bytes_read if est else None, "estimate_written": est.bytes_written if est else None,
                  "blocks": r.blocks, "params": r.params, "recipe": r.recipe, "plan": [[f.keep, f.absorb] for f in r.plan.fusions],
                  "quality": None if q is None else {"rows": q.rows, "loss": q.loss, "loss_name": q.loss_name, "skipped": q.skipped},
                  "notes": r.notes, "file_bytes": r.file_bytes, "exit_code": r.exit_code}))
"""


def cache_root() -> Path:
    return Path(os.environ.get("LFGRAPH_CACHE", Path.home() / ".cache" / "lfgraph")) / "synthetic"


def _config(name: str) -> dict:
    dims = {k: v for k, v in SIZES[name].items() if k != "shard_gb"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
            "attention_bias": False, "mlp_bias": False, **dims}


def write_synthetic(name: str, folder: Path, seed: int = 0) -> Path:
    """A Llama checkpoint of size ``name`` with random bf16 weights (normal, std 0.02; norms
    1), written tensor by tensor (a 64 MB piece in memory at a time), staged then renamed."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lfgraph.blocks.write import _header

    if (folder / "config.json").is_file():
        return folder
    cfg = _config(name)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)

    class Entry:  # what _header reads of a tensor entry
        def __init__(self, shape: tuple) -> None:
            self.dtype, self.shape, self.nbytes = "BF16", shape, 2 * math.prod(shape)

    items = [(k, Entry(s)) for k, s in shapes.items()]
    limit = SIZES[name]["shard_gb"]
    groups: list[list] = [[]]
    size = 0
    for it in items:
        if limit and groups[-1] and size + it[1].nbytes > limit * 1e9:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += it[1].nbytes
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    try:
        for k, group in enumerate(groups):
            fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            with open(tmp / fname, "wb") as f:
                f.write(_header(group, {"format": "pt"}))
                for tname, e in group:
                    n = math.prod(e.shape)
                    step = 32 << 20
                    for start in range(0, n, step):
                        m = min(step, n - start)
                        if tname.endswith("norm.weight"):
                            piece = torch.ones(m, dtype=torch.bfloat16)
                        else:
                            piece = (torch.randn(m, generator=g) * 0.02).to(torch.bfloat16)
                        f.write(memoryview(piece.view(torch.uint8).numpy()))
                    weight_map[tname] = fname
        if len(groups) > 1:
            total = sum(e.nbytes for _, e in items)
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def matmul_gflops(dtype: torch.dtype) -> float:
    from lfgraph.estimate import matmul_rate

    return matmul_rate(dtype, n=1024, budget_s=1.0) / 1e9


def disk_rates(folder: Path) -> tuple[float, float]:
    """(read, write) bytes/s: sequential write of 1 GB with fsync beside ``folder``, and a
    sequential read of the same file after dropping it from the page cache (posix_fadvise)."""
    path = folder.parent / ".lfgraph-disk-probe"
    buf = os.urandom(64 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(16):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    write = (16 << 26) / (time.perf_counter() - t0)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    while os.read(fd, 64 << 20):
        pass
    read = (16 << 26) / (time.perf_counter() - t0)
    os.close(fd)
    path.unlink()
    return read, write


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="+", choices=list(SIZES))
    ap.add_argument("--select", default="", help="a selection (default: the family's default recipe's)")
    ap.add_argument("--fuse", default="", help="a fusion rule (default: the family's default recipe's)")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows (compress's default: 16)")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration window length (compress's default: 256)")
    ap.add_argument("--eval-windows", type=int, default=4, help="held-out windows of the quality measure (compress's default: 4)")
    ap.add_argument("--eval-seq-len", type=int, default=512, help="their length (compress's default: 512)")
    ap.add_argument("--engine", default="auto", choices=["auto", "stream", "in-memory"], help="as compress's --stream / --in-memory")
    ap.add_argument("--distill-objective", default="", choices=["", "logit", "blockwise"],
                    help="as compress's (default: its cost rule: logit where the model fits twice in memory, else block-wise)")
    ap.add_argument("--blockwise-steps", type=int, default=0,
                    help="steps per trained block of the block-wise objective (default 0: its default, 60); fewer measure the "
                         "same peak memory in less time, the floors count the steps that ran")
    ap.add_argument("--json", default=None)
    ap.add_argument("--onnx", default="none", choices=["auto", "none"],
                    help="auto: the deploy folder's ONNX too where it fits (compress's default); none: the checkpoint alone (--no-onnx)")
    ap.add_argument("--delete", action="store_true", help="delete the synthetic checkpoints when done")
    args = ap.parse_args()
    from lfgraph.models import smollm2_folder

    root = cache_root()
    rows = []
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    root.mkdir(parents=True, exist_ok=True)
    read_rate, write_rate = disk_rates(root / "x")
    tokenizer = smollm2_folder()  # the quality measure and the calibration read text: SmolLM2's tokenizer
    print(f"machine: {os.cpu_count()} cores, {psutil_total() / 1e9:.0f} GB; matmul float32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s; "
          f"disk read {read_rate / 1e9:.2f} GB/s, write {write_rate / 1e9:.2f} GB/s (1 GB, fsync / cache dropped)")
    print(f"calibration: {args.windows} windows x {args.seq_len} tokens; quality: {args.eval_windows} x {args.eval_seq_len}; "
          f"select {args.select or 'default'}, fuse {args.fuse or 'default'}, target 0.25, engine {args.engine}, onnx {args.onnx}, "
          f"distillation objective {args.distill_objective or 'the cost rule'}"
          + (f", {args.blockwise_steps} block-wise steps per block" if args.blockwise_steps else ""), flush=True)
    for name in args.sizes:
        folder = root / f"llama-{name}"
        t0 = time.perf_counter()
        write_synthetic(name, folder)
        made = time.perf_counter() - t0
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer / f).is_file() and not (folder / f).is_file():
                shutil.copy(tokenizer / f, folder / f)
        out = root / f"llama-{name}-lf"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), args.select, args.fuse, str(args.windows),
                               str(args.seq_len), str(args.eval_windows), str(args.eval_seq_len), args.onnx, args.engine,
                               args.distill_objective, str(args.blockwise_steps)],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load = os.getloadavg()[1]
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ckpt_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        flops = r["plan_flops"] or r["estimate_flops"]
        # the floors: every pass's FLOPs (training included, as the estimate counts them by
        # phase) at the float32 rate measured here; the solve at a quarter of it (float64)
        compute_floor = sum(f / (fp32 * 1e9 / (4 if k == "refit solve" else 1)) for k, f in flops.items())
        read = r["estimate_read"] or ckpt_bytes
        io_floor = read / read_rate + r["disk_written"] / write_rate
        q = r["quality"] or {}
        row = dict(size=name, params=r["params"][0], params_after=r["params"][1], checkpoint_gb=ckpt_bytes / 1e9, made_s=made, wall_s=wall,
                   cpu_s=r["cpu_s"], load5=load, peak_rss_gb=r["peak_rss"] / 1e9, onnx_child_peak_gb=r["children_peak"] / 1e9, estimate_peak_gb=(r["estimate_peak"] or 0) / 1e9,
                   estimate_phase=r["estimate_phase"], estimate_s=r["estimate_seconds"], read_gb=read / 1e9, disk_read_gb=r["disk_read"] / 1e9,
                   written_gb=r["disk_written"] / 1e9, compute_floor_s=compute_floor, io_floor_s=io_floor,
                   ratio=wall / max(compute_floor, io_floor), ratio_sum=wall / (compute_floor + io_floor), stages=r["seconds"],
                   flops=flops, blocks=r["blocks"], plan=r["plan"], recipe=r["recipe"], quality=q, notes=r["notes"], exit_code=r["exit_code"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if args.delete:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print("| size | params | bf16 GB | wall s | CPU s | peak RSS GB (est.) | read GB (disk) | written GB | compute floor s | I/O floor s | wall / max floor | stages s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items() if k != "total")
        print(f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['checkpoint_gb']:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_gb']:.2f} ({r['estimate_peak_gb']:.2f}) | "
              f"{r['read_gb']:.2f} ({r['disk_read_gb']:.2f}) | {r['written_gb']:.2f} | {r['compute_floor_s']:.0f} | {r['io_floor_s']:.0f} | {r['ratio']:.1f} | {stages} |")
    for r in rows:
        print(f"{r['size']}: {r['recipe']}; exit {r['exit_code']}; estimate peak during the {r['estimate_phase']}; "
              f"child processes' peak (the ONNX builder) {r['onnx_child_peak_gb']:.2f} GB; "
              f"FLOPs by phase: " + ", ".join(f"{k} {v / 1e12:.1f} T" for k, v in r["flops"].items()))
        for row in r["quality"].get("rows", []):
            print(f"    {' | '.join(str(c) for c in row)}")
        for note in r["notes"]:
            print(f"    note: {note}")
    if len(rows) >= 2:
        x = np.log([r["params"] for r in rows])
        y = np.log([r["wall_s"] for r in rows])
        slope = float(np.polyfit(x, y, 1)[0])
        print(f"\ncost exponent (log-log slope of wall time against parameters): {slope:.2f}")
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


def psutil_total() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


if __name__ == "__main__":
    sys.exit(main())
