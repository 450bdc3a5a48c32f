"""Writing a compressed checkpoint shard by shard, without holding the model.

The output of a :class:`~lfgraph.blocks.source.CheckpointBlocks` view is a Hugging Face
folder like the input: the kept blocks renumbered (``STACK.K``, the stack's path from the
family's class), every other tensor (embeddings, final norm, head) kept, in the input's
order; tensors the rewrite changed (the view's overrides) written in the dtype they were
stored in (bf16 in, bf16 out; the refit itself ran in float32/64); ``model.safetensors`` or, when the input was
sharded, shards no larger than the input's largest with a ``model.safetensors.index.json``.
Unchanged tensors are copied byte for byte from the input file (a 64 MB buffer), so a shard
is never in memory; the safetensors header is written first from the known shapes.

``config.json`` gets the new ``num_hidden_layers`` and every per-layer list sliced to the
kept layers; tokenizer files, chat template and generation config are copied.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, Mapping, Sequence

import torch

from .. import architectures
from ..deploy.checkpoint import TOKENIZER_FILES
from ..errors import LfgraphError
from .checkpoint import DTYPES, INDEX_FILE, SINGLE_FILE, Checkpoint, TensorEntry


@dataclass
class WriteResult:
    files: list[Path] = field(default_factory=list)
    bytes_written: int = 0


def renamed_tensors(ckpt: Checkpoint, stack_path: str, kept: Sequence[int]) -> dict[str, str]:
    """Output tensor name -> input tensor name, in the input's order: tensors of dropped
    blocks (of the stack at ``stack_path``) left out, those of kept blocks renumbered
    0..len(kept)-1."""
    layer = re.compile(rf"^{re.escape(stack_path)}\.(\d+)\.(.+)$")
    new_index = {old: new for new, old in enumerate(sorted(kept))}
    out: dict[str, str] = {}
    for name in ckpt.tensors:
        m = layer.match(name)
        if m is None:
            out[name] = name
        elif int(m.group(1)) in new_index:
            out[f"{stack_path}.{new_index[int(m.group(1))]}.{m.group(2)}"] = name
    return out


def sliced_config(config: Mapping[str, Any], kept: Sequence[int], architecture: Any = None,
                  attribute_map: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A copy of ``config`` (the raw ``config.json``) for the kept layers (original indices):
    the depth and every per-layer list sliced by the family's own rule
    (:mod:`lfgraph.architectures`), as the in-memory path slices it. ``attribute_map``
    (the transformers config class's: standard name -> the family's, e.g.
    ``num_hidden_layers`` -> ``n_layer`` for GPT-2) lets the rule use the standard names."""
    raw = copy.deepcopy(dict(config))
    aliases = {std: own for std, own in (attribute_map or {}).items() if own in raw and std not in raw}
    for std, own in aliases.items():
        raw[std] = raw.pop(own)
    cfg = SimpleNamespace(**raw)
    (architecture or architectures.for_config(cfg)).slice_config(cfg, sorted(kept))
    out = vars(cfg)
    for std, own in aliases.items():
        out[own] = out.pop(std)
    return out


def _shards(entries: list[tuple[str, TensorEntry]], limit: int | None) -> list[list[tuple[str, TensorEntry]]]:
    """Consecutive groups of ``(out name, entry)`` of at most ``limit`` bytes (a larger tensor alone)."""
    if limit is None:
        return [entries]
    groups: list[list[tuple[str, TensorEntry]]] = [[]]
    size = 0
    for item in entries:
        if groups[-1] and size + item[1].nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item[1].nbytes
    return groups


def weight_names(ckpt: Checkpoint) -> list[str]:
    """The weight files :func:`write_checkpoint` writes for ``ckpt`` (``fnmatch`` patterns
    for shards, whose count the kept blocks decide), known before any weight is read."""
    return [INDEX_FILE, "model-*-of-*.safetensors"] if ckpt.sharded else [SINGLE_FILE]


def _header(items: list[tuple[str, TensorEntry]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for out_name, e in items:
        header[out_name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def _write_changed(dst: BinaryIO, tensor: torch.Tensor, e: TensorEntry) -> int:
    """Write ``tensor`` cast to the stored dtype of ``e`` (its shape must match)."""
    if tuple(tensor.shape) != e.shape:
        raise LfgraphError(f"refitted {e.name} has shape {tuple(tensor.shape)}, the checkpoint stores {e.shape}: an lfgraph bug")
    data = tensor.detach().to(DTYPES[e.dtype]).contiguous().reshape(-1).view(torch.uint8).numpy()
    dst.write(memoryview(data))
    return int(data.nbytes)


def write_view(view: Any, folder: Path, progress: Any = None) -> WriteResult:
    """Write the compressed model of ``view`` (a :class:`~lfgraph.blocks.source.CheckpointBlocks`
    view: its kept blocks and overrides) as a checkpoint into ``folder`` (which exists,
    normally a staging folder); see :func:`write_checkpoint`."""
    changed = {f"{view.stack_path}.{i}.{k}": t for i, own in view.overrides.items() for k, t in own.items()}
    return write_checkpoint(view.ckpt, folder, view.stack_path, view.kept, changed, view.architecture, progress,
                            attribute_map=getattr(view.config, "attribute_map", None))


def write_checkpoint(
    ckpt: Checkpoint, folder: Path, stack_path: str, kept: Sequence[int], changed: Mapping[str, torch.Tensor],
    architecture: Any = None, progress: Any = None, attribute_map: Mapping[str, str] | None = None,
) -> WriteResult:
    """Write the checkpoint of the kept blocks (original indices of the stack at
    ``stack_path``) into ``folder`` (which exists, normally a staging folder), ``changed``
    tensors (by input name) replacing the stored ones. Returns the written files and the
    tensor bytes written. The input is only read. ``progress`` (a tqdm bar or None) advances
    by the bytes of each tensor written."""
    for name in changed:
        ckpt.entry(name)
    names = renamed_tensors(ckpt, stack_path, kept)
    entries = [(out, ckpt.tensors[src]) for out, src in names.items()]
    limit = max(ckpt.shard_bytes) if ckpt.sharded else None
    groups = _shards(entries, limit)
    metadata = {**ckpt.metadata, "format": "pt"}
    result = WriteResult()
    weight_map: dict[str, str] = {}
    for k, items in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" if ckpt.sharded else SINGLE_FILE
        path = folder / fname
        with open(path, "wb") as f:
            f.write(_header(items, metadata))
            for out_name, e in items:
                if e.name in changed:
                    result.bytes_written += _write_changed(f, changed[e.name], e)
                else:
                    result.bytes_written += ckpt.copy_raw(e.name, f)
                weight_map[out_name] = fname
                if progress is not None:
                    progress.update(e.nbytes)
        result.files.append(path)
    if ckpt.sharded:
        index = {"metadata": {"total_size": result.bytes_written}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        result.files.append(folder / INDEX_FILE)
    (folder / "config.json").write_text(json.dumps(sliced_config(ckpt.config, kept, architecture, attribute_map), indent=2, sort_keys=True) + "\n")
    result.files.append(folder / "config.json")
    for name in TOKENIZER_FILES:
        if (ckpt.folder / name).is_file():
            shutil.copyfile(ckpt.folder / name, folder / name)
            result.files.append(folder / name)
    return result
