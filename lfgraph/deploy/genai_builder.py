"""The deploy folder's ONNX for a checkpoint compressed block by block, written by
onnxruntime-genai's model builder, and its export check.

The in-memory exporter (:mod:`lfgraph.deploy`) traces the whole model with torch.export,
which is what the streaming path exists to avoid. onnxruntime-genai's builder
(``python -m onnxruntime_genai.models.builder``; the in-memory path offers it as
``write_deploy_folder(engine="genai-builder")``) writes onnxruntime-genai's layout
(``model.onnx`` + ``model.onnx.data``, ``genai_config.json``, inputs ``input_ids``,
``attention_mask``, ``past_key_values.N.key|value``, outputs ``logits``, ``present.N.*``;
no ``position_ids``, fused ``GroupQueryAttention`` contrib ops: ONNX Runtime only) for the
families the streaming path reads (Llama, Qwen2, Qwen3, Mistral), op by op from the
checkpoint's tensors. It runs in a child process, so that its memory (the checkpoint in its
stored dtype while the float32 graph is written) goes back to the system when it ends.

The export check runs the written ONNX file with ONNX Runtime on a short prompt and
compares its prefill logits with the written checkpoint's, computed block by block
(:func:`streamed_logits`): the checkpoint is never held whole, but ONNX Runtime holds the
float32 model, which with the builder's own peak decides whether ONNX is written at all
(:func:`onnx_peak_bytes`, ``--onnx auto``).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LfgraphError
from .. import estimate

#: The files onnxruntime-genai's builder writes into the folder.
ONNX_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")
#: ``--onnx`` choices of ``compress --stream``: ``auto`` writes float32 ONNX when it fits
#: in the memory available (see :func:`onnx_peak_bytes`), ``fp32`` always, ``none`` never.
ONNX_CHOICES = ("auto", "fp32", "none")
#: Tokens of the export check's prompt.
CHECK_TOKENS = 16
#: The export check's tolerance: largest absolute difference over the largest logit.
CHECK_RTOL = 1e-4


@dataclass
class OnnxResult:
    """What writing the ONNX file did: the builder's time and peak memory, and the check."""

    seconds: float
    builder_peak_bytes: int
    check_rel: float
    check_seconds: float
    rtol: float = CHECK_RTOL

    @property
    def passed(self) -> bool:
        return self.check_rel <= self.rtol


from ..estimate import ONNX_BYTES_PER_PARAM, onnx_peak_bytes  # noqa: E402,F401  (the one estimate; re-exported)


#: Tokenizer files onnxruntime-genai's builder can read without a slow-tokenizer conversion
#: (it reads the tokenizer before it writes anything, and copies it for generation).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files the builder can read."""
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def builder_refusal(config: dict | None, tokenizer: bool) -> str | None:
    """Why the builder's ONNX cannot be written for this checkpoint, known before any work:
    what ONNX Runtime cannot run (:func:`lfgraph.deploy.limits.onnx_refusal`), or no
    tokenizer files; ``None`` when nothing stands in the way."""
    from ..deploy.limits import onnx_refusal

    refusal = onnx_refusal(config, "genai-builder") if config is not None else None
    if refusal:
        return refusal
    if not tokenizer:
        return (f"the checkpoint has no tokenizer files ({', '.join(TOKENIZER_FILES)}): onnxruntime-genai's builder "
                "reads them, and generation needs them")
    return None


def wants_onnx(choice: str, params: int, stored_bytes: int, available: int | None = None, tokenizer: bool = True,
               config: dict | None = None) -> tuple[bool, str]:
    """(write ONNX?, the reason in words) for ``--onnx choice``; ``tokenizer``: whether the
    checkpoint has tokenizer files (:func:`has_tokenizer`; the builder needs them);
    ``config``: the checkpoint's, for what ONNX Runtime cannot run
    (:func:`lfgraph.deploy.limits.onnx_refusal`: ``fp32`` raises ``LfgraphError``, ``auto``
    writes the checkpoint only and says why)."""
    if choice not in ONNX_CHOICES:
        raise LfgraphError(f"--onnx must be one of {', '.join(ONNX_CHOICES)}, got {choice!r}")
    if choice == "none":
        return False, "--onnx none"
    refusal = builder_refusal(config, tokenizer)
    if refusal:
        if choice == "fp32":
            raise LfgraphError(f"ONNX cannot be written for this model: {refusal}")
        return False, f"{refusal}; checkpoint only"
    need = onnx_peak_bytes(params, stored_bytes)
    avail = estimate.available_memory() if available is None else available
    if choice == "fp32" or need <= avail:
        return True, f"float32 ONNX of {params / 1e9:.2f}B parameters needs about {need / (1 << 30):.1f} GB, {avail / (1 << 30):.1f} GB available"
    return False, (f"float32 ONNX of {params / 1e9:.2f}B parameters needs about {need / (1 << 30):.1f} GB "
                   f"(the builder and ONNX Runtime hold it whole in float32) but {avail / (1 << 30):.1f} GB is available: checkpoint only "
                   "(build ONNX from it where there is more memory: python -m onnxruntime_genai.models.builder -i OUT -p fp32 -e cpu)")


def build_onnx(folder: Path) -> tuple[float, int]:
    """Write ``model.onnx`` (+ ``.data``) and ``genai_config.json`` into ``folder`` (a
    checkpoint folder) with onnxruntime-genai's builder in a child process, float32 for the
    CPU. Returns (seconds, the child's peak resident bytes). Raises ``LfgraphError`` with
    the builder's last line when it fails."""
    try:
        import onnxruntime_genai  # noqa: F401  # the builder ships with it
    except ImportError:
        raise LfgraphError("writing ONNX on the streaming path needs onnxruntime-genai (pip install 'lfgraph[deploy]'), "
                           "or use --onnx none") from None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lfgraph-genai-") as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(folder),
               "-p", "fp32", "-e", "cpu", "-c", cache]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate()
        finally:
            if proc.poll() is None:  # interrupted: the child goes too, nothing is left running
                proc.kill()
                proc.wait()
    if proc.returncode != 0 or not (folder / "model.onnx").is_file():
        last = next((line for line in reversed(out.splitlines()) if line.strip()), "no output")
        raise LfgraphError(f"onnxruntime-genai's builder could not write ONNX for this model: {last.strip()} "
                           "(use --onnx none for the checkpoint alone)")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return time.perf_counter() - t0, peak


@torch.no_grad()
def streamed_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``(batch, seq, vocab)`` of the checkpoint in ``folder`` on ``ids``,
    computed one decoder block at a time (the model is never held whole)."""
    from ..blocks import CheckpointBlocks
    from ..evaluate import final_states

    source = CheckpointBlocks(folder)
    states, batches, _ = final_states(source, ids, int(ids.shape[0]))
    return source.logits(states[0], batches[0])


def check_onnx(folder: Path, ids: torch.Tensor) -> tuple[float, float]:
    """(largest |ONNX - checkpoint| over the largest |logit|, seconds): the prefill logits of
    ``folder/model.onnx`` under ONNX Runtime against :func:`streamed_logits`."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    ref = streamed_logits(folder, ids).numpy()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    a = ids.numpy().astype(np.int64)
    import json

    cfg = json.loads((folder / "config.json").read_text())
    kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    feeds: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = a
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(a)
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(a.shape[1], dtype=np.int64), a.shape).copy()
        elif i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((a.shape[0], kv_heads, 0, head_dim), dtype=np.float32)
        else:
            raise LfgraphError(f"the builder's ONNX file has an input lfgraph does not know how to feed: {i.name}")
    logits = session.run(["logits"], feeds)[0]
    del session
    rel = float(np.abs(logits - ref).max() / max(float(np.abs(ref).max()), 1e-30))
    return rel, time.perf_counter() - t0


def write_onnx(folder: Path, ids: torch.Tensor, rtol: float = CHECK_RTOL) -> OnnxResult:
    """Build ``folder``'s ONNX and check it on the first :data:`CHECK_TOKENS` of ``ids``'s
    first row."""
    seconds, peak = build_onnx(folder)
    rel, check_seconds = check_onnx(folder, ids[:1, :CHECK_TOKENS])
    return OnnxResult(seconds=seconds, builder_peak_bytes=peak, check_rel=rel, check_seconds=check_seconds, rtol=rtol)
