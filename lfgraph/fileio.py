"""Output files: a user's files are never lost, and every output appears complete or not at all.

Three rules, the same for every file or folder any subcommand writes (``-o``, ``--log``,
``--report``, ``--plot``, ``plan -o``, ``heal -o``, ``lfgraph-study --out``, ``visualize -o``):

1. **Checked before the heavy work** (:func:`check_outputs`): an output may not be an input,
   lie inside an input folder or contain an input; its folder must exist and be writable;
   two outputs may not share a path. An existing output is replaced only when lfgraph wrote
   it (:func:`written_by_lfgraph`: a folder with lfgraph's marker file, an ONNX file with
   lfgraph's metadata, a plan, rewrite log, page or plot that carries lfgraph's signature)
   or when ``--overwrite`` is given; an empty folder counts as free.
2. **Staged, then moved into place**: writers write into a staging path beside the output
   (:func:`staging_folder`, :func:`atomic_path`) named ``.NAME.lfgraph-tmp-PID-…`` and
   :func:`commit_folder` / ``os.replace`` put it in place only when it is complete. With
   ``--overwrite`` onto a folder lfgraph did not write, only the files lfgraph writes are
   replaced; the folder's other files stay, except that model files a runtime would load
   instead of or beside the new ones are refused (:func:`check_shadowing`).
3. **Interrupted runs leave nothing**: a raised error, Ctrl-C, SIGTERM or SIGHUP removes the
   staging path (the CLI turns the two signals into :class:`Terminated`); a run killed
   outright (SIGKILL, the OOM killer) leaves one, which the next run on that output removes
   and names (:func:`remove_stale_staging`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from . import __version__
from .errors import LfgraphError
from .passes.base import RewriteRecord

#: File inside every folder lfgraph writes (deploy folder, healed model, study, checkpoints):
#: JSON with the lfgraph version and the names lfgraph wrote there.
MARKER = ".lfgraph-output.json"
#: Infix of every staging path; with the writer's pid after it.
STAGING = ".lfgraph-tmp-"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Python was when it arrived, so that every ``finally``
    (staging removal) runs as for Ctrl-C. ``signum`` gives the exit code ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (a ``KeyboardInterrupt``).

    Only from the main thread (Python delivers signals there); elsewhere a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, _raise_terminated) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------- ownership


def _json_signature(data: object) -> bool:
    """JSON that lfgraph writes: a plan, a rewrite log, the page's data, overlays, a marker."""
    if isinstance(data, dict):
        if "fusions" in data and "schema_version" in data:  # a FusionPlan
            return True
        schema = data.get("schema") or data.get("lfgraph")
        if isinstance(schema, str) and schema.startswith("lfgraph"):
            return True
        return False
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        fields = set(RewriteRecord.__dataclass_fields__)
        return all(set(r) == fields for r in data)  # a rewrite log
    return False


def written_by_lfgraph(path: str | os.PathLike) -> bool:
    """Whether the existing ``path`` carries lfgraph's signature, so that lfgraph may replace it.

    A folder: lfgraph's marker file in it. ``.onnx``: an ``lfgraph.*`` metadata entry.
    ``.json``: a plan, a rewrite log or data whose ``schema`` names lfgraph. ``.html``: the
    page's generator tag. ``.png``: the ``Software`` text chunk lfgraph's plots carry. Any
    other file: never (it is the user's unless ``--overwrite``).
    """
    p = Path(path)
    if p.is_dir():
        return (p / MARKER).is_file()
    if not p.is_file():
        return False
    suffix = p.suffix.lower()
    try:
        if suffix == ".onnx":
            import onnx

            m = onnx.load(str(p), load_external_data=False)
            return any(prop.key.startswith("lfgraph.") for prop in m.metadata_props)
        if suffix == ".json":
            if p.stat().st_size > 256 * 2**20:
                return False
            return _json_signature(json.loads(p.read_text(encoding="utf-8")))
        if suffix == ".html":
            with open(p, "rb") as f:
                return GENERATOR_TAG.encode() in f.read(8192)
        if suffix == ".png":
            with open(p, "rb") as f:
                return PNG_SOFTWARE.encode() in f.read(8192)
    except Exception:  # unreadable, not JSON, not ONNX: not ours
        return False
    return False


#: The ``<meta>`` tag every page lfgraph writes carries in its head.
GENERATOR_TAG = '<meta name="generator" content="lfgraph">'
#: The PNG text chunk value lfgraph's plots carry (matplotlib ``metadata={"Software": ...}``).
PNG_SOFTWARE = "lfgraph"


def png_metadata() -> dict[str, str]:
    """``savefig(metadata=...)`` for every plot lfgraph writes (its ownership signature)."""
    return {"Software": PNG_SOFTWARE}


def _is_empty_folder(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


# --------------------------------------------------------------------------- checks


def given_path(what: str, value: str | os.PathLike) -> Path:
    """``value`` as a ``Path``; ``LfgraphError`` when it is the empty string, which names no
    file (``Path("")`` would be the current folder)."""
    if str(value) == "":
        raise LfgraphError(f"{what} is empty: give the path of a file or folder")
    return Path(value)


def _resolved(p: str | os.PathLike) -> Path:
    # symbolic links followed: an output reached through a link into the input is inside it
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: permissions, read-only mounts and full disks
    all show here, before any work (``os.access`` is always true for root)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".lfgraph-probe-{os.getpid()}-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise LfgraphError(f"cannot write {what} into {folder} ({e.strerror or e}): choose a folder you can write to") from None


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False, folders: Iterable[str] = ()) -> None:
    """Refuse, before any work, an output that would lose a file or cannot be written.

    ``outputs`` maps the option that names each output (``-o``, ``--log``, …) to its path
    (``None``: not asked for). ``inputs`` are the paths the run reads (model file or folder,
    plan, texts). ``folders`` names the options whose output is a folder. Raises
    :class:`LfgraphError` (exit 2) naming the option; removes staging paths that a killed
    run left beside any of the outputs (and says so on stderr).
    """
    ins = [_resolved(i) for i in inputs if i is not None and str(i) and Path(str(i)).exists()]
    seen: dict[Path, str] = {}
    folders = set(folders)
    for what, out in outputs.items():
        if out is None:
            continue
        given_path(what, out)
        target = _resolved(out)
        if target in seen:
            raise LfgraphError(f"{what} and {seen[target]} name the same path {out}: give each output its own path")
        seen[target] = what
        for i in ins:
            if target == i:
                raise LfgraphError(f"{what} {out} is an input of this run: writing it would destroy the input; choose another path")
            if _inside(target, i):
                raise LfgraphError(f"{what} {out} lies inside the input {i}: writing there would change the input; choose a path outside it")
            if _inside(i, target):
                raise LfgraphError(f"{what} {out} contains the input {i}: replacing it would destroy the input; choose another path")
        parent = target.parent
        if not parent.exists():
            raise LfgraphError(f"folder of {what} {parent} does not exist: create it or choose another path")
        if not parent.is_dir():
            raise LfgraphError(f"folder of {what} {parent} is a file, not a folder: choose another path")
        _probe_writable(parent, what)
        remove_stale_staging(target)
        if what in folders and target.is_file():
            raise LfgraphError(f"{what} {out} is an existing file, and this output is a folder: choose another path")
        if what not in folders and target.is_dir():
            raise LfgraphError(f"{what} {out} is an existing folder, and this output is a file: choose another path")
        if target.exists() and not overwrite and not _is_empty_folder(target) and not written_by_lfgraph(target):
            kind = "folder" if target.is_dir() else "file"
            raise LfgraphError(f"{what} {out} is an existing {kind} that lfgraph did not write: choose another path, "
                               "or pass --overwrite to replace (only) the files lfgraph writes there")
        data = target.with_name(target.name + ".data")
        if target.suffix == ".onnx" and data.exists() and not overwrite and not (target.exists() and written_by_lfgraph(target)):
            raise LfgraphError(f"{data} exists and belongs to no lfgraph output: choose another path, or pass --overwrite")


# --------------------------------------------------------------------------- staging


def failed_path(out: str | os.PathLike) -> Path:
    """Where an output that failed its check goes, so that ``out`` never holds one:
    ``small.onnx`` -> ``small.failed.onnx``, ``deploy/`` -> ``deploy.failed/``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.failed{out.suffix}") if out.suffix == ".onnx" else out.with_name(out.name + ".failed")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove staging paths beside ``target`` (its own and its ``.data``'s) whose writer is no
    longer running, saying so on stderr. Returns what was removed."""
    target = _resolved(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.glob(f".{target.name}*{STAGING}*"):
        pid_part = p.name.split(STAGING, 1)[1].split("-", 1)[0]
        if not pid_part.isdigit() or int(pid_part) == os.getpid() or _pid_alive(int(pid_part)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        print(f"lfgraph: removed {p}, left by an interrupted run (process {pid_part})", file=sys.stderr)
    return removed


def staging_name(target: Path, suffix: str = "") -> Path:
    """A fresh staging path beside ``target``, named so that a later run can tell whose it is."""
    return target.with_name(f".{target.name}{STAGING}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def staging_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new, empty folder beside ``target`` to stage an output in; removed on exit, whatever
    happens (error, Ctrl-C, :class:`Terminated`). Whoever commits moves things out first."""
    target = _resolved(target)
    if not target.parent.is_dir():
        raise LfgraphError(f"output folder {target.parent} does not exist: create it or choose another -o path")
    folder = staging_name(target)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _mode_of_plain_open(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it over ``target`` only on success.

    The caller writes to the yielded path (any number of times, with any library). If the
    block raises (Ctrl-C and :class:`Terminated` included), the temporary file is removed
    and ``target`` is left exactly as it was.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.exists():
        raise LfgraphError(f"output folder {folder} does not exist: create it or choose another -o path")
    tmp = staging_name(target, suffix + ".tmp")
    tmp.touch()
    _mode_of_plain_open(tmp)  # mkstemp-style temporaries would be owner-only
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def _marker_text(names: list[str]) -> str:
    return json.dumps({"lfgraph": __version__, "files": names}, indent=1) + "\n"


def _marker_names(folder: Path) -> set[str] | None:
    try:
        return set(json.loads((folder / MARKER).read_text(encoding="utf-8"))["files"])
    except Exception:
        return None


#: Names (``fnmatch`` patterns) of the files a runtime loads a model from when it is given a
#: folder: transformers' weights and indexes (safetensors, then ``pytorch_model.bin``), a PEFT
#: adapter (transformers loads it onto its base model), ONNX Runtime's ``model.onnx`` and
#: onnxruntime-genai's ``genai_config.json`` (an external ``.data`` file is read only when a
#: ``model.onnx`` names it).
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin", "model.onnx", "genai_config.json")


def shadowing_files(folder: str | os.PathLike, written: Iterable[str]) -> list[str]:
    """The files of ``folder`` that lfgraph did not write (its marker does not list them)
    and that would stay beside an output writing ``written`` (file names, or ``fnmatch``
    patterns such as ``model-*-of-*.safetensors`` where the count is not known yet) while a
    runtime loads a model from them (:data:`MODEL_FILES`): an old ``model.safetensors``
    beside new shards (transformers loads it instead), old shards or an index beside a new
    ``model.safetensors``, ``pytorch_model.bin``, an adapter, a ``model.onnx`` beside a
    checkpoint written without ONNX. Sorted names; ``[]`` when ``folder`` is not a folder."""
    import fnmatch

    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = _marker_names(folder) or set()
    written = list(written)
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in ours and any(fnmatch.fnmatchcase(p.name, m) for m in MODEL_FILES)
                  and not any(fnmatch.fnmatchcase(p.name, w) for w in written))


def check_shadowing(folder: str | os.PathLike, written: Iterable[str], what: str = "-o") -> None:
    """Refuse (``LfgraphError``, exit 2) to write ``written`` into ``folder`` while
    :func:`shadowing_files` finds files there that a runtime would load instead of or
    beside them. Called by :func:`commit_folder` and, where the output's files are known
    before the heavy work, by the writers first."""
    bad = shadowing_files(folder, written)
    if bad:
        listed = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise LfgraphError(f"{what} {folder} holds {listed}, model files lfgraph did not write and would not replace: transformers or "
                           "ONNX Runtime would load them instead of or beside the new model; move them out of the folder, or choose another -o")


def commit_folder(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the complete folder ``staged`` at ``target`` and mark it as lfgraph's.

    ``target`` absent, empty, or lfgraph's with nothing else in it: replaced as a whole (one
    rename; the old folder removed after). ``target`` holding files lfgraph did not write
    (allowed only with ``--overwrite``, see :func:`check_outputs`): refused when model files
    of the user's would stay beside the new ones (:func:`check_shadowing`); else each file of
    ``staged`` replaces its namesake and files lfgraph wrote there before but not now are
    removed; the rest stays. ``staged`` is consumed.
    """
    staged, target = Path(staged), _resolved(target)
    names = sorted(p.name for p in staged.iterdir() if p.name != MARKER)
    _mode_of_plain_open(staged)
    if not target.exists() or _is_empty_folder(target):
        (staged / MARKER).write_text(_marker_text(names), encoding="utf-8")
        if target.exists():
            target.rmdir()
        os.replace(staged, target)
        return target
    ours = _marker_names(target)
    foreign = [p.name for p in target.iterdir() if p.name != MARKER and (ours is None or p.name not in ours)]
    if not foreign:
        (staged / MARKER).write_text(_marker_text(names), encoding="utf-8")
        old = staging_name(target, ".old")
        os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
        return target
    check_shadowing(target, names)  # the user's weights must not stay beside (or in front of) the new ones
    for name in names:  # file by file: the user's other files stay where they are
        dest = target / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(staged / name, dest)
    for name in (ours or set()) - set(names):
        stale = target / name
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    write_text_atomic(target / MARKER, _marker_text(names))
    return target


def mark_folder(folder: str | os.PathLike) -> None:
    """Mark a folder lfgraph filled in place (e.g. checkpoints written one by one) as lfgraph's."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    write_text_atomic(folder / MARKER, _marker_text(names))
