"""What ``compress`` writes, behind one small interface: one ONNX file, or (for causal
language models given ``-o OUT_DIR/``) a deploy folder — a Hugging Face checkpoint, a
with-past ``model.onnx`` for ONNX Runtime and onnxruntime-genai, ``genai_config.json``.

Each output kind writes into a staging path, checks what it wrote against the rewritten
model (outputs by name for a file; prefill, decode and greedy generation token for token
for a folder), names the original it is timed against, and times both alternately.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from . import architectures
from .errors import LfgraphError
from .fileio import check_shadowing, commit_folder, write_text_atomic
from .onnx_io import add_metadata, file_bytes, save_onnx
from .sources import Source, TorchSource
from .verify import alternating_latency, verify_onnx


class OnnxFileOutput:
    """One ``.onnx`` file (plus ``.data`` when large), for every source and model type."""

    kind = "onnx"
    #: the size row's name; a compressed file larger than the original is an error (its
    #: weights came out of constant subgraphs the rewrite had to materialise)
    size_name = "ONNX file"
    larger_is_error = True

    def __init__(self, source: Source, out: Path) -> None:
        self.source, self.out = source, out

    def mark_failed(self, staged: Path, verdict: str) -> None:
        """Say in the staged output that it failed a check (``lfgraph.check``)."""
        mark_onnx_failed(self.model_file(staged), verdict)

    def staged_path(self, folder: Path) -> Path:
        return folder / self.out.name

    def write(self, compressed: Any, staged: Path, metadata: Mapping[str, str], plan: Any = None) -> None:
        self.source.write(compressed, staged, metadata)

    def check(self, compressed: Any, staged: Path, rtol: float | None) -> Any:
        """The file against the rewritten model, outputs by name, on the verification feed."""
        feed = self.source.verification_feed()
        return verify_onnx(staged, self.source.reference_outputs(compressed, feed), feed, "the rewritten model", rtol or self.source.rtol)

    def original(self, quiet: bool) -> Path:
        return self.source.original_file(quiet)

    def model_file(self, staged: Path) -> Path:
        return staged

    def size(self, path: Path) -> int:
        return file_bytes(path)

    def latency(self, original: Path, staged: Path) -> tuple[str, float, float]:
        (before, _), (after, _) = alternating_latency([original, staged], self.source.latency_feed(), runs=10)
        return "ORT latency (median)", before, after

    def check_destination(self) -> None:
        """Refuse, before the heavy work, a destination the output cannot be put at (one file:
        :func:`lfgraph.fileio.check_outputs` said all there is)."""

    def finish(self, staged: Path, dest: Path) -> None:
        """Move the staged file (the data file first) to ``dest`` (``out``, or where a
        failed check puts it)."""
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, dest.with_name(dest.name + ".data"))
        os.replace(staged, dest)


class DeployFolderOutput(OnnxFileOutput):
    """A causal LM's deploy folder: HF checkpoint + with-past ONNX + genai_config.json."""

    kind = "deploy-folder"

    def __init__(self, source: TorchSource, out: Path) -> None:
        super().__init__(source, out)
        self.model = source.model

    def staged_path(self, folder: Path) -> Path:
        return folder / "out"

    #: What the folder holds besides the checkpoint's weights.
    extra_files: tuple[str, ...] = ("model.onnx", "model.onnx.data", "genai_config.json", "plan.json")

    def check_destination(self) -> None:
        """Refuse (exit 2) an existing folder of the user's holding model files that would
        stay beside this folder's (:func:`lfgraph.fileio.check_shadowing`), before the heavy
        work; :func:`lfgraph.fileio.commit_folder` checks again with the files written."""
        from .deploy.checkpoint import checkpoint_file_names

        weight_bytes = 4 * self.source.parameter_count()  # float32, tied weights once
        check_shadowing(self.out, checkpoint_file_names(weight_bytes) + list(self.extra_files))

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

        return verify_generation(compressed.model, staged, new_tokens=32)

    def original(self, quiet: bool) -> Path:
        """The original model's with-past export, made once and cached by fingerprint (made
        again when the cache entry is damaged, :mod:`lfgraph.cache`)."""
        from .cache import cache_dir, cache_entry, cached_folder
        from .deploy import export_decoder_with_past

        folder = cache_dir() / "onnx" / f"{self.source.graph().fingerprint()}-with-past"
        if cached_folder(folder, ["model.onnx"]) is None:
            if not quiet:
                print(f"lfgraph: exporting the original {self.source.name} with its KV cache once for comparison (cached in {folder})", flush=True)
            with cache_entry(folder, ["model.onnx"]) as tmp:
                export_decoder_with_past(self.model.hf_model, tmp, genai_config=False)
        return folder

    def model_file(self, staged: Path) -> Path:
        return staged / "model.onnx"

    def size(self, path: Path) -> int:
        return file_bytes(path / "model.onnx")

    def latency(self, original: Path, staged: Path) -> tuple[str, float, float]:
        return decode_latency(original / "model.onnx", staged / "model.onnx", self.model.vocab_size)

    def finish(self, staged: Path, dest: Path) -> None:
        """Put the staged folder at ``dest`` by :func:`lfgraph.fileio.commit_folder`'s rule."""
        commit_folder(staged, dest)


class CheckpointFolderOutput(DeployFolderOutput):
    """A causal LM's Hugging Face checkpoint folder without ONNX: for a family the KV-cache
    export cannot take (its architecture's ``no_onnx``), or ``compress --no-onnx``. Its check
    reloads the written checkpoint in transformers (no missing, unexpected or mis-shaped
    weight) and compares its logits with the rewritten model's."""

    kind = "checkpoint-folder"
    size_name = "checkpoint (safetensors)"
    extra_files = ("lfgraph.json", "plan.json")
    larger_is_error = False  # written in float32: larger than a bf16 original, and correct

    def __init__(self, source: TorchSource, out: Path, why: str) -> None:
        super().__init__(source, out)
        self.why = why

    def write(self, compressed: Any, staged: Path, metadata: Mapping[str, str], plan: Any = None) -> None:
        from .deploy import write_deploy_folder

        staged.mkdir()
        self._compressed = compressed  # timed beside the original in latency()
        write_deploy_folder(compressed.model, staged, tokenizer=self.model.tokenizer, plan=plan,
                            n_layers_before=len(self.source.graph().blocks), verify=False, onnx=False)
        write_text_atomic(staged / "lfgraph.json", json.dumps(dict(metadata), indent=1) + "\n")

    def check(self, compressed: Any, staged: Path, rtol: float | None) -> Any:
        from transformers import AutoModelForCausalLM

        from .models import from_pretrained_checked
        from .verify import OutputCheck, VerifyReport

        rtol = rtol or self.source.rtol
        reloaded = from_pretrained_checked(AutoModelForCausalLM, staged, is_causal=True)
        feed = {k: torch.from_numpy(np.asarray(v)) for k, v in self.source.verification_feed().items()}
        with torch.no_grad():
            want = compressed.model(**feed).logits
            got = reloaded(**feed).logits
        err = float((got - want).abs().max())
        rel = err / max(float(want.abs().max()), 1e-12)
        report = VerifyReport(provider="transformers (reloaded checkpoint)", reference="the rewritten model", rtol=rtol)
        report.outputs.append(OutputCheck("logits", err, rel, rel <= rtol, "the written checkpoint, reloaded"))
        return report

    def original(self, quiet: bool) -> Path:
        """The original checkpoint's folder."""
        from .deploy.folder import source_folder

        folder = source_folder(self.model.hf_model)
        if folder is None:
            raise LfgraphError(f"the folder {self.source.name} was loaded from is gone: the checkpoint cannot be compared with it")
        return folder

    def model_file(self, staged: Path) -> Path:
        return staged / "lfgraph.json"

    def size(self, path: Path) -> int:
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))

    def latency(self, original: Path, staged: Path) -> tuple[str, float, float]:
        from .verify import alternating_torch_latency

        ids = torch.from_numpy(self.source.latency_feed()["input_ids"])
        before, after = alternating_torch_latency([self.source.model.module, self._compressed], (ids,))
        return f"PyTorch forward, {ids.shape[1]} tokens (median)", before, after

    def mark_failed(self, staged: Path, verdict: str) -> None:
        meta = json.loads((staged / "lfgraph.json").read_text(encoding="utf-8"))
        write_text_atomic(staged / "lfgraph.json", json.dumps({**meta, "lfgraph.check": verdict}, indent=1) + "\n")


class StreamedCheckpointOutput:
    """A checkpoint compressed block by block (:class:`~lfgraph.sources.CheckpointSource`):
    the Hugging Face checkpoint written shard by shard in the input's dtype
    (:func:`lfgraph.blocks.write.write_view`), ``plan.json``, ``lfgraph.json`` (the run's
    metadata), and float32 ``model.onnx`` + ``genai_config.json`` by onnxruntime-genai's
    builder when ONNX Runtime can hold the model (:mod:`lfgraph.deploy.genai_builder`).

    Its export check: the written checkpoint, read back block by block, computes what the
    rewritten model computes (logits of the verification texts), and the ONNX file's
    prefill logits match the written checkpoint's."""

    kind = "checkpoint-folder"
    size_name = "checkpoint (safetensors)"
    larger_is_error = True

    def __init__(self, source: Any, out: Path, onnx: bool = True, progress: bool = True) -> None:
        self.source, self.out, self.onnx, self.progress = source, out, onnx, progress
        self.why = ""
        self.onnx_result: Any = None

    def staged_path(self, folder: Path) -> Path:
        return folder / "out"

    def check_destination(self) -> None:
        """Refuse (exit 2), before the heavy work, a folder of the user's holding model files
        that would stay beside the ones written (:func:`lfgraph.fileio.check_shadowing`)."""
        from .blocks.write import weight_names
        from .deploy.genai_builder import ONNX_FILES

        check_shadowing(self.out, weight_names(self.source.blocks.ckpt) + ["plan.json", "lfgraph.json"]
                        + (list(ONNX_FILES) if self.onnx else []))

    def write(self, compressed: Any, staged: Path, metadata: Mapping[str, str], plan: Any = None) -> None:
        from tqdm import tqdm

        from .blocks.write import write_view
        from .deploy.genai_builder import has_tokenizer, wants_onnx

        staged.mkdir()
        with tqdm(total=sum(e.nbytes for e in compressed.ckpt.tensors.values()), desc="writing", unit="B", unit_scale=True,
                  unit_divisor=1024, leave=False, disable=not self.progress) as bar:
            written = write_view(compressed, staged, bar)
        if plan is not None:
            plan.save(staged / "plan.json")
        write_text_atomic(staged / "lfgraph.json", json.dumps(dict(metadata), indent=1) + "\n")
        self.bytes_written = written.bytes_written
        write_onnx, why = wants_onnx("auto" if self.onnx else "none", compressed.parameter_count(), written.bytes_written,
                                     tokenizer=has_tokenizer(self.source.folder), config=compressed.ckpt.config)
        self.why = "" if write_onnx else why
        self.onnx_wanted = write_onnx

    def check(self, compressed: Any, staged: Path, rtol: float | None) -> Any:
        from .blocks import CheckpointBlocks
        from .verify import OutputCheck, VerifyReport

        rtol = rtol or 1e-4
        feed = self.source.verification_feed()
        want = self.source.reference_outputs(compressed, feed)
        written = CheckpointBlocks(staged)
        got = self.source.reference_outputs(written, feed)
        report = VerifyReport(provider="the written checkpoint, read back block by block", reference="the rewritten model", rtol=rtol)
        for name in want:
            err = float(np.abs(got[name] - want[name]).max())
            rel = err / max(float(np.abs(want[name]).max()), 1e-12)
            report.outputs.append(OutputCheck(name, err, rel, rel <= rtol, f"max abs error {err:.3e}, max rel error {rel:.3e}"))
        if self.onnx_wanted and report.ok:
            from .deploy.genai_builder import write_onnx

            ids = torch.from_numpy(np.asarray(feed["input_ids"][:1]))
            self.onnx_result = o = write_onnx(staged, ids, rtol)
            report.outputs.append(OutputCheck("model.onnx", 0.0, o.check_rel, o.passed,
                                              f"onnxruntime-genai's builder ({o.seconds:.0f} s): prefill logits vs the written checkpoint, max rel {o.check_rel:.1e}"))
        return report

    def original(self, quiet: bool) -> Path:
        return self.source.folder

    def model_file(self, staged: Path) -> Path:
        return staged / "lfgraph.json"

    def size(self, path: Path) -> int:
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))

    def latency(self, original: Path, staged: Path) -> tuple[str, float, float]:
        """The seconds of the quality stage's pass of the held-out windows through each
        model's blocks (read from disk one at a time): what the depth reduction saves here."""
        seconds = getattr(self.source, "pass_seconds", None)
        if seconds is None:
            return "block-by-block pass (not measured: no quality stage)", float("nan"), float("nan")
        return "block-by-block pass of the held-out windows", 1e3 * seconds[0], 1e3 * seconds[1]

    def finish(self, staged: Path, dest: Path) -> None:
        commit_folder(staged, dest)

    def mark_failed(self, staged: Path, verdict: str) -> None:
        meta = json.loads((staged / "lfgraph.json").read_text(encoding="utf-8"))
        write_text_atomic(staged / "lfgraph.json", json.dumps({**meta, "lfgraph.check": verdict}, indent=1) + "\n")


class OnnxDecoderOutput:
    """A with-past ONNX decoder made shallower straight from its graph (``.onnx`` file or
    folder with ``genai_config.json``): staged and put in place by the same rule as the
    other outputs; what is written and how it is checked are the decoder stages' own
    (:mod:`lfgraph.stages`)."""

    kind = "onnx-decoder"
    size_name = "ONNX file"

    def __init__(self, src: Path, out: Path) -> None:
        self.src, self.out = src, out

    def staged_path(self, folder: Path) -> Path:
        return folder / self.out.name

    def model_file(self, staged: Path) -> Path:
        return staged if staged.suffix == ".onnx" else staged / "model.onnx"

    def mark_failed(self, staged: Path, verdict: str) -> None:
        mark_onnx_failed(self.model_file(staged), verdict)

    def finish(self, staged: Path, dest: Path) -> None:
        """A staged ``.onnx`` file (its ``.data`` first) or folder to ``dest``."""
        if staged.is_dir():
            commit_folder(staged, dest)
            return
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, dest.with_name(dest.name + ".data"))
        os.replace(staged, dest)


def decode_latency(original: Path, compressed: Path, vocab_size: int, prompt_len: int = 64, new_tokens: int = 32) -> tuple[str, float, float]:
    """Milliseconds per generated token of two with-past decoders (greedy, batch 1, after a
    ``prompt_len``-token prompt), run alternately, median of 3 rounds."""
    from .deploy.generation import alternating_decode_speed

    prompt = [int(t) for t in (np.arange(prompt_len) * 7 + 3) % max(vocab_size, 2)]
    (_, before), (_, after) = alternating_decode_speed([original, compressed], prompt, new_tokens=new_tokens, rounds=3)
    return f"ORT decode, ms/token ({new_tokens} after {prompt_len})", 1e3 / before, 1e3 / after


def mark_onnx_failed(path: Path, verdict: str) -> None:
    """Say in the file's metadata that it failed a check (``lfgraph.check``)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    has_data = path.with_name(path.name + ".data").exists()
    if has_data:  # rewrite only the small model file; the data file stays as it is
        add_metadata(m, {"lfgraph.check": verdict})
        onnx.save_model(m, str(path))
        return
    m = onnx.load(str(path))
    add_metadata(m, {"lfgraph.check": verdict})
    save_onnx(m, path)



def output_for(source: Source, out: Path, onnx: bool = True, progress: bool = True) -> Any:
    """The output kind ``out`` asks for: a ``.onnx`` path is one file; any other path is a
    deploy folder, which only causal language models have; without ONNX (``onnx=False``, or
    a family the export cannot take) a checkpoint folder. A checkpoint compressed block by
    block writes its checkpoint (and ONNX by onnxruntime-genai's builder when it fits)."""
    from .sources import CheckpointSource

    if isinstance(source, CheckpointSource):
        if out.suffix == ".onnx":
            raise LfgraphError("a checkpoint compressed block by block is written as a deploy folder (checkpoint, and model.onnx when it fits), "
                               "not a lone .onnx file: give a folder for -o")
        return StreamedCheckpointOutput(source, out, onnx=onnx, progress=progress)
    arch = architectures.of_model(source.model.module) if isinstance(source, TorchSource) else None
    if out.suffix == ".onnx":
        if arch is not None and arch.no_onnx:
            raise LfgraphError(f"{arch.name} cannot be written as ONNX ({arch.no_onnx}): give a folder for -o to get its Hugging Face checkpoint")
        return OnnxFileOutput(source, out)
    if isinstance(source, TorchSource) and source.family == "causal-lm" and source.model.hf_model is not None:
        why = "--no-onnx" if not onnx else (arch.no_onnx if arch is not None else None)
        return CheckpointFolderOutput(source, out, why) if why else DeployFolderOutput(source, out)
    raise LfgraphError(f"output {out} must end in .onnx (a deploy folder -o DIR/ is written for causal language models only)")
