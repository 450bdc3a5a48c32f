"""Know before the heavy work: peak memory and time of a streaming compress, from the
checkpoint's headers, its config and the recipe.

Memory is the largest of two phases plus the Python runtime: reading the embedding rows of
the calibration tokens and the fingerprint's pieces of tensors; and the block passes: two blocks in
float32 (the selection reads the next block while one computes; the refit holds the kept
block beside the one it runs), the block's stored bytes (mapped while it is read),
the hidden states of every calibration token (two copies for Block Influence, ``n + 2``
for angular runs of ``n``; for ``calibrated`` also the states entering the blocks a run can
start at, ``L - n`` of them, kept by the selection pass for the refit, and three while
refitting), one batch's transient activations, and
for the ``calibrated`` rule the float64 statistics of the refit (with fewer calibration tokens
than inputs, the dual form: the tokens as rows and ``n x n`` kernels; otherwise two ``in x in``
matrices for a down projection of ``in`` inputs: the fit's Gram matrix, into which the held-out part is
added in place for the final solve, and one work buffer holding the shifted matrix and then
its Cholesky factor; the held-out tokens as rows, ``n_val x (in + out)``, while fewer than
``in``; a few ``out x in`` matrices) and the refitted tensors kept until written.

Time is floating-point work divided by matrix-multiply rates measured here in a fraction of
a second: the calibration forward passes (``2 x block parameters x tokens`` per block pass,
plus attention; the refit's from its first run's first block), and for ``calibrated`` the refit's float64 work (Gram accumulation; per
ridge strength tried, :data:`STRENGTHS_TRIED` of the grid by the golden-section search, one
Cholesky factorisation and a solve against the held-out rows; the final factorisation and
solve with ``out`` right-hand sides).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import LfgraphError
from ..estimate import available_memory
from ..passes.calibrated_fusion import DEFAULT_LAMBDAS
from .checkpoint import DTYPES, Checkpoint
from .skeleton import LAYERS_PATH

#: Resident memory of the Python process with torch and transformers imported and a meta
#: skeleton built (measured here: tests/stream/test_memory.py prints it).
RUNTIME_BYTES = 600 << 20
#: Windows per forward batch (as the in-memory passes batch them).
BATCH = 4

GB = 1 << 30
#: Ridge strengths the golden-section search of ``choose_strength`` evaluates on the
#: 9-strength grid when the held-out loss is unimodal (4 or 5; all 9 when it is not).
STRENGTHS_TRIED = 5
#: Fraction of the calibration windows held out to choose the strength (as the refit splits them).
VAL_FRACTION = 0.25


@dataclass
class Estimate:
    """Peak resident bytes by part, the floating-point work and the time it should take."""

    parts: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    forward_flops: float = 0.0
    refit_flops: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0

    def summary(self) -> str:
        """Two lines for people: memory (with its largest parts) and time."""
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:4]
        mem = ", ".join(f"{k} {v / GB:.2f}" for k, v in top)
        return (f"estimate: peak memory {self.peak_bytes / GB:.2f} GB ({mem} GB); "
                f"time {self.seconds:.0f} s ({self.forward_flops / 1e12:.2f} TFLOP forward at {self.rates.get('float32', 0) / 1e9:.0f} GFLOP/s"
                + (f", {self.refit_flops / 1e12:.2f} TFLOP refit at {self.rates.get('float64', 0) / 1e9:.0f} GFLOP/s" if self.refit_flops else "")
                + f"); reads {self.bytes_read / GB:.2f} GB, writes {self.bytes_written / GB:.2f} GB")


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 1024, budget_s: float = 0.15) -> float:
    """Multiply-add rate (FLOP/s, ``2 n^3`` per product) of ``n x n`` matrix products in
    ``dtype`` on this machine, over about ``budget_s`` seconds after one warm-up product."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= budget_s:
            return 2.0 * n**3 * reps / dt


def _block_numel(ckpt: Checkpoint, i: int) -> tuple[int, int]:
    """(elements, stored bytes) of block ``i``."""
    prefix = f"{LAYERS_PATH}.{i}."
    es = [e for n, e in ckpt.tensors.items() if n.startswith(prefix)]
    return sum(e.numel for e in es), sum(e.nbytes for e in es)


def estimate(
    ckpt: Checkpoint, *, n_drop: int, select: str, fuse: str, windows: int, seq_len: int,
    fingerprint: bool = True, rates: dict[str, float] | None = None,
) -> Estimate:
    """Peak memory and time of :func:`lfgraph.stream.compress_checkpoint` on ``ckpt``
    dropping ``n_drop`` of its blocks. ``rates`` (FLOP/s by dtype name, ``float32`` and
    ``float64``) are measured when not given. Reads nothing but the headers."""
    cfg = ckpt.config
    L = ckpt.num_layers
    h = int(cfg["hidden_size"])
    inter = int(cfg.get("intermediate_size") or 4 * h)
    heads = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or h // heads)
    tokens = windows * seq_len
    numel, stored = max(_block_numel(ckpt, i) for i in range(L))
    act = tokens * h * 4
    batch_tokens = min(windows, BATCH) * seq_len
    calibrated = fuse == "calibrated"
    runs = n_drop if select == "block_influence" else 1

    embed = next((e for n, e in ckpt.tensors.items() if n.endswith("embed_tokens.weight")), None)
    # the embedding rows of the calibration tokens, and the fingerprint's 64 MB pieces (as stored and in float32)
    piece = min(64 << 20, 4 * max(e.numel for e in ckpt.tensors.values()))
    embed_phase = act * 2 + 3 * piece
    states = (n_drop + 2 if select == "angular" else 2) * act
    if calibrated:
        # the selection pass keeps the states entering blocks 0 .. L - n_drop - 1 (where a run
        # can start) for the refit: at its last block, those and its own (angular: the last
        # n + 1 states; Block Influence: the block's input and output); the refit holds three
        states = max((L - n_drop + (n_drop + 1 if select == "angular" else 2)) * act, 3 * act)
    parts = {
        "runtime": RUNTIME_BYTES,
        # selection: the block computing and the next one read meanwhile; refit: the block run and the kept one
        "blocks (float32)": numel * 4 * 2,
        "block as stored (mapped while read)": stored,
        "hidden states": states,
        "one batch's activations": batch_tokens * (3 * inter + heads * seq_len + 4 * h) * 4 + (batch_tokens * inter * 16 if calibrated else 0),
    }
    if calibrated:
        d_in = inter + 1
        n_val = min(max(1, round(windows * VAL_FRACTION)) * seq_len, d_in)
        n_fit = tokens - n_val
        if n_fit <= d_in:
            # the dual form: fit and held-out tokens as rows (n x (in + out)), n x n kernels,
            # W0 (the reference) and the solution out x in
            parts["refit statistics (float64, dual form)"] = tokens * (d_in + 2 * h) * 8 * 2 + 3 * tokens * tokens * 8 + 2 * h * d_in * 8
        else:
            # fit Gram + work buffer; C, C + lam W0, the solution, W0; held-out rows and their solve
            parts["refit Gram matrices (float64)"] = 2 * d_in * d_in * 8 + 4 * h * d_in * 8 + n_val * (2 * d_in + h) * 8
        parts["refitted tensors"] = runs * h * inter * DTYPES[embed.dtype if embed else "F32"].itemsize
    block_phase = sum(v for k, v in parts.items() if k != "runtime")
    est = Estimate(parts=parts)
    est.peak_bytes = RUNTIME_BYTES + max(embed_phase, block_phase)
    per_pass = 2 * numel * tokens + 4 * tokens * seq_len * heads * head_dim
    # the refit runs from the first run's first block to the last run's last (angular: the
    # one run of n_drop + 1 blocks; Block Influence: at most the stack), the kept blocks twice more
    span = n_drop + 1 if select == "angular" else L
    passes = L + (span + 2 * n_drop if calibrated else 0)
    est.forward_flops = float(per_pass * passes)
    if calibrated:
        d_in = inter + 1
        n_val = min(max(1, round(windows * VAL_FRACTION)) * seq_len, d_in)
        tried = min(STRENGTHS_TRIED, len(DEFAULT_LAMBDAS))
        if n_fit <= d_in:
            # kernels and residuals (n x in products), then per strength an n x n factorisation
            # and solves with out right-hand sides; the solution T' Z (out x n x in)
            per_run = 2 * tokens * d_in * (tokens + 2 * h) + (tried + 1) * (tokens**3 / 3 + 4 * tokens * tokens * h) + 2 * h * tokens * d_in
        else:
            search = tried * (d_in**3 / 3 + 2 * d_in * d_in * n_val + 2 * h * d_in * n_val)
            per_run = 2 * tokens * d_in * d_in + search + d_in**3 / 3 + 2 * d_in * d_in * h
        est.refit_flops = float(runs * per_run)
    est.rates = dict(rates) if rates else {"float32": matmul_rate(torch.float32), "float64": matmul_rate(torch.float64) if calibrated else 0.0}
    est.seconds = est.forward_flops / est.rates["float32"] + (est.refit_flops / est.rates["float64"] if calibrated else 0.0)
    kept_fraction = (L - n_drop) / L
    layer_bytes = sum(_block_numel(ckpt, i)[1] for i in range(L))
    other = ckpt.total_bytes - layer_bytes
    est.bytes_written = int(other + layer_bytes * kept_fraction)
    est.bytes_read = int(layer_bytes * (1 + (span / L if calibrated else 0)) + (embed.nbytes if embed else 0) + est.bytes_written)
    if fingerprint:
        # the blocks are hashed as the selection pass reads them: only the head (or the
        # embedding it is tied to) is read for the fingerprint
        head = ckpt.tensors.get("lm_head.weight", embed)
        est.bytes_read += head.nbytes if head is not None else 0
    return est


def check_fits(est: Estimate, available: int | None = None, *, windows: int, seq_len: int, fuse: str) -> None:
    """Raise ``LfgraphError`` (exit 2) when the estimated peak exceeds the memory available,
    naming the options that would make it fit."""
    avail = available_memory() if available is None else available
    if est.peak_bytes <= avail:
        return
    hints = []
    if est.parts.get("hidden states", 0) > 0.2 * est.peak_bytes:
        hints.append(f"fewer or shorter calibration windows (now {windows} x {seq_len}: --calibration-windows / --calibration-seq-len)")
    if fuse == "calibrated":
        hints.append("--fuse remove (no refit: no Gram matrices)")
    if not hints:
        hints.append("a machine with more memory")
    raise LfgraphError(
        f"the streaming compress needs about {est.peak_bytes / GB:.1f} GB but {avail / GB:.1f} GB is available: "
        f"use {' or '.join(hints)}; nothing was written"
    )
