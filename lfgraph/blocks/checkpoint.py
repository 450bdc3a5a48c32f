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
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of one safetensors file (in the order of their data) and its metadata.

    Reads only the header. Raises ``LfgraphError`` for a file that is not safetensors.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise LfgraphError(f"{path} is not a readable safetensors file ({e}): re-save the checkpoint") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries = [
        TensorEntry(name, path, h["dtype"], tuple(h["shape"]), base + h["data_offsets"][0], base + h["data_offsets"][1])
        for name, h in header.items()
    ]
    entries.sort(key=lambda e: e.start)
    return {e.name: e for e in entries}, meta


class Checkpoint:
    """A Hugging Face safetensors folder, opened by its headers only.

    ``tensors`` maps every stored tensor name to its :class:`TensorEntry`, in file order
    (shards in index order). ``sharded`` says whether the folder has an index file;
    ``shard_bytes`` is the size of each weight file. Nothing is loaded until asked for;
    :attr:`bytes_read` counts the tensor bytes read so far (decoded or copied).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise LfgraphError(f"{self.folder} has no config.json: give a Hugging Face model folder")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise LfgraphError(f"{cfg} is not valid JSON ({e}): fix or re-save the config") from None
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = list(dict.fromkeys(weight_map.values()))
            self.sharded = True
        elif (self.folder / SINGLE_FILE).is_file():
            files, self.sharded = [SINGLE_FILE], False
        else:
            raise LfgraphError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: the streaming path reads safetensors checkpoints "
                               "(re-save the model with save_pretrained(..., safe_serialization=True))")
        self.files = [self.folder / f for f in files]
        self.tensors: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self.shard_bytes: list[int] = []
        for f in self.files:
            if not f.is_file():
                raise LfgraphError(f"shard {f.name} listed in {INDEX_FILE} is missing from {self.folder}")
            entries, meta = read_header(f)
            self.tensors.update(entries)
            self.metadata = self.metadata or meta
            self.shard_bytes.append(f.stat().st_size)
        self.bytes_read = 0

    @property
    def num_layers(self) -> int:
        n = self.config.get("num_hidden_layers")
        if not isinstance(n, int) or n < 1:
            raise LfgraphError(f"{self.folder}/config.json has no num_hidden_layers: the streaming path needs a decoder config")
        return n

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
