"""What ``compress`` writes, behind one small interface: one ONNX file, or (for causal
language models given ``-o OUT_DIR/``) a deploy folder — a Hugging Face checkpoint, a
with-past ``model.onnx`` for ONNX Runtime and onnxruntime-genai, ``genai_config.json``.

Each output kind writes into a staging path, checks what it wrote against the rewritten
model (outputs by name for a file; prefill, decode and greedy generation token for token
for a folder), names the original it is timed against, and times both alternately.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import LfgraphError
from .onnx_io import file_bytes, runner
from .sources import Source, TorchSource
from .verify import alternating_latency, compare_outputs


class OnnxFileOutput:
    """One ``.onnx`` file (plus ``.data`` when large), for every source and model type."""

    kind = "onnx"

    def __init__(self, source: Source, out: Path) -> None:
        self.source, self.out = source, out

    def staged_path(self, folder: Path) -> Path:
        return folder / self.out.name

    def write(self, compressed: Any, staged: Path, metadata: Mapping[str, str], plan: Any = None) -> None:
        self.source.write(compressed, staged, metadata)

    def check(self, compressed: Any, staged: Path, rtol: float | None) -> Any:
        """The file against the rewritten model, outputs by name, on the verification feed."""
        feed = self.source.verification_feed()
        run = runner(staged)
        return compare_outputs(self.source.reference_outputs(compressed, feed), run.run(feed), run.provider,
                               "the rewritten model", rtol or self.source.rtol, feed.get("attention_mask"))

    def original(self, quiet: bool) -> Path:
        return self.source.original_file(quiet)

    def model_file(self, staged: Path) -> Path:
        return staged

    def size(self, path: Path) -> int:
        return file_bytes(path)

    def latency(self, original: Path, staged: Path) -> tuple[str, float, float]:
        (before, _), (after, _) = alternating_latency([original, staged], self.source.latency_feed(), runs=10)
        return "ORT latency (median)", before, after

    def finish(self, staged: Path) -> None:
        """Move the staged file (the data file first) over ``out``."""
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, self.out.with_name(self.out.name + ".data"))
        os.replace(staged, self.out)


class DeployFolderOutput(OnnxFileOutput):
    """A causal LM's deploy folder: HF checkpoint + with-past ONNX + genai_config.json."""

    kind = "deploy-folder"
    #: decode timing: new tokens after a prompt of this many tokens, batch 1
    PROMPT, NEW_TOKENS = 64, 32

    def __init__(self, source: TorchSource, out: Path) -> None:
        super().__init__(source, out)
        self.model = source.model

    def staged_path(self, folder: Path) -> Path:
        return folder / "out"

    def write(self, compressed: Any, staged: Path, metadata: Mapping[str, str], plan: Any = None) -> None:
        from .deploy import write_deploy_folder

        staged.mkdir()
        n_before = len(self.source.graph().blocks)
        write_deploy_folder(compressed.model, staged, tokenizer=self.model.tokenizer, plan=plan,
                            n_layers_before=n_before, metadata=metadata, verify=False)

    def check(self, compressed: Any, staged: Path, rtol: float | None) -> Any:
        """Prefill and decode logits with the cache, and greedy generation of 32 tokens on
        ORT (and onnxruntime-genai) against PyTorch, token for token."""
        from .deploy import verify_generation

        report = verify_generation(compressed.model, staged, new_tokens=32)
        report.provider = "ONNX Runtime (CPU) and onnxruntime-genai"
        return report

    def original(self, quiet: bool) -> Path:
        """The original model's with-past export, made once and cached by fingerprint."""
        from .deploy import export_decoder_with_past
        from .models import cache_dir

        folder = cache_dir() / "onnx" / f"{self.source.graph().fingerprint()}-with-past"
        if not (folder / "model.onnx").is_file():
            if not quiet:
                print(f"lfgraph: exporting the original {self.source.name} with its KV cache once for comparison (cached in {folder})", flush=True)
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            export_decoder_with_past(self.model.hf_model, tmp, genai_config=False)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        return folder

    def model_file(self, staged: Path) -> Path:
        return staged / "model.onnx"

    def size(self, path: Path) -> int:
        return file_bytes(path / "model.onnx")

    def latency(self, original: Path, staged: Path) -> tuple[str, float, float]:
        """Milliseconds per generated token (greedy decode after a 64-token prompt), the two
        models alternately, median of 3."""
        from .deploy.generation import OrtDecoder

        prompt = [int(t) for t in (np.arange(self.PROMPT) * 7 + 3) % max(self.model.vocab_size, 2)]
        decoders = [OrtDecoder(original / "model.onnx"), OrtDecoder(staged / "model.onnx")]
        times: list[list[float]] = [[], []]
        for _ in range(3):
            for k, dec in enumerate(decoders):
                times[k].append(_decode_ms_per_token(dec, prompt, self.NEW_TOKENS))
        return (f"ORT decode, ms/token ({self.NEW_TOKENS} after {self.PROMPT})", float(np.median(times[0])), float(np.median(times[1])))

    def finish(self, staged: Path) -> None:
        """Put the staged folder at ``out``; an existing folder is replaced only now."""
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old{os.getpid()}")
            os.replace(self.out, old)
        os.replace(staged, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _decode_ms_per_token(dec: Any, prompt: list[int], new_tokens: int) -> float:
    ids = np.asarray([prompt], np.int64)
    logits, past = dec.prefill(ids)
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tok = int(np.argmax(logits[0, -1]))
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, past = dec.step(np.asarray([[tok]], np.int64), mask, past)
    return (time.perf_counter() - t0) * 1e3 / new_tokens


def output_for(source: Source, out: Path) -> OnnxFileOutput:
    """The output kind ``out`` asks for: a ``.onnx`` path is one file; any other path is a
    deploy folder, which only causal language models have."""
    if out.suffix == ".onnx":
        return OnnxFileOutput(source, out)
    if isinstance(source, TorchSource) and source.family == "causal-lm" and source.model.hf_model is not None:
        return DeployFolderOutput(source, out)
    raise LfgraphError(f"output {out} must end in .onnx (a deploy folder -o DIR/ is written for causal language models only)")
