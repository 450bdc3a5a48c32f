"""A causal LM exported as ONNX with a KV cache, in the layout Optimum and onnxruntime-genai use.

Inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``;
outputs ``logits``, ``present.{i}.key|value``. Axes are named ``batch``, ``sequence``,
``past_sequence`` and ``total_sequence`` (= past + sequence). One file serves prefill (past
length 0) and decode. Beside it ``genai_config.json`` lets onnxruntime-genai generate from
the folder.

Two routes, measured side by side in tools/bench_decode.py (SmolLM2-135M, 1 CPU thread):

- this module's ``torch.onnx.export`` (dynamo) of the PyTorch module lfgraph verified:
  standard ONNX ops, ``position_ids`` input (the Optimum layout), runs on any ONNX Runtime
  execution provider; exporting SmolLM2 takes minutes on a busy 2-core machine;
- onnxruntime-genai's model builder (:func:`build_with_genai_builder`, offline on the
  checkpoint folder): fused ``GroupQueryAttention`` / ``SkipSimplifiedLayerNormalization``
  contrib ops, no ``position_ids``, the KV cache shared in place by genai; 13 s for SmolLM2
  and 1.27x faster decode. It rebuilds the architecture from ``config.json`` and finds
  modules by shape: on a tiny Llama whose ``intermediate_size`` equalled ``vocab_size`` it
  wired the LM head to the first layer's MLP input (logits off by 0.49), which only the
  generation checks caught.

The export is the default (exact module, spec layout); the builder is an option
(``write_deploy_folder(..., engine="genai-builder")``), checked by the same verification.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import onnx
import onnx_ir
import torch
from torch import nn

from ..architectures import for_config
from ..errors import LfgraphError
from ..fileio import write_text_atomic

#: Metadata key the torch exporter writes with each node's module scopes; kept (not stripped)
#: because the ONNX decoder surgery uses it to find which layer owns a node.
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]


@dataclass
class CacheShape:
    """What the cache tensors of one layer look like: (batch, kv_heads, length, head_dim)."""

    n_layers: int
    kv_heads: int
    head_dim: int
    heads: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, cfg: Any) -> "CacheShape":
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.num_hidden_layers, kv, head_dim, heads, cfg.hidden_size, cfg.vocab_size)


class DecoderWithPast(nn.Module):
    """``(input_ids, attention_mask, position_ids, past...) -> (logits, present...)`` over a
    Hugging Face causal LM with a ``DynamicCache`` (flat tensors in, flat tensors out)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.model = hf_model
        self.n_layers = hf_model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@dataclass
class DecoderExport:
    path: Path
    files: list[Path]
    file_bytes: int
    seconds: float
    shape: CacheShape


def export_decoder_with_past(
    hf_model: nn.Module,
    out: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    genai_config: bool = True,
    opset: int | None = None,
) -> DecoderExport:
    """Export ``hf_model`` (a ``*ForCausalLM``) with its KV cache to ``out``.

    ``out`` is a folder (``model.onnx`` is written in it) or a path ending in ``.onnx``.
    With ``genai_config``, ``genai_config.json`` is written beside the model. Tied
    embeddings are stored once (identical initializers merged by content). Models over the
    protobuf limit get a ``.data`` file beside. ``hf_model`` is not modified. Raises
    ``LfgraphError`` when the export fails.
    """
    from ..export import deduplicate_initializers
    from ..onnx_io import save_onnx

    out = Path(out)
    path = out if out.suffix == ".onnx" else out / "model.onnx"
    if not path.parent.is_dir():
        raise LfgraphError(f"output folder {path.parent} does not exist: create it or choose another -o path")
    t0 = time.perf_counter()
    shape = CacheShape.of(hf_model.config)
    wrapper = DecoderWithPast(hf_model).eval()
    L = shape.n_layers
    # example shapes distinct from each other so the exporter cannot confuse the axes
    B, S, P = 2, 3, 5
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (B, S), generator=gen)
    mask = torch.ones(B, P + S, dtype=torch.long)
    pos = torch.arange(P, P + S).unsqueeze(0).expand(B, S).contiguous()
    past = tuple(torch.randn(B, shape.kv_heads, P, shape.head_dim, generator=gen) for _ in range(2 * L))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past_seq, total = torch.export.Dim("past_sequence", min=0), torch.export.Dim("total_sequence")
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past_seq} for _ in range(2 * L)))
    names = ["input_ids", "attention_mask", "position_ids", *past_names(L)]
    outputs = ["logits", *present_names(L)]
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(wrapper, (ids, mask, pos, past), None, dynamo=True, input_names=names,
                                        output_names=outputs, dynamic_shapes=dynamic, optimize=False, verbose=False,
                                        opset_version=opset)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LfgraphError(f"ONNX export of {type(hf_model).__name__} with its KV cache failed: {msg[:300]}") from None
    finally:
        hf_model.train(was_training)
    with _quiet():  # outside the export's error message: a failure here is lfgraph's or onnxscript's, not the model's
        fold_constants(program.model)
        model = onnx_ir.serde.serialize_model(program.model)
    del program
    deduplicate_initializers(model)
    _keep_only_scopes(model.graph)
    _name_axes(model, L)
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    save_onnx(model, path)
    files = [path] + ([Path(str(path) + ".data")] if Path(str(path) + ".data").exists() else [])
    if genai_config:
        files.append(write_genai_config(hf_model, path.parent, filename=path.name))
    size = sum(f.stat().st_size for f in files if f.suffix in (".onnx", ".data"))
    return DecoderExport(path, files, size, time.perf_counter() - t0, shape)


def fold_constants(model: "onnx_ir.Model") -> None:
    """The exporter's ``optimize=True`` without its pattern rewriter, in place: functions
    inlined, constants folded (with shape inference, twice at most), unused nodes removed,
    constants lifted to initializers, identical initializers merged, common subexpressions
    eliminated, and the fusions into ONNX ops that opset 23 has.

    The rewriter's rules (slice collapsing, no-op and broadcast removal...) took 15 s of the
    45 s export of the compressed SmolLM2 here, matching every rule at every node; without
    them that model has 1764 nodes instead of 1661 (most of them Slice), computes the same
    logits bit for bit under ONNX Runtime, and decodes as fast (26.6 vs 27.2 ms a token,
    measured side by side): ONNX Runtime's own graph optimizations at load do that work."""
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants_ir
    from onnxscript.rewriter import onnx_fusions

    common.InlinePass()(model)
    for _ in range(2):
        folded = fold_constants_ir(model, onnx_shape_inference=True)
        for cleanup in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
            cleanup(model)
        if not folded.modified:
            break
    onnx_ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
    onnx_fusions.fuse(model)


@contextlib.contextmanager
def _quiet():  # type: ignore[no-untyped-def]
    """Silence the exporter's warnings about torch internals (not about the user's model)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _keep_only_scopes(graph: onnx.GraphProto) -> None:
    """Drop the exporter's stack traces and doc strings (kilobytes per node), keep the module
    scopes (a few bytes; they say which layer owns each node)."""
    for node in graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key == SCOPES_KEY]
        del node.metadata_props[:]
        for k, v in keep:
            p = node.metadata_props.add()
            p.key, p.value = k, v
        node.doc_string = ""


def _name_axes(model: onnx.ModelProto, n_layers: int) -> None:
    """Give the symbolic axes the names the Optimum/genai layout uses (the exporter names
    derived axes by formula, e.g. ``past_sequence + sequence``)."""
    def rename(vi: onnx.ValueInfoProto, axes: Mapping[int, str]) -> None:
        dims = vi.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(dims):
                dims[axis].dim_param = name

    for vi in model.graph.input:
        if vi.name == "attention_mask":
            rename(vi, {0: "batch", 1: "total_sequence"})
    for vi in model.graph.output:
        if vi.name == "logits":
            rename(vi, {0: "batch", 1: "sequence"})
        elif vi.name.startswith("present."):
            rename(vi, {0: "batch", 2: "total_sequence"})


def _token_id(value: Any) -> Any:
    return value if value is None or isinstance(value, int) else list(value)


def genai_config_dict(cfg: Any, generation: Any, filename: str = "model.onnx", position_ids: bool = True) -> dict[str, Any]:
    """The ``genai_config.json`` content for a decoder in the layout written here."""
    shape = CacheShape.of(cfg)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    eos = eos if eos is not None else cfg.eos_token_id
    bos = getattr(generation, "bos_token_id", None) if generation is not None else None
    bos = bos if bos is not None else cfg.bos_token_id
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    context = int(getattr(cfg, "max_position_embeddings", 2048))
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    # genai rejects null ids: a model without a BOS token simply has no bos_token_id entry
    ids = {k: _token_id(v) for k, v in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)) if v is not None}
    return {
        "model": {
            **ids,
            "context_length": context, "type": for_config(cfg).genai_type,
            "vocab_size": shape.vocab,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": shape.head_dim, "hidden_size": shape.hidden,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": shape.heads, "num_hidden_layers": shape.n_layers,
                "num_key_value_heads": shape.kv_heads,
            },
        },
        # the present tensors are new buffers of length past+sequence (standard ops), so the
        # cache cannot share one buffer with the past (that needs GroupQueryAttention)
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 50, "top_p": 1.0, "num_return_sequences": 1, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_genai_config(hf_model: nn.Module, folder: str | os.PathLike, filename: str = "model.onnx") -> Path:
    """Write ``genai_config.json`` for the exported decoder in ``folder``; return its path."""
    path = Path(folder) / "genai_config.json"
    cfg = genai_config_dict(hf_model.config, getattr(hf_model, "generation_config", None), filename)
    write_text_atomic(path, json.dumps(cfg, indent=4))
    return path


def build_with_genai_builder(hf_folder: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32") -> Path:
    """onnxruntime-genai's own model builder on a Hugging Face folder (offline, CPU target).

    The alternative to :func:`export_decoder_with_past` measured in tools/bench_decode.py:
    a graph with fused ``GroupQueryAttention``/``SkipSimplifiedLayerNormalization``, no
    ``position_ids``, tokenizer files and ``genai_config.json`` written by the builder. The
    folder must hold the tokenizer. Returns the path of ``model.onnx``.
    """
    import subprocess
    import sys

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        # the builder's command line is its documented interface (create_model needs options
        # prepared by its own argument parser)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", cache]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LfgraphError(f"onnxruntime-genai's model builder failed on {hf_folder}: {last[:300]}")
    return out / "model.onnx"
