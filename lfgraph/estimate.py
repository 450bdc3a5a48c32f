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
from dataclasses import dataclass, field
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
    no memory and no weights); ``None`` when transformers cannot build it from the config.
    Raises ``LfgraphError`` when ``config.json`` is not a JSON object."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .models import is_causal_lm
    from .blocks.checkpoint import read_config

    read_config(Path(folder))  # a config that is not a JSON object: one line (LfgraphError)
    try:
        cfg = AutoConfig.from_pretrained(folder)
        auto = AutoModelForCausalLM if is_causal_lm(cfg) else AutoModel
        with torch.device("meta"):
            model = auto.from_config(cfg)
    except Exception:  # the loader says what is wrong with the folder, with its own words
        return None
    return sum(p.numel() for p in model.parameters())


def in_memory_peak(parameters: int) -> int:
    """Estimated peak resident bytes of the in-memory ``compress`` of a model this size."""
    return int(RUNTIME_BYTES + BYTES_PER_WEIGHT_BYTE * 4 * parameters)


#: The engines ``compress`` can run (``--stream`` / ``--in-memory``; ``auto`` chooses).
ENGINES = ("auto", "stream", "in-memory")


@dataclass
class EngineChoice:
    """Which engine runs and why: ``in-memory`` (the model held) or ``stream`` (its blocks
    onloaded one at a time from the checkpoint); ``fits_in_memory``: the in-memory
    estimate's verdict (``None``: not estimated)."""

    engine: str
    why: str
    estimate: MemoryEstimate | None = None
    fits_in_memory: bool | None = None

    def summary(self) -> str:
        return f"engine: {'block by block from the checkpoint' if self.engine == 'stream' else 'the model held in memory'} ({self.why})"


def choose_engine(spec: object, engine: str = "auto", available: int | None = None) -> EngineChoice | None:
    """The engine of a compress run on ``spec`` (a path or alias; ``None`` for anything
    else: a module is in memory already), before anything is loaded.

    ``auto``: in memory when the in-memory estimate fits the memory available, else block
    by block when ``spec`` is a safetensors checkpoint of a family that streams; a run that
    fits neither way is refused (``LfgraphError``, exit 2). ``stream`` / ``in-memory``
    force one; ``stream`` on anything but a checkpoint folder is refused naming why."""
    if engine not in ENGINES:
        raise LfgraphError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if not isinstance(spec, (str, os.PathLike)):
        if engine == "stream":
            raise LfgraphError("--stream reads a Hugging Face checkpoint folder block by block; a model given in memory is compressed in memory")
        return None
    from .models import ALIASES, checkpoint_folder

    text = str(spec)
    if text.lower().endswith(".onnx") or text.lower().endswith(".gguf") or (text in ALIASES and text != "smollm2"):
        if engine == "stream":
            what = "an ONNX file" if text.lower().endswith(".onnx") else ("a GGUF file" if text.lower().endswith(".gguf") else f"{text} (an encoder)")
            raise LfgraphError(f"--stream reads a Hugging Face safetensors checkpoint folder block by block; {what} is compressed in memory: "
                               "leave out --stream" + ("; or save it as a safetensors folder first" if text.lower().endswith(".gguf") else ""))
        return None
    folder = Path(text) if text not in ALIASES else None
    if folder is not None and not (folder / "config.json").is_file():
        if engine == "stream":
            raise LfgraphError(f"--stream reads a Hugging Face checkpoint folder (config.json + safetensors); {text} is not one")
        return None
    if engine == "stream":
        return EngineChoice("stream", "--stream")
    folder = checkpoint_folder(text)
    n = parameter_count(folder)
    if n is None:
        return None
    est = MemoryEstimate(n, in_memory_peak(n), available_memory() if available is None else available)
    fits = est.peak_bytes <= est.available_bytes
    if engine == "in-memory" or fits:
        if not fits:
            raise LfgraphError(f"{est.summary()}: the in-memory path would not fit; leave out --in-memory (the engine then compresses the "
                               "checkpoint block by block), or use a machine with more memory. Nothing was loaded")
        return EngineChoice("in-memory", "--in-memory" if engine == "in-memory" else est.summary(), est, True)
    refusal = streams(folder)
    if refusal:
        raise LfgraphError(f"{est.summary()}: the in-memory path would not fit, and block by block cannot run: {refusal}. Nothing was loaded")
    return EngineChoice("stream", f"{est.summary()}: it would not fit; its blocks are read one at a time instead", est, False)


def streams(folder: str | os.PathLike) -> str | None:
    """``None`` when ``folder`` is a safetensors checkpoint whose family can be read block
    by block, else the reason (read from the config and the file names only)."""
    from transformers import AutoConfig

    from . import architectures

    p = Path(folder)
    if not (p / "model.safetensors").is_file() and not (p / "model.safetensors.index.json").is_file():
        return f"{p.name} holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json): re-save it with save_pretrained"
    try:
        cfg = AutoConfig.from_pretrained(p)
        arch = architectures.for_config(cfg)
    except LfgraphError as e:
        return str(e)
    except Exception as e:
        return f"transformers cannot read its config ({str(e).splitlines()[0][:160]})"
    return arch.stream_refusal(cfg)


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


#: Peak resident bytes per float32 parameter byte of the logit distillation on a checkpoint
#: (the compressed model and the original held in float32, the teacher's cached outputs, the
#: trained blocks' gradients and AdamW state): the in-memory path's ratio, whose peak is
#: that stage's (the main job's peak is during the distillation).
LOGIT_BYTES_PER_WEIGHT_BYTE = BYTES_PER_WEIGHT_BYTE


def logit_distillation_peak(parameters: int, plan: object = None) -> int:
    """Estimated peak resident bytes of the logit distillation of a model of ``parameters``
    parameters read from a checkpoint (it holds the model as the in-memory path does)."""
    return int(RUNTIME_BYTES + LOGIT_BYTES_PER_WEIGHT_BYTE * 4 * parameters)


# ---------------------------------------------------------------------------------------
# block by block

#: The ONNX builder's child process's runtime (Python, torch, transformers, onnx) and ONNX Runtime's own.
ONNX_RUNTIME_BYTES = 1 << 30

#: Resident bytes per parameter of writing and checking float32 ONNX, measured
#: (tools/bench_scale.py --onnx auto, docs/scale.md): the builder's child peaked at 4.8 bytes
#: a parameter (transformers loads the checkpoint in float32), the check's process at 6.6
#: (ONNX Runtime's float32 weights while its session loads, the streamed reference, the
#: runtime) on a 1B model with 0.99B parameters after compression.
ONNX_BYTES_PER_PARAM = 6


def onnx_peak_bytes(params: int, stored_bytes: int) -> int:
    """Peak resident bytes of writing and checking float32 ONNX for a model of ``params``
    parameters (``stored_bytes`` on disk): :data:`ONNX_BYTES_PER_PARAM` a parameter plus the
    runtime, or the stored bytes if larger."""
    return ONNX_RUNTIME_BYTES + max(stored_bytes, ONNX_BYTES_PER_PARAM * params)




#: Resident memory of the process with torch, transformers and onnxruntime imported and a
#: meta model built (measured: tests/blocks/test_memory.py prints it).
BLOCKS_RUNTIME_BYTES = 600 << 20
#: Windows per forward batch (as every pass batches them).
BATCH = 4
#: Ridge strengths the golden-section search evaluates on the 9-strength grid (4 or 5).
STRENGTHS_TRIED = 5
#: Fraction of the calibration windows the refit holds out.
VAL_FRACTION = 0.25


@dataclass
class BlocksEstimate:
    """Peak resident bytes of a block-by-block compress, by phase and part; its
    floating-point work by phase; bytes read and written; the compute time at the measured
    matrix-multiply rates."""

    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def peak_bytes(self) -> int:
        return BLOCKS_RUNTIME_BYTES + max((sum(p.values()) for p in self.phases.values()), default=0)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: sum(self.phases[k].values())) if self.phases else ""

    @property
    def seconds(self) -> float:
        return sum(f / self.rates.get("float64" if k == "refit solve" else "float32", 1e11) for k, f in self.flops.items())

    def summary(self) -> str:
        phase = self.peak_phase
        top = sorted(self.phases.get(phase, {}).items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in top)
        work = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in self.flops.items() if v >= 1e9)
        return (f"estimate (block by block): peak memory {self.peak_bytes / GB:.2f} GB during the {phase} ({parts} GB); "
                f"compute about {self.seconds:.0f} s ({work} TFLOP at {self.rates.get('float32', 0) / 1e9:.0f} GFLOP/s float32); "
                f"reads {self.bytes_read / GB:.2f} GB, writes {self.bytes_written / GB:.2f} GB")


def matmul_rate(dtype: object = None, n: int = 1024, budget_s: float = 0.15) -> float:
    """Multiply-add rate (FLOP/s, ``2 n^3`` per product) of ``n x n`` matrix products in
    ``dtype`` (default float32) on this machine, over about ``budget_s`` seconds after one
    warm-up product."""
    import time

    import torch

    dtype = dtype or torch.float32
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


def blocks_estimate(
    source: object, *, n_drop: int, select: str, fuse: str, objective: str | None, windows: int, seq_len: int,
    eval_windows: int = 4, eval_seq_len: int = 512, onnx: bool = False, rates: dict[str, float] | None = None,
    completions: bool = False, runs: int | None = None, trained: int | None = None,
) -> BlocksEstimate:
    """Peak memory and work of a block-by-block compress of ``source`` (a
    :class:`~lfgraph.blocks.CheckpointBlocks`) dropping ``n_drop`` blocks with selection
    ``select`` and fusion rule ``fuse`` (the CLI's names); ``objective``: the distilling
    rules' (``logit`` / ``blockwise``; ``None`` for the others). Reads the headers only.

    Phases (the peak is the largest plus the runtime): the selection pass (two blocks in
    float32: the one computing and the next read meanwhile; the block as stored, mapped
    while read; the hidden states of every calibration token it keeps: two, ``n + 2`` for
    angular runs of ``n``, and for a refit the states entering every block a run can
    start at; one batch's activations; SLEB: the state of the model without each
    candidate and the head's logits of its small budget); the refit (three blocks, three
    states per token, the float64 statistics: in the dual form with fewer tokens than
    inputs, else two ``in x in`` matrices); the distillation (logit: the in-memory path's
    ratio on the model; block-wise: one block training with its gradient and AdamW's two
    moments, the blocks around it, a batch's activations kept for the backward pass); the
    quality measure (the head in float32, both models' final states, a window's logits
    four times over); ONNX (onnxruntime-genai's builder and ONNX Runtime holding the
    float32 model in a child process, :data:`lfgraph.deploy.genai_builder.ONNX_BYTES_PER_PARAM`); with
    ``completions`` (both models fit in memory together) the report's sample completions, one
    model held whole at a time. ``runs`` / ``trained``: the plan's runs and the blocks the
    block-wise objective trained, when known (after the work: a benchmark's floor); before
    it, the selection's worst case (Block Influence and SLEB: a run a block)."""
    from .registry import SELECTION_REGISTRY, fusion_rule

    cfg = source.config  # type: ignore[attr-defined]
    L = source.num_blocks  # type: ignore[attr-defined]
    ckpt = source.ckpt  # type: ignore[attr-defined]
    h = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or getattr(cfg, "ffn_dim", 0) or 4 * h)
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 1) or 1)
    head_dim = int(getattr(cfg, "head_dim", 0) or h // heads)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    stack = source.stack_path + "."  # type: ignore[attr-defined]
    per_block: dict[int, tuple[int, int]] = {}
    for name, e in ckpt.tensors.items():
        if name.startswith(stack) and name[len(stack):].split(".")[0].isdigit():
            i = int(name[len(stack):].split(".")[0])
            n, b = per_block.get(i, (0, 0))
            per_block[i] = (n + e.numel, b + e.nbytes)
    numel, stored = max(per_block.values(), default=(0, 0))
    block_bytes = numel * 4
    stored_itemsize = max(1, stored // max(numel, 1))
    layer_bytes = sum(b for _, b in per_block.values())
    params = source.parameter_count()  # type: ignore[attr-defined]
    params_after = params - n_drop * numel
    tokens = windows * seq_len
    act = tokens * h * 4
    batch_tokens = min(windows, BATCH) * seq_len
    batch_act = batch_tokens * (3 * inter + heads * seq_len + 4 * h) * 4
    rule = fusion_rule(fuse)
    calibrated = rule.plan_fuse == "calibrated"
    sel = SELECTION_REGISTRY[select]
    if runs is None:
        runs = n_drop if select in ("block_influence", "sleb") else 1
    est = BlocksEstimate()

    # -- selection
    if sel.needs_activations:
        if select == "sleb":
            budget = sel.budget
            bt = (budget.windows if budget else 2) * (budget.tokens if budget else 64)
            est.phases["selection (SLEB)"] = {"blocks (float32)": 2 * block_bytes, "block as stored": stored,
                                              "states without each candidate": L * bt * h * 4, "head logits": 3 * bt * vocab * 4 + vocab * h * 4}
            est.flops["selection"] = float((L + n_drop * L * L / 2) * 2 * numel * bt + n_drop * L * 2 * vocab * h * bt)
        else:
            states = (n_drop + 2 if select == "angular" else 2) * act
            if calibrated:
                states += (L - n_drop) * act
            est.phases["selection"] = {"blocks (float32)": 2 * block_bytes, "block as stored": stored, "hidden states": states,
                                       "one batch's activations": batch_act}
            est.flops["selection"] = float(L * (2 * numel * tokens + 4 * tokens * seq_len * heads * head_dim))
        est.bytes_read += layer_bytes
    else:  # weight similarity: two layers' weights at a time, float64 for the measures
        est.phases["analysis"] = {"two blocks' layers (float64)": 4 * numel * 8}
        est.bytes_read += layer_bytes * 2
    # -- the rewrite
    if calibrated:
        d_in = inter + 1
        n_val = min(max(1, round(windows * VAL_FRACTION)) * seq_len, d_in)
        n_fit = tokens - n_val
        if n_fit <= d_in:
            stats = tokens * (d_in + 2 * h) * 8 * 2 + 3 * tokens * tokens * 8 + 2 * h * d_in * 8
            solve = 2 * tokens * d_in * (tokens + 2 * h) + (STRENGTHS_TRIED + 1) * (tokens**3 / 3 + 4 * tokens * tokens * h) + 2 * h * tokens * d_in
        else:
            stats = 2 * d_in * d_in * 8 + 4 * h * d_in * 8 + n_val * (2 * d_in + h) * 8
            solve = 2 * tokens * d_in * d_in + STRENGTHS_TRIED * (d_in**3 / 3 + 2 * d_in * d_in * n_val) + d_in**3 / 3 + 2 * d_in * d_in * h
        span = n_drop + 1 if select == "angular" else L
        est.phases["refit"] = {"blocks (float32)": 3 * block_bytes, "hidden states": 3 * act, "refit statistics (float64)": int(stats),
                               "one batch's activations": batch_act + batch_tokens * inter * 16,
                               "refitted tensors": runs * h * inter * stored_itemsize}
        est.flops["refit passes"] = float((span + 2 * n_drop) * 2 * numel * tokens)
        est.flops["refit solve"] = float(runs * solve)
        est.bytes_read += int(layer_bytes * span / L)
    if rule.distill and objective == "logit":
        est.phases["distillation (logit)"] = {"both models and the training (in-memory ratio)": logit_distillation_peak(params) - RUNTIME_BYTES}
        est.flops["distillation"] = float(3 * 2 * params_after * 2 * seq_len * 120)
        est.bytes_read += ckpt.total_bytes * 2
    elif rule.distill:
        from .passes.blockwise_distillation import BlockwiseSettings

        bw = BlockwiseSettings()
        if trained is None:
            trained = runs * (2 if bw.trainable == "neighbors" else 1)
        est.phases["distillation (block-wise)"] = {
            "the block training, its gradient and AdamW's moments": 4 * block_bytes, "the blocks around it": 2 * block_bytes,
            "hidden states": 5 * act, "activations kept for the backward pass": 3 * batch_act,
            "trained blocks kept (stored dtype)": trained * stored}
        est.flops["distillation"] = float(trained * (bw.steps * 3 + (bw.steps // bw.eval_every + 1) * VAL_FRACTION * BATCH) * 2 * numel * batch_tokens)
        est.bytes_read += trained * stored
    # -- write, quality, export check
    est.bytes_written = int(ckpt.total_bytes - n_drop * stored)
    est.bytes_read += est.bytes_written
    eval_tokens = eval_windows * eval_seq_len
    if eval_windows > 0:
        from .evaluate import KL_CHUNK

        # one head for both models (a view shares the checkpoint's); a window's logits of
        # each, and the log-probabilities of KL_CHUNK positions at a time
        est.phases["quality measure"] = {"head (float32)": vocab * h * 4, "both models' final states": 2 * eval_tokens * h * 4,
                                         "a window's logits, both models": 2 * eval_seq_len * vocab * 4 + 5 * KL_CHUNK * vocab * 4,
                                         "blocks (float32)": 2 * block_bytes}
        est.flops["quality measure"] = float((2 * L - n_drop) * 2 * numel * eval_tokens + 2 * 2 * vocab * h * eval_tokens)
        est.bytes_read += int(layer_bytes * (2 * L - n_drop) / L) + 2 * vocab * h * stored_itemsize
        if completions:  # the report's sample completions: one model at a time held whole in float32
            est.phases["sample completions"] = {"one model held in float32": 4 * params, "a window's logits": 4 * eval_seq_len * vocab * 4}
            est.bytes_read += ckpt.total_bytes * 2
    est.bytes_read += 2 * int(layer_bytes * (L - n_drop) / L)  # the export check reads both back
    if onnx:
        est.phases["ONNX (builder, child process)"] = {"the float32 model in the builder or ONNX Runtime": onnx_peak_bytes(params_after, est.bytes_written)}
    import torch

    est.rates = dict(rates) if rates else {"float32": matmul_rate(torch.float32), "float64": matmul_rate(torch.float64) if calibrated else 0.0}
    return est


def check_blocks_fit(est: BlocksEstimate, available: int | None = None, *, windows: int, seq_len: int, fuse: str) -> None:
    """Raise ``LfgraphError`` (exit 2) when the block-by-block estimate exceeds the memory
    available, naming the options that would make it fit."""
    avail = available_memory() if available is None else available
    if est.peak_bytes <= avail:
        return
    hints = []
    phase = est.phases.get(est.peak_phase, {})
    if phase.get("hidden states", 0) > 0.2 * est.peak_bytes:
        hints.append(f"fewer or shorter calibration windows (now {windows} x {seq_len}: --calibration-windows / --calibration-seq-len)")
    if "refit" in est.peak_phase:
        hints.append("--fuse remove (no refit)")
    if "ONNX" in est.peak_phase:
        hints.append("--no-onnx")
    if not hints:
        hints.append("a machine with more memory")
    raise LfgraphError(f"the block-by-block compress needs about {est.peak_bytes / GB:.1f} GB (during the {est.peak_phase}) but "
                       f"{avail / GB:.1f} GB is available: use {' or '.join(hints)}; nothing was written")
