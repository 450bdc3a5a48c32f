"""lfgraph's cache of things computed from the user's models: the dequantised fp32 SmolLM2
(or any GGUF file), the exported originals, the distillation's samples and teacher outputs.

Where: ``$LFGRAPH_CACHE``, or ``~/.cache/lfgraph`` when it is unset or empty (an empty value
never means the current folder). A value naming a file, or a folder lfgraph cannot write
into, is refused with one line (:func:`cache_dir`, exit 2) as soon as a command that needs
the cache starts: the dequantised SmolLM2 has nowhere else to live, and a run that skipped
the cache silently would redo minutes of work each time.

What: every entry is rebuilt whatever is wrong with it, and never taken for the model.
Folder entries (:func:`cache_entry`, :func:`cached_folder`) are built in a staging folder
and moved into place whole, with ``.lfgraph-cache.json`` recording each file's size; an
entry whose files are missing, of another size (a truncated copy, a full disk) or have no
such record (an interrupted or older writer) is built again, and the rebuild is said on
stderr. Single tensors (:func:`read_cached`, :func:`write_cached`) are checked by loading
them: a file ``torch.load`` cannot read is built again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import LfgraphError
from .fileio import atomic_path

#: The record of a folder entry's files and sizes, written last.
SEAL = ".lfgraph-cache.json"
_WHAT_TO_DO = "point LFGRAPH_CACHE at a folder you can write to (unset or empty: ~/.cache/lfgraph)"


def cache_dir() -> Path:
    """The cache folder (created if missing), checked: ``LfgraphError`` when ``LFGRAPH_CACHE``
    (or the default) names a file or a folder that cannot be written into."""
    value = os.environ.get("LFGRAPH_CACHE", "")
    folder = Path(os.path.abspath(os.path.expanduser(value))) if value else Path.home() / ".cache" / "lfgraph"
    where = f"LFGRAPH_CACHE={value}" if value else f"the cache folder {folder}"
    if folder.exists() and not folder.is_dir():
        raise LfgraphError(f"{where} is a file, not a folder: lfgraph keeps the dequantised SmolLM2 and exported originals there; {_WHAT_TO_DO}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".lfgraph-probe-{os.getpid()}-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LfgraphError(f"{where} cannot be written ({e.strerror or e}): lfgraph keeps the dequantised SmolLM2 and exported originals "
                           f"there; {_WHAT_TO_DO}") from None
    return folder


def read_cached(path: Path) -> Any | None:
    """What :func:`write_cached` saved at ``path`` (tensors, dicts of them), or ``None`` when
    the file is absent or unreadable (truncated, damaged): such an entry is rebuilt."""
    try:
        import torch

        return torch.load(path, weights_only=True)
    except Exception:
        if Path(path).exists():
            print(f"lfgraph: the cache entry {path} cannot be read (damaged or truncated): making it again", file=sys.stderr)
        return None


def write_cached(path: Path, obj: Any) -> None:
    """Save ``obj`` at ``path`` whole or not at all (:func:`lfgraph.fileio.atomic_path`); best
    effort: a cache that cannot be written at that moment (a full disk) is skipped."""
    import torch

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError:
        pass


def _sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SEAL}


def intact(folder: Path, required: Iterable[str] = ()) -> bool:
    """Whether the folder entry ``folder`` is whole: sealed (:data:`SEAL`), every file it
    records present at its recorded size, and the ``required`` names among them."""
    try:
        recorded = json.loads((folder / SEAL).read_text(encoding="utf-8"))["files"]
        if not isinstance(recorded, dict) or not set(required) <= set(recorded):
            return False
        return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in recorded.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_folder(folder: Path, required: Iterable[str]) -> Path | None:
    """``folder`` when it is an :func:`intact` entry; else ``None`` (a damaged one said on
    stderr), for the caller to build it with :func:`cache_entry`."""
    required = list(required)
    if intact(folder, required):
        return folder
    if folder.exists():
        print(f"lfgraph: the cache entry {folder} is incomplete or damaged: making it again", file=sys.stderr)
    return None


@contextlib.contextmanager
def cache_entry(folder: Path, required: Iterable[str] = ()) -> Iterator[Path]:
    """A fresh staging folder beside the entry ``folder`` to build it in. When the block ends
    without error the staging folder is sealed (each file's size recorded) and replaces
    ``folder`` (a damaged entry is removed), unless another process finished an intact one
    first (it may be reading it: kept). On error nothing is left."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        (tmp / SEAL).write_text(json.dumps({"files": _sizes(tmp)}, indent=1) + "\n", encoding="utf-8")
        if not intact(folder, required):
            if folder.exists():
                shutil.rmtree(folder) if folder.is_dir() and not folder.is_symlink() else folder.unlink()
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
