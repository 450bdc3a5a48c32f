"""An output folder that appears only complete: written in a staging folder beside it, moved
into place at the end, removed on any error or Ctrl-C.

Kept in this one function so that a shared output-safety module can replace it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import LfgraphError


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``out`` to write into. When the block finishes, the
    folder is moved to ``out`` with ``os.replace`` (an existing ``out`` folder is moved aside
    first and deleted after); when it raises (``KeyboardInterrupt`` included) the staging
    folder is deleted and ``out`` is left as it was."""
    out = Path(out)
    if not out.parent.is_dir():
        raise LfgraphError(f"output folder {out.parent} does not exist: create it or choose another -o path")
    if out.exists() and not out.is_dir():
        raise LfgraphError(f"output {out} is an existing file: give a folder for the checkpoint")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
