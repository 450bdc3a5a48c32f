"""Scale benchmark of the streaming path on synthetic Llama-architecture checkpoints.

    python tools/bench_scale.py 0.5B 1B [--fuse remove] [--select block_influence] [--windows 8 --seq-len 128]

For each size it writes (once, cached) a checkpoint with the dimensions of a real model of
that size and random bf16 weights, sharded like the real ones, under
``$LFGRAPH_CACHE/synthetic/`` (default ``~/.cache/lfgraph/synthetic/``, outside the
repository); then compresses it at 25% with :func:`lfgraph.stream.compress_checkpoint` in a
fresh subprocess and prints one table row: wall time, peak resident memory of the child
(its ``VmHWM``), bytes read and written (counted by lfgraph, and the child's
``/proc/self/io`` disk reads), and the floors: the calibration forward FLOPs of one pass over
the stack divided by the float32 matmul rate measured in the same run (the compute runs in
float32; the bf16 rate is measured and printed too), and the bytes read and written divided
by the disk throughput measured in the same run. ``ratio`` is wall time over the larger
floor. The cost exponent is the log-log slope of wall time against parameter count.
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
from lfgraph.stream import compress_checkpoint
src, out, select, fuse, windows, seq_len, tokens, onnx, fingerprint = sys.argv[1:10]
t0 = time.perf_counter()
r = compress_checkpoint(src, out, target=0.25, select=select, fuse=fuse, calibration_tokens=tokens,
                        calibration_windows=int(windows), calibration_seq_len=int(seq_len), progress=False, onnx=onnx,
                        fingerprint=fingerprint == "1")
status = open("/proc/self/status").read()
hwm = int(status.split("VmHWM:")[1].split()[0]) * 1024
ru = resource.getrusage(resource.RUSAGE_SELF)
io = dict(l.split(": ") for l in open("/proc/self/io").read().split("\n") if l)
print(json.dumps({"seconds": r.seconds, "wall_in_child": time.perf_counter() - t0, "bytes_read": r.bytes_read,
                  "bytes_written": r.bytes_written, "peak_rss": hwm, "cpu_s": ru.ru_utime + ru.ru_stime, "disk_read": int(io["read_bytes"]),
                  "estimate_peak": r.estimate.peak_bytes, "estimate_seconds": r.estimate.seconds,
                  "blocks": r.blocks, "params": r.params, "plan": [[f.keep, f.absorb] for f in r.plan.fusions],
                  "onnx": None if r.onnx is None else {"builder_peak": r.onnx.builder_peak_bytes, "check_rel": r.onnx.check_rel},
                  "onnx_reason": r.onnx_reason, "exit_code": r.exit_code}))
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

    from lfgraph.stream.write import _header

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
    from lfgraph.stream.estimate import matmul_rate

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


def forward_flops(name: str, tokens: int) -> float:
    """FLOPs of one calibration forward pass over the decoder stack: ``2 x block parameters
    x tokens`` per block plus attention's ``4 x seq x heads x head_dim`` per token."""
    c = SIZES[name]
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = h // c["num_attention_heads"]
    block = h * h * 2 + 2 * h * c["num_key_value_heads"] * hd + 3 * h * i
    return float(L * (2 * block * tokens))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="+", choices=list(SIZES))
    ap.add_argument("--select", default="angular")
    ap.add_argument("--fuse", default="calibrated")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--onnx", default="none", choices=["auto", "fp32", "none"],
                    help="also write the deploy folder's ONNX with onnxruntime-genai's builder (default: the checkpoint alone)")
    ap.add_argument("--no-fingerprint", action="store_true",
                    help="skip the model fingerprint (compress_checkpoint(fingerprint=False)): what hashing costs")
    ap.add_argument("--delete", action="store_true", help="delete the synthetic checkpoints when done")
    args = ap.parse_args()
    root = cache_root()
    rows = []
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    root.mkdir(parents=True, exist_ok=True)
    read_rate, write_rate = disk_rates(root / "x")
    print(f"machine: {os.cpu_count()} cores, matmul float32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s; "
          f"disk read {read_rate / 1e9:.2f} GB/s, write {write_rate / 1e9:.2f} GB/s (1 GB, fsync / cache dropped)")
    print(f"calibration: {args.windows} windows x {args.seq_len} tokens; select {args.select}, fuse {args.fuse}, target 0.25")
    for name in args.sizes:
        folder = root / f"llama-{name}"
        t0 = time.perf_counter()
        write_synthetic(name, folder)
        made = time.perf_counter() - t0
        if args.onnx != "none":
            # the builder reads a tokenizer: SmolLM2's (the bundled model's, from lfgraph's cache)
            tok = Path(os.environ.get("LFGRAPH_CACHE", Path.home() / ".cache" / "lfgraph")) / "smollm2-135m-instruct-fp32"
            for f in ("tokenizer.json", "tokenizer_config.json"):
                if (tok / f).is_file():
                    shutil.copy(tok / f, folder / f)
        tokens_file = root / f"tokens-{name}.npy"
        np.save(tokens_file, np.random.default_rng(0).integers(0, SIZES[name]["vocab_size"], args.windows * args.seq_len * 2))
        out = root / f"llama-{name}-lf"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), args.select, args.fuse, str(args.windows),
                               str(args.seq_len), str(tokens_file), args.onnx, "0" if args.no_fingerprint else "1"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load = os.getloadavg()[1]
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ckpt_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        tokens = args.windows * args.seq_len
        compute_floor = forward_flops(name, tokens) / (fp32 * 1e9)
        io_floor = ckpt_bytes / read_rate + r["bytes_written"] / write_rate
        row = dict(size=name, params=r["params"][0], checkpoint_gb=ckpt_bytes / 1e9, made_s=made, wall_s=wall, cpu_s=r["cpu_s"], load5=load, peak_rss_gb=r["peak_rss"] / 1e9,
                   estimate_peak_gb=r["estimate_peak"] / 1e9, read_gb=r["bytes_read"] / 1e9, disk_read_gb=r["disk_read"] / 1e9,
                   written_gb=r["bytes_written"] / 1e9, compute_floor_s=compute_floor, io_floor_s=io_floor,
                   ratio=wall / max(compute_floor, io_floor), stages=r["seconds"], blocks=r["blocks"], plan=r["plan"],
                   onnx=r["onnx"], onnx_reason=r["onnx_reason"], exit_code=r["exit_code"])
        rows.append(row)
        print(json.dumps(row))
        shutil.rmtree(out, ignore_errors=True)
        if args.delete:
            shutil.rmtree(folder, ignore_errors=True)
            tokens_file.unlink(missing_ok=True)
    print()
    print("| size | params | bf16 GB | wall s | CPU s | peak RSS GB (est.) | read GB (disk) | written GB | compute floor s | I/O floor s | wall / max floor | stages s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items() if k != "total")
        print(f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['checkpoint_gb']:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_gb']:.2f} ({r['estimate_peak_gb']:.2f}) | "
              f"{r['read_gb']:.2f} ({r['disk_read_gb']:.2f}) | {r['written_gb']:.2f} | {r['compute_floor_s']:.1f} | {r['io_floor_s']:.1f} | {r['ratio']:.1f} | {stages} |")
    for r in rows:
        if r["onnx"]:
            print(f"{r['size']}: ONNX by onnxruntime-genai's builder: {r['stages'].get('onnx', 0):.0f} s, builder peak {r['onnx']['builder_peak'] / 1e9:.2f} GB, "
                  f"check {r['stages'].get('onnx check', 0):.0f} s, prefill max rel {r['onnx']['check_rel']:.1e}")
        elif args.onnx != "none":
            print(f"{r['size']}: no ONNX: {r['onnx_reason']}")
    if len(rows) >= 2:
        x = np.log([r["params"] for r in rows])
        y = np.log([r["wall_s"] for r in rows])
        slope = float(np.polyfit(x, y, 1)[0])
        print(f"\ncost exponent (log-log slope of wall time against parameters): {slope:.2f}")
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
