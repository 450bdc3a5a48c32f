"""Know before the heavy work: the peak memory of an in-memory ``compress``, from the config.

The in-memory path holds the model in float32 whatever its stored dtype, a traced graph, the
rewritten copy, the teacher's outputs and the ONNX export at once; its peak resident memory
grows with the parameter count. :func:`in_memory_peak` turns the count (read from
``config.json`` by building the model on the meta device: no weight is read) into bytes with
a ratio measured on SmolLM2-135M's README main job, and :func:`check_in_memory_fits` stops a
run that would be killed by the kernel with one line that names what fits instead:
``--stream`` (checkpoint only, block by block).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LfgraphError

GB = 1 << 30
#: Resident memory of the process with torch, transformers and onnxruntime imported.
RUNTIME_BYTES = 700 << 20
#: Peak resident bytes per float32 parameter byte of the in-memory path (model, traced
#: graph, rewritten copy, distillation, ONNX export and its check together); measured on
#: SmolLM2-135M's main job (3 Dec 2026, 19:25, warm): peak 5.39e9 bytes (maxrss) for
#: 0.538e9 bytes of float32 weights, less the runtime: 8.65; rounded up. (It was 7.9 before
#: the training loop kept its freed memory for reuse: lfgraph.allocator.)
BYTES_PER_WEIGHT_BYTE = 9.0


@dataclass
class MemoryEstimate:
    """What the in-memory path will hold at its peak, and what is free for it."""

    parameters: int
    peak_bytes: int
    available_bytes: int

    def summary(self) -> str:
        return (f"estimate: peak memory about {self.peak_bytes / GB:.1f} GB for {self.parameters / 1e9:.2f}B parameters "
                f"held in float32 ({self.available_bytes / GB:.1f} GB available)")


def available_memory() -> int:
    """Bytes a new allocation can have now (``MemAvailable``: free plus reclaimable cache)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency; /proc as a fallback
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def parameter_count(folder: str | os.PathLike) -> int | None:
    """Parameters of the model ``folder/config.json`` describes (built on the meta device, so
    no memory and no weights); ``None`` when transformers cannot build it from the config."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(folder)
        auto = AutoModelForCausalLM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (cfg.architectures or [])) else AutoModel
        with torch.device("meta"):
            model = auto.from_config(cfg)
    except Exception:  # the loader says what is wrong with the folder, with its own words
        return None
    return sum(p.numel() for p in model.parameters())


def in_memory_peak(parameters: int) -> int:
    """Estimated peak resident bytes of the in-memory ``compress`` of a model this size."""
    return int(RUNTIME_BYTES + BYTES_PER_WEIGHT_BYTE * 4 * parameters)


def check_in_memory_fits(folder: str | os.PathLike, available: int | None = None) -> MemoryEstimate | None:
    """Refuse (``LfgraphError``, exit 2) a model whose in-memory compress would not fit in
    the memory available, naming ``--stream``; returns the estimate, or ``None`` when the
    folder's config cannot be read here (the loader reports that)."""
    n = parameter_count(folder)
    if n is None:
        return None
    est = MemoryEstimate(n, in_memory_peak(n), available_memory() if available is None else available)
    if est.peak_bytes > est.available_bytes:
        raise LfgraphError(
            f"{est.summary()}: the in-memory path would not fit; use --stream (Hugging Face checkpoint out, "
            "block by block, in the checkpoint's dtype; --fuse calibrated or remove), or a machine with more memory. Nothing was loaded")
    return est
