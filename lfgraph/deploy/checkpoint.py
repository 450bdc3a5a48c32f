"""A compressed causal LM saved as a standard Hugging Face checkpoint.

``rewrite_torch`` already keeps the in-memory model self-consistent after removing blocks
(``config.num_hidden_layers``, ``config.layer_types`` and each attention's ``layer_idx``,
see ``lfgraph.passes.block_stack``). What a *checkpoint* additionally needs, and this
module adds:

- a check, before anything is written, that the depth recorded in the config, the number of
  decoder layers and every per-layer config list agree and that ``layer_idx`` runs 0..n-1
  (a mismatch would make ``from_pretrained`` silently re-initialise or drop layers);
- per-layer config lists other than ``layer_types`` (``no_rope_layers``, ...) that still have
  the original length are sliced with the kept layers' original indices when the caller
  knows them, else refused;
- the tokenizer files, chat template and generation config copied from the source folder;
- the whole folder written atomically (a temporary folder renamed into place, file by file).

``save_pretrained`` does the weight serialisation (safetensors, tied tensors stored once).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .. import architectures
from ..errors import LfgraphError

#: Files a Hugging Face folder keeps beside the weights that describe text handling.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


#: The shard size ``save_hf_checkpoint`` writes (transformers' default for ``save_pretrained``):
#: one ``model.safetensors`` up to it, shards and an index above.
MAX_SHARD_BYTES = 50 * 10**9


def checkpoint_file_names(weight_bytes: int) -> list[str]:
    """The weight files :func:`save_hf_checkpoint` writes for a model of at most
    ``weight_bytes`` bytes of weights (``fnmatch`` patterns for shards)."""
    single = ["model.safetensors"]
    return single if weight_bytes <= MAX_SHARD_BYTES else single + ["model.safetensors.index.json", "model-*-of-*.safetensors"]


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The decoder-layer stack of a Hugging Face causal LM, where its family's architecture
    config says it is (:mod:`lfgraph.architectures`); ``LfgraphError`` for an unknown family."""
    return architectures.for_config(hf_model.config).blocks(hf_model)


def check_layer_bookkeeping(hf_model: nn.Module) -> None:
    """Raise ``LfgraphError`` when the config's depth, the layer stack, per-layer config lists
    or the attention ``layer_idx`` values disagree (what ``from_pretrained`` relies on)."""
    cfg = hf_model.config
    layers = decoder_layers(hf_model)
    n = len(layers)
    if cfg.num_hidden_layers != n:
        raise LfgraphError(f"config says {cfg.num_hidden_layers} layers but the model has {n}: rewrite with lfgraph.passes.rewrite_torch")
    for key in per_layer_keys(cfg, n):
        value = getattr(cfg, key)
        if len(value) != n:
            raise LfgraphError(f"config.{key} has {len(value)} entries for {n} layers: pass kept_layers so it can be sliced")
    for i, layer in enumerate(layers):
        for sub in layer.modules():
            idx = getattr(sub, "layer_idx", None)
            if isinstance(idx, int) and idx != i:
                raise LfgraphError(f"decoder layer {i} has layer_idx {idx}: layer indices must run 0..{n - 1}")


def per_layer_keys(cfg: Any, n_layers: int) -> list[str]:
    """The config attributes holding one entry per layer (the family's ``per_layer_keys``)."""
    return architectures.for_config(cfg).per_layer_lists(cfg)


def _slice_per_layer_lists(cfg: Any, kept_layers: Sequence[int] | None, n_layers: int) -> None:
    arch = architectures.for_config(cfg)
    stale = [k for k in arch.per_layer_lists(cfg) if len(getattr(cfg, k)) != n_layers]
    if not stale:
        return
    longest = max(len(getattr(cfg, k)) for k in stale)
    if kept_layers is None or len(kept_layers) != n_layers or max(kept_layers) >= longest:
        raise LfgraphError(f"config.{stale[0]} has {len(getattr(cfg, stale[0]))} entries for {n_layers} layers and the kept layers are unknown: "
                           "pass kept_layers (original indices of the layers that remain)")
    arch.set_depth(cfg, longest)
    arch.slice_config(cfg, kept_layers)


def save_hf_checkpoint(
    hf_model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer_source: str | os.PathLike | None = None,
    kept_layers: Sequence[int] | None = None,
    tokenizer: Any = None,
) -> list[Path]:
    """Write ``hf_model`` (a compressed ``*ForCausalLM``) as a Hugging Face checkpoint in ``out_dir``.

    Expects a model rewritten by ``lfgraph.passes.rewrite_torch`` (the HF model is
    ``apply_plan(...).model.model``). ``tokenizer_source`` is the source model's folder: its
    tokenizer files, chat template and generation config are copied; otherwise
    ``tokenizer`` (a transformers tokenizer) is saved when given. ``kept_layers`` (original
    indices of the remaining layers) is needed only for configs with per-layer lists that
    ``rewrite_torch`` does not update.

    Guarantees: ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads with no missing or
    unexpected weights and computes the same logits; tied tensors are stored once; files
    already in ``out_dir`` that this function does not write are left alone; each written
    file appears whole or not at all. ``hf_model`` is not modified (its config is copied).
    Returns the written paths.
    """
    import copy

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LfgraphError(f"output {out} exists and is not a folder: choose a folder for -o")
    if not out.parent.exists():
        raise LfgraphError(f"output folder {out.parent} does not exist: create it or choose another -o path")
    n = len(decoder_layers(hf_model))
    original_cfg = hf_model.config
    cfg = copy.deepcopy(original_cfg)
    _slice_per_layer_lists(cfg, kept_layers, n)
    cfg.num_hidden_layers = n
    hf_model.config = cfg
    try:
        check_layer_bookkeeping(hf_model)
        out.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".lfgraph-hf.", dir=out) as tmp:
            hf_model.save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD_BYTES)
            src = Path(tokenizer_source) if tokenizer_source else None
            if src is not None and src.is_dir():
                for name in TOKENIZER_FILES:
                    if (src / name).is_file():
                        shutil.copyfile(src / name, Path(tmp) / name)
            elif tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            written = []
            umask = os.umask(0)
            os.umask(umask)
            for f in sorted(Path(tmp).iterdir()):
                if f.is_file():
                    # some writers create owner-only temporaries: give the mode a plain open() would
                    os.chmod(f, 0o666 & ~umask)
                    os.replace(f, out / f.name)  # atomic per file
                    written.append(out / f.name)
    finally:
        hf_model.config = original_cfg
    return written


def stored_tensor_names(folder: str | os.PathLike) -> list[str]:
    """Names of the tensors in a checkpoint's safetensors file(s)."""
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names.extend(st.keys())
    return names


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())
