"""Reading a safetensors checkpoint folder without loading it: headers, then tensors on demand.

A folder holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Only the headers are read up front (a few kB per file);
tensors are read when asked for, a few at a time, with ``safetensors.safe_open``, or copied
byte for byte into another file (:meth:`Checkpoint.copy_raw`) without being decoded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from ..errors import LfgraphError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

#: safetensors dtype names -> torch dtypes (those a Hugging Face checkpoint uses).
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: Bytes per element of each dtype name.
DTYPE_BYTES = {k: v.itemsize for k, v in DTYPES.items()}

_RESAVE = "copy the checkpoint again or re-save it (save_pretrained)"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype name (``"BF16"``), shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of one safetensors file (in the order of their data) and its metadata.

    Reads only the header, and checks it against the file as safetensors requires before
    any tensor is read: a known dtype and a shape for every tensor, whose byte range
    (``data_offsets``) holds exactly ``numel * itemsize`` bytes; the ranges, in order,
    neither overlap nor leave gaps and cover the data area exactly (a truncated file, or a
    header that lies about its tensors, shows here). Raises ``LfgraphError`` naming the file
    and what to do.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LfgraphError(f"{path} is truncated ({size} bytes, shorter than a safetensors header): {_RESAVE}")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise LfgraphError(f"{path} is truncated: its header says {n} bytes of header, the file has {size} bytes in all; {_RESAVE}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise LfgraphError(f"{path} is not a readable safetensors file ({str(e)[:120]}): {_RESAVE}") from None
    if not isinstance(header, dict):
        raise LfgraphError(f"{path} is not a safetensors file (its header is not a JSON object): {_RESAVE}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise LfgraphError(f"{path} has a damaged header (__metadata__ is not a map of strings): {_RESAVE}")
    base = 8 + n
    entries = []
    for name, h in header.items():
        if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
            raise LfgraphError(f"{path} has a damaged header (tensor {name} lacks dtype, shape or data_offsets): {_RESAVE}")
        dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise LfgraphError(f"{path}: tensor {name} has dtype {dtype!r}, which lfgraph does not read (it reads "
                               f"{', '.join(DTYPE_BYTES)}): convert the checkpoint to one of them")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape) or not isinstance(offsets, list) \
                or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
            raise LfgraphError(f"{path} has a damaged header (tensor {name}: shape {shape}, data_offsets {offsets}): {_RESAVE}")
        e = TensorEntry(name, path, dtype, tuple(shape), base + offsets[0], base + offsets[1])
        if e.nbytes != e.numel * DTYPE_BYTES[dtype]:
            raise LfgraphError(f"{path} has a damaged header: tensor {name} is {dtype} of shape {list(shape)} "
                               f"({e.numel * DTYPE_BYTES[dtype]} bytes) but its data_offsets span {e.nbytes} bytes; {_RESAVE}")
        entries.append(e)
    entries.sort(key=lambda e: (e.start, e.end))
    at = base
    for e in entries:
        if e.start != at:
            what = "overlaps the tensor before it" if e.start < at else f"leaves {e.start - at} bytes unused before it"
            raise LfgraphError(f"{path} has a damaged header: tensor {e.name} {what}; {_RESAVE}")
        at = e.end
    if at != size:
        if at > size:
            raise LfgraphError(f"{path} is truncated: its header describes {at - base} bytes of tensors, the file holds "
                               f"{size - base}; {_RESAVE}")
        raise LfgraphError(f"{path} has {size - at} bytes after its last tensor (not a whole safetensors file): {_RESAVE}")
    return {e.name: e for e in entries}, meta


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict; ``LfgraphError`` when it is missing, not JSON or not
    a JSON object. Every path that reads a config reads it here first."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise LfgraphError(f"{folder} has no config.json: give a Hugging Face model folder")
    try:
        config = json.loads(cfg.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:
        raise LfgraphError(f"{cfg} is not valid JSON ({str(e)[:120]}): fix or re-save the config") from None
    if not isinstance(config, dict):
        raise LfgraphError(f"{cfg} holds a JSON {type(config).__name__}, not an object of settings: fix it or re-save the model "
                           "(save_pretrained writes it)")
    return config


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a shard index; ``LfgraphError``
    for an index that is not JSON, has no ``weight_map`` of names to files in its folder."""
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:
        raise LfgraphError(f"the shard index {index} cannot be read ({str(e)[:120]}): it is damaged or truncated; {_RESAVE}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise LfgraphError(f"the shard index {index} has no weight_map of tensor names to shard files: {_RESAVE}")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise LfgraphError(f"the shard index {index} names {shard!r}, not a file of its folder: {_RESAVE}")
    return weight_map


@dataclass
class WeightFiles:
    """The safetensors files a folder's weights are read from, as transformers chooses them,
    with every header checked (:func:`read_header`) and, for shards, the index checked
    against them (each tensor in the shard the index names, no tensor in two shards)."""

    files: list[Path]
    index: Path | None
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    @property
    def sharded(self) -> bool:
        return self.index is not None


def weight_files(folder: Path, config: dict | None = None) -> WeightFiles | None:
    """Resolve and check the safetensors weights of ``folder`` the way transformers (5.x,
    ``modeling_utils._get_resolved_checkpoint_files``) picks them: the file ``config.json``'s
    ``transformers_weights`` names, else ``model.safetensors``, else the shards of
    ``model.safetensors.index.json``. ``None`` when the folder has neither. A folder with both
    is refused: transformers would load ``model.safetensors`` and ignore the shards, and
    nothing tells which of the two is the model. Reads headers only; the in-memory loader
    and the streaming path both call this, so they read the same weights."""
    folder = Path(folder)
    explicit = (config or {}).get("transformers_weights")
    if isinstance(explicit, str) and explicit:
        if Path(explicit).name != explicit or not explicit.endswith((".safetensors", ".safetensors.index.json")):
            raise LfgraphError(f"{folder}/config.json's transformers_weights {explicit!r} is not a safetensors file of the folder: fix config.json")
        chosen = folder / explicit
        if not chosen.is_file():
            raise LfgraphError(f"{folder}/config.json's transformers_weights names {explicit}, which the folder lacks: copy the whole checkpoint")
        index = chosen if explicit.endswith(".index.json") else None
        single = None if index else chosen
    else:
        single = folder / SINGLE_FILE if (folder / SINGLE_FILE).is_file() else None
        index = folder / INDEX_FILE if (folder / INDEX_FILE).is_file() else None
        if single and index:
            raise LfgraphError(f"{folder} holds both {SINGLE_FILE} and {INDEX_FILE} (shards): transformers would load {SINGLE_FILE} "
                               "and ignore the shards, and which of them is the model is unclear; move away the one that is not the model")
        if not single and not index:
            return None
    if index is None:
        tensors, meta = read_header(single)
        return WeightFiles([single], None, tensors, meta)
    weight_map = read_index(index)
    files = [folder / f for f in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LfgraphError(f"the shard index {index.name} names {len(missing)} shard(s) missing from {folder}, e.g. {missing[0]}: "
                           "copy the whole checkpoint folder")
    out = WeightFiles(files, index, {}, {})
    for f in files:
        entries, meta = read_header(f)
        for name in entries:
            if name in out.tensors:
                raise LfgraphError(f"tensor {name} is stored in both {out.tensors[name].file.name} and {f.name}: {_RESAVE}")
            if weight_map.get(name) != f.name:
                raise LfgraphError(f"{f.name} holds tensor {name}, which {index.name} "
                                   + (f"places in {weight_map[name]}" if name in weight_map else "does not list") + f": {_RESAVE}")
        out.tensors.update(entries)
        out.metadata = out.metadata or meta
    absent = [n for n in weight_map if n not in out.tensors]
    if absent:
        raise LfgraphError(f"{index.name} lists tensor {absent[0]} in {weight_map[absent[0]]}, which does not hold it: {_RESAVE}")
    return out


def unexpected_tensors(stored: Iterable[str], model: torch.nn.Module) -> list[str]:
    """The stored tensor names ``model`` (a Hugging Face model, on the meta device or not)
    has no place for, as transformers counts them ``unexpected`` (its patterns of keys to
    ignore left out: ``_keys_to_ignore_on_load_unexpected``, old per-layer
    ``rotary_emb.inv_freq`` and ``position_ids`` buffers). The in-memory loader refuses a
    checkpoint with any (:func:`lfgraph.models.from_pretrained_checked`); so does the
    streaming path, e.g. tensors of layers beyond ``num_hidden_layers``."""
    import re

    expected = set(model.state_dict())
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()) | {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    ignore = re.compile("|".join(f"({p})" for p in patterns))
    return [n for n in stored if n not in expected and ignore.search(n) is None]


class Checkpoint:
    """A Hugging Face safetensors folder, opened by its headers only.

    ``tensors`` maps every stored tensor name to its :class:`TensorEntry`, in file order
    (shards in index order). ``sharded`` says whether the weights come from an index file;
    ``shard_bytes`` is the size of each weight file. The files are chosen and checked by
    :func:`weight_files` (as transformers chooses them). Nothing is loaded until asked for;
    :attr:`bytes_read` counts the tensor bytes read so far (decoded or copied).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.config: dict = read_config(self.folder)
        weights = weight_files(self.folder, self.config)
        if weights is None:
            raise LfgraphError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: the streaming path reads safetensors checkpoints "
                               "(re-save the model with save_pretrained(..., safe_serialization=True))")
        self.files = weights.files
        self.sharded = weights.sharded
        self.tensors: dict[str, TensorEntry] = weights.tensors
        self.metadata: dict[str, str] = weights.metadata
        self.shard_bytes: list[int] = [f.stat().st_size for f in self.files]
        self.bytes_read = 0

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(e.nbytes for e in self.tensors.values())

    def entry(self, name: str) -> TensorEntry:
        if name not in self.tensors:
            raise LfgraphError(f"tensor {name} is missing from the checkpoint in {self.folder}: the checkpoint does not match its config.json")
        return self.tensors[name]

    def load(self, names: Iterable[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """The named tensors, read now (file by file with ``safe_open``) and converted to
        ``dtype`` (``None``: as stored). Each file is opened and closed here, so nothing of
        it stays mapped once this returns. Raises ``LfgraphError`` for a missing name."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.entry(n).file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as st:
                for n in group:
                    t = st.get_tensor(n)
                    self.bytes_read += self.tensors[n].nbytes
                    out[n] = t if dtype is None or t.dtype == dtype else t.to(dtype)
        return out

    def rows(self, name: str, index: Iterable[int]) -> torch.Tensor:
        """Rows ``index`` (in the order given) of the 2-D tensor ``name``, as stored, read
        one by one with ``safe_open(...).get_slice``: the rest of the tensor is never read."""
        from safetensors import safe_open

        e = self.entry(name)
        index = [int(i) for i in index]
        pieces = []
        # the file is mapped while open, and the pages read count as resident: reopen it
        # every few hundred rows so that they are unmapped as the reading goes
        for start in range(0, len(index), 256):
            with safe_open(str(e.file), framework="pt") as st:
                sl = st.get_slice(name)
                pieces.extend(sl[i : i + 1][0].clone() for i in index[start : start + 256])
        self.bytes_read += len(index) * (e.nbytes // max(1, e.shape[0]))
        return torch.stack(pieces) if pieces else torch.empty(0, *e.shape[1:], dtype=DTYPES[e.dtype])

    def row_chunks(self, name: str, chunk_bytes: int = 64 << 20) -> Iterable[torch.Tensor]:
        """Tensor ``name`` as stored, in consecutive pieces of whole rows (about
        ``chunk_bytes`` each; a 1-D tensor is one piece): one piece in memory at a time."""
        from safetensors import safe_open

        e = self.entry(name)
        if len(e.shape) < 2:
            yield self.load([name], dtype=None)[name]
            return
        row_bytes = max(1, e.nbytes // max(1, e.shape[0]))
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, e.shape[0], step):
            # opened per piece: the pages read are unmapped (no longer resident) after each
            with safe_open(str(e.file), framework="pt") as st:
                piece = st.get_slice(name)[start : start + step].clone()
            self.bytes_read += piece.numel() * piece.element_size()
            yield piece

    def copy_raw(self, name: str, dst: BinaryIO, chunk: int = 64 << 20) -> int:
        """Append the stored bytes of tensor ``name`` to ``dst`` unchanged, ``chunk`` bytes at
        a time (plain reads: the memory used is one chunk). Returns the bytes copied."""
        e = self.entry(name)
        left = e.nbytes
        with open(e.file, "rb") as src:
            src.seek(e.start)
            while left:
                buf = src.read(min(chunk, left))
                if not buf:
                    raise LfgraphError(f"{e.file.name} ends before tensor {name} does: the checkpoint file is truncated")
                dst.write(buf)
                left -= len(buf)
        self.bytes_read += e.nbytes
        return e.nbytes
