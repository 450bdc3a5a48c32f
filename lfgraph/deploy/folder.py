"""The deploy folder for a compressed causal LM: ``lfgraph compress … -o out/``.

One call writes everything a deployment pipeline needs beside each other:

- a standard Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer,
  generation config) — :mod:`lfgraph.deploy.checkpoint`;
- ``model.onnx`` (+ ``model.onnx.data`` when large) with the KV cache in the Optimum /
  onnxruntime-genai layout and ``genai_config.json`` — :mod:`lfgraph.deploy.decoder_onnx`;
- ``plan.json`` when a plan is given;

and verifies generation on ONNX Runtime and onnxruntime-genai against PyTorch
(:mod:`lfgraph.deploy.verify`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from ..errors import LfgraphError
from ..fileio import write_text_atomic
from .checkpoint import save_hf_checkpoint
from .decoder_onnx import DecoderExport, export_decoder_with_past
from .limits import onnx_refusal
from .verify import GenerationReport, verify_generation


#: How model.onnx is made (see ``write_deploy_folder``).
ENGINES = ("export", "genai-builder")


@dataclass
class DeployReport:
    """What :func:`write_deploy_folder` wrote and how generation verified."""

    out_dir: Path
    files: list[Path]
    onnx: DecoderExport | None
    generation: GenerationReport | None = None
    checkpoint_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.generation is None or self.generation.ok

    def lines(self) -> list[str]:
        if self.onnx is None:
            return [f"  checkpoint folder {self.out_dir}: Hugging Face checkpoint ({self.checkpoint_bytes / 1e6:.1f} MB), no ONNX"]
        out = [f"  deploy folder {self.out_dir}: Hugging Face checkpoint ({self.checkpoint_bytes / 1e6:.1f} MB), "
               f"model.onnx with KV cache ({self.onnx.file_bytes / 1e6:.1f} MB), genai_config.json"]
        if self.generation is not None:
            out.append(f"  generation on ONNX Runtime: {'✓ passed' if self.generation.ok else '✗ FAILED'}")
            out.extend(self.generation.lines())
        return out


def source_folder(hf_model: nn.Module) -> Path | None:
    """The folder ``hf_model`` was loaded from (transformers records it), if it still exists."""
    name = getattr(hf_model.config, "_name_or_path", "") or getattr(hf_model, "name_or_path", "")
    p = Path(name) if name else None
    return p if p is not None and p.is_dir() else None


def kept_layers_from_plan(plan: Any, n_before: int) -> list[int]:
    """Original indices of the decoder layers a merge plan keeps (block names end in the index)."""
    drop = set(block_indices(plan.absorbed))
    return [i for i in range(n_before) if i not in drop]


def block_indices(names: Sequence[str]) -> list[int]:
    out = []
    for n in names:
        m = re.search(r"(\d+)$", n)
        if not m:
            raise LfgraphError(f"block {n!r} has no layer index: a decoder plan names blocks like model.layers.7")
        out.append(int(m.group(1)))
    return out


def write_deploy_folder(
    hf_model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer_source: str | os.PathLike | None = None,
    tokenizer: Any = None,
    plan: Any = None,
    n_layers_before: int | None = None,
    metadata: Mapping[str, str] | None = None,
    verify: bool = True,
    prompt: Sequence[int] | None = None,
    new_tokens: int = 32,
    engine: str = "export",
    onnx: bool = True,
) -> DeployReport:
    """Write the deploy folder for the compressed ``hf_model`` (a ``*ForCausalLM``; from
    ``apply_plan(...).model.model``) into ``out_dir`` (created if missing; its parent must exist).

    ``tokenizer_source``: the source model's folder (default: where ``hf_model`` was loaded
    from, when that still exists), whose tokenizer and generation config are copied; else
    ``tokenizer`` is saved. ``plan`` (a FusionPlan) is written as ``plan.json`` and, with
    ``n_layers_before``, gives the kept layers' original indices for per-layer config lists.
    ``metadata`` goes into the ONNX metadata (``engine="export"``). ``engine`` picks how
    ``model.onnx`` is made: ``"export"`` traces this PyTorch module with its cache
    (standard ONNX ops, ``position_ids`` input, the Optimum layout); ``"genai-builder"``
    runs onnxruntime-genai's model builder on the checkpoint just written (fused
    ``GroupQueryAttention``, no ``position_ids``, ORT-only contrib ops; 1.27x faster decode
    on CPU for SmolLM2 in tools/bench_decode.py). With ``verify`` the generation checks run
    (prefill/decode logits, greedy ``new_tokens`` on ORT and onnxruntime-genai vs PyTorch)
    and are returned in the report; a failed check is reported, not raised.
    ``onnx=False`` writes the checkpoint and ``plan.json`` only (a family the ONNX export
    cannot take, or ``compress --no-onnx``). ``hf_model`` is not modified.
    """
    out = Path(out_dir)
    if engine not in ENGINES:
        raise LfgraphError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if out.suffix == ".onnx":
        raise LfgraphError(f"{out} is a file name: the deploy folder needs a folder (-o out/)")
    if not out.parent.exists():
        raise LfgraphError(f"output folder {out.parent} does not exist: create it or choose another -o path")
    refusal = onnx_refusal(hf_model.config, engine) if onnx else None
    if refusal:
        raise LfgraphError(f"ONNX cannot be written for this model with engine {engine!r}: {refusal}")
    out.mkdir(exist_ok=True)
    src = Path(tokenizer_source) if tokenizer_source else source_folder(hf_model)
    kept = kept_layers_from_plan(plan, n_layers_before) if plan is not None and n_layers_before else None
    files = save_hf_checkpoint(hf_model, out, tokenizer_source=src, kept_layers=kept, tokenizer=tokenizer)
    ckpt_bytes = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    meta = dict(metadata or {})
    if plan is not None:
        meta.setdefault("lfgraph.plan", plan.to_json())
        write_text_atomic(out / "plan.json", plan.to_json())
        files.append(out / "plan.json")
    if not onnx:
        return DeployReport(out, files, None, None, ckpt_bytes)
    if engine == "export":
        exported = export_decoder_with_past(hf_model, out, metadata=meta, genai_config=True)
    else:
        exported = _builder_into(hf_model, out)
    files.extend(exported.files)
    gen = verify_generation(hf_model, out, prompt=prompt, new_tokens=new_tokens) if verify else None
    return DeployReport(out, files, exported, gen, ckpt_bytes)


def _builder_into(hf_model: nn.Module, out: Path) -> DecoderExport:
    """onnxruntime-genai's builder on the checkpoint in ``out``; its ONNX files and
    genai_config.json moved into ``out`` (the builder writes into a fresh folder)."""
    import tempfile
    import time

    from .decoder_onnx import CacheShape, build_with_genai_builder

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".lfgraph-builder.", dir=out) as tmp:
        build_with_genai_builder(out, Path(tmp) / "b")
        moved = []
        for f in sorted((Path(tmp) / "b").iterdir()):
            if f.name.startswith("model.onnx") or f.name == "genai_config.json":
                os.replace(f, out / f.name)
                moved.append(out / f.name)
    size = sum(f.stat().st_size for f in moved if f.name.startswith("model.onnx"))
    return DecoderExport(out / "model.onnx", moved, size, time.perf_counter() - t0, CacheShape.of(hf_model.config))
