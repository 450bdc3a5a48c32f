"""``lfgraph compress decoder_with_past.onnx``: a with-past ONNX decoder made shallower.

The source is an ``.onnx`` file or a folder holding ``model.onnx`` (and ``genai_config.json``,
tokenizer files). The layers to remove come from a merge plan with ``fuse remove`` (block
names ending in the layer index, as the PyTorch path writes them) or are listed directly.
The result is written to a folder (``model.onnx``, updated ``genai_config.json`` and the
source folder's other small files copied) or to a single ``.onnx`` file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx

from ..errors import LfgraphError
from ..fileio import write_text_atomic
from .folder import block_indices
from .onnx_decoder import cache_layout, remove_decoder_layers

#: Files of a genai folder copied unchanged (tokenizer, chat template, configs).
_COPY_SUFFIXES = (".json", ".jinja", ".txt", ".model")


@dataclass
class DecoderCompressReport:
    source: Path
    out: Path
    removed: list[int]
    layers: tuple[int, int]
    file_bytes: tuple[int, int]
    files: list[Path]

    def lines(self) -> list[str]:
        return [f"  removed decoder layers {self.removed}: {self.layers[0]} -> {self.layers[1]} layers, "
                f"{self.file_bytes[0] / 1e6:.1f} MB -> {self.file_bytes[1] / 1e6:.1f} MB; written {self.out}"]


def layers_from_plan(plan: Any) -> list[int]:
    """The decoder layers a merge plan removes; refuses plans the ONNX decoder path cannot apply."""
    plan.validate()
    if plan.mode != "merge":
        raise LfgraphError(f"a with-past ONNX decoder can only lose whole layers: plan mode {plan.mode!r} needs --mode merge")
    if plan.fuse != "remove":
        raise LfgraphError(f"plan fuse rule {plan.fuse!r} changes weights, which the ONNX decoder path does not do: "
                           "use --fuse remove, or compress the Hugging Face folder instead")
    return block_indices(plan.absorbed)


def _model_file(source: Path) -> Path:
    if source.is_dir():
        f = source / "model.onnx"
        if not f.is_file():
            raise LfgraphError(f"{source} has no model.onnx: give the decoder's .onnx file or its folder")
        return f
    if source.suffix != ".onnx" or not source.is_file():
        raise LfgraphError(f"{source} is not an .onnx file or a folder with model.onnx")
    return source


def _bytes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    files = {path} | {path.parent / e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return sum(f.stat().st_size for f in files if f.is_file())


def compress_decoder_onnx(
    source: str | os.PathLike,
    out: str | os.PathLike,
    plan: Any = None,
    layers: Sequence[int] | None = None,
) -> DecoderCompressReport:
    """Remove the plan's (or the listed) decoder layers from the with-past decoder ``source``.

    ``out`` ending in ``.onnx`` writes one file (plus ``.data`` when large); otherwise ``out``
    is a folder (created; its parent must exist) that gets ``model.onnx``, the source
    folder's ``genai_config.json`` with ``num_hidden_layers`` updated, and its tokenizer and
    other small files. Refuses unknown cache layouts with one ``LfgraphError`` line. The
    source is not modified.
    """
    from ..onnx_io import save_onnx

    src, out = Path(source), Path(out)
    model_file = _model_file(src)
    if (plan is None) == (layers is None):
        raise LfgraphError("give either a plan or the layers to remove")
    drop = sorted(set(layers_from_plan(plan) if plan is not None else [int(i) for i in layers]))
    model = onnx.load(str(model_file), load_external_data=True)
    n_before = cache_layout(model).n_layers
    new = remove_decoder_layers(model, drop)
    if plan is not None:
        prop = new.metadata_props.add()
        prop.key, prop.value = "lfgraph.plan", plan.to_json()
    if out.suffix == ".onnx":
        if not out.parent.is_dir():
            raise LfgraphError(f"output folder {out.parent} does not exist: create it or choose another -o path")
        target, files = out, [out]
    else:
        if not out.parent.exists():
            raise LfgraphError(f"output folder {out.parent} does not exist: create it or choose another -o path")
        out.mkdir(exist_ok=True)
        target = out / "model.onnx"
        files = [target]
    if target.resolve() == model_file.resolve():
        raise LfgraphError("the output would overwrite the input model: choose another -o path")
    save_onnx(new, target)
    if Path(str(target) + ".data").exists():
        files.append(Path(str(target) + ".data"))
    if out.suffix != ".onnx":
        files.extend(_copy_folder_files(model_file.parent, out, n_before - len(drop), model_file.name))
    return DecoderCompressReport(src, out, drop, (n_before, n_before - len(drop)), (_bytes(model_file), _bytes(target)), files)


def _copy_folder_files(src: Path, out: Path, n_layers: int, model_name: str) -> list[Path]:
    written = []
    if src.resolve() == out.resolve():
        return written
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.suffix not in _COPY_SUFFIXES or f.name.startswith(model_name):
            continue
        if f.name == "genai_config.json":
            cfg = json.loads(f.read_text())
            cfg["model"]["decoder"]["num_hidden_layers"] = n_layers
            cfg["model"]["decoder"]["filename"] = "model.onnx"
            write_text_atomic(out / f.name, json.dumps(cfg, indent=4))
        elif f.name in ("config.json", "plan.json"):
            continue  # they describe the source's weights and plan, not this model
        else:
            shutil.copyfile(f, out / f.name)
        written.append(out / f.name)
    return written


def plan_decoder_onnx(
    source: str | os.PathLike,
    target: float,
    windows: Any = None,
    n_windows: int = 4,
    seq_len: int = 128,
    threads: int | None = None,
) -> Any:
    """A merge plan (``fuse remove``) that drops ``round(target * layers)`` decoder layers of
    lowest Block Influence, measured by running the ONNX decoder itself on ``windows``
    (token ids (n, seq); default: the bundled calibration text through the tokenizer in the
    source folder). Block names are ``model.layers.N`` so :func:`compress_decoder_onnx` and
    the PyTorch path read the same plan."""
    import numpy as np

    from ..passes.selection import runs_from_order, runs_to_plan
    from .onnx_decoder import block_influence

    src = Path(source)
    model_file = _model_file(src)
    model = onnx.load(str(model_file), load_external_data=True)
    n = cache_layout(model).n_layers
    if not (0.0 < target < 1.0):
        raise LfgraphError(f"target {target} is out of range: give a fraction strictly between 0 and 1 (e.g. 0.25)")
    n_drop = max(1, round(target * n))
    if n_drop > n - 1:
        raise LfgraphError(f"target {target} asks to remove {n_drop} of {n} decoder layers: lower the target")
    folder = model_file.parent
    if windows is None:
        from transformers import AutoTokenizer

        from ..calibration import calibration_windows

        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except Exception:
            raise LfgraphError(f"{folder} has no tokenizer for calibration text: pass token windows") from None
        windows = calibration_windows(tok, n_windows, seq_len).numpy()
    head_dim = None
    if (folder / "genai_config.json").is_file():
        head_dim = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"].get("head_size")
    scores = block_influence(model, np.asarray(windows), threads=threads, head_dim=head_dim)
    idx = list(range(n))
    order = sorted(idx, key=lambda i: (scores[i], i))
    runs = runs_from_order(order, idx, n_drop, dict(enumerate(scores)))
    provenance = {"source": str(model_file), "select": "block_influence (ONNX)", "target": target, "target_kind": "blocks",
                  "blocks_before": n, "blocks_after": n - n_drop, "scores": [round(s, 6) for s in scores]}
    return runs_to_plan(runs, "model.layers", fuse="remove", align=False, provenance=provenance)
