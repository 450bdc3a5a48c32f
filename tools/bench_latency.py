"""Benchmark: ONNX Runtime latency of two ONNX language models side by side.

Runs the sessions alternately (so machine noise hits both alike) on the same inputs and
prints the median latency of each and their ratio.

    .venv/bin/python tools/bench_latency.py ORIGINAL.onnx COMPRESSED.onnx --seq-len 128 --runs 20
"""

from __future__ import annotations

import argparse
import numpy as np

from lfgraph.verify import alternating_latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(args.batch, args.seq_len), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    results = alternating_latency([args.before, args.after], feed, args.runs)
    print(f"input {args.batch} x {args.seq_len} tokens, {args.runs} alternating runs on ONNX Runtime")
    print(f"{'model':<50} {'median ms':>10} {'min ms':>10}")
    for path, (med, low) in zip((args.before, args.after), results):
        print(f"{path:<50} {med:10.1f} {low:10.1f}")
    print(f"ratio after/before (median): {results[1][0] / results[0][0]:.3f}")


if __name__ == "__main__":
    main()
