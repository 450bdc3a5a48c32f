"""Block sources: a model's stack of blocks, held in memory or onloaded one at a time.

Every pass that walks a model's blocks (selection scores, the calibrated refit, the
block-wise distillation, the quality measure) reads them through a :class:`BlockSource`,
so that one implementation serves a model held in memory and a checkpoint too large to
hold (llm-compressor's sequential pipeline: the calibration windows pass the stack block
by block, one block in memory, the hidden states kept between blocks):

- :class:`HeldBlocks`: the blocks of a module in memory (a Hugging Face model inside
  lfgraph's wrapper, or any ``nn.Module`` with a stack of blocks); opening a block costs
  nothing, changes made to it stay.
- :class:`CheckpointBlocks`: a safetensors checkpoint folder whose model is built on the
  meta device (``accelerate.init_empty_weights``); opening block ``i`` reads its tensors in
  float32 (onto ``device``), closing it gives them back. A *view* (:meth:`CheckpointBlocks.view`)
  is the compressed model: some blocks kept, in order, some of their tensors replaced
  (``overrides``), the checkpoint itself never written.

Where things are in the model (the stack, the token embedding, the head) is asked of the
model itself and of its family's class in :mod:`lfgraph.architectures`; nothing here
names a module path. What each layer is called with (masks, rotary embeddings, positional
arguments) is recorded from the model's own forward (:func:`record_calls`), so every block
sees exactly what it sees when the model runs whole, layer by layer; the input of block 0
is what the model's own embedding code makes of the tokens (Gemma's ``sqrt(hidden)``
scaling, GPT-2's position embeddings included).

Plans and logs name blocks by their path in lfgraph's in-memory wrapper
(:class:`lfgraph.models.CausalLMLogits`: ``model.`` + the Hugging Face path), on every
source: :attr:`BlockSource.container`.
"""

from __future__ import annotations

import contextlib
import copy
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import LfgraphError, UnsupportedModelError

#: The prefix lfgraph's in-memory wrapper (``CausalLMLogits``) gives Hugging Face module paths.
WRAPPER_PREFIX = "model."


# ---------------------------------------------------------------------------------------
# what a layer is called with


@dataclass
class LayerCall:
    """The arguments one layer receives besides the hidden state: the positional ones after
    it and the keyword ones (masks, rotary embeddings, ``use_cache``...)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``block``'s output hidden state on ``hidden`` with these arguments."""
        return block_output(block(hidden, *self.args, **self.kwargs))

    def to(self, device: torch.device | str) -> "LayerCall":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else (tuple(move(x) for x in v) if isinstance(v, tuple) else v)  # noqa: E731
        return LayerCall(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()})


def block_output(out: Any) -> torch.Tensor:
    """The hidden state a block returns (Hugging Face layers of some versions return tuples)."""
    return out[0] if isinstance(out, (tuple, list)) else out


_HIDDEN_KEYS = ("hidden_states", "x", "input")


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs))
    for key in _HIDDEN_KEYS:
        if key in kwargs:
            return kwargs[key], LayerCall((), {k: v for k, v in kwargs.items() if k != key})
    raise LfgraphError("cannot find the hidden state among a block's call arguments: pass it as the first argument")


class _StopForward(Exception):
    pass


#: Block attributes a model's forward reads off its layers while it loops over them
#: (Gemma 2/3, Qwen2 and others read ``attention_type`` to pick the layer's mask).
LAYER_ATTRIBUTES = ("attention_type", "is_sliding", "sliding_window", "use_rope")


class _Recorder(nn.Module):
    """Stands in for one layer: records what it is called with and passes the hidden state
    through; the last one stops the forward (nothing above the stack is needed)."""

    def __init__(self, like: nn.Module, last: bool, record: list) -> None:
        super().__init__()
        self.last, self.record = last, record
        for name in LAYER_ATTRIBUTES:
            if hasattr(like, name):
                object.__setattr__(self, name, getattr(like, name))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden, call = _split_call(args, kwargs)
        self.record.append((hidden, call))
        if self.last:
            raise _StopForward
        return hidden


@contextlib.contextmanager
def _swapped(module: nn.Module, path: str, replacement: nn.Module) -> Iterator[None]:
    parent_path, _, attr = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    original = getattr(parent, attr)
    setattr(parent, attr, replacement)
    try:
        yield
    finally:
        setattr(parent, attr, original)


def _like(container: nn.Module, modules: Sequence[nn.Module]) -> nn.Module:
    return nn.ModuleList(modules) if isinstance(container, nn.ModuleList) else nn.Sequential(*modules)


@torch.no_grad()
def record_calls(module: nn.Module, path: str, run: Callable[[], Any]) -> tuple[torch.Tensor, list[LayerCall]]:
    """Run ``run()`` (a forward of ``module``) with the stack at ``path`` swapped for
    recorders: returns the hidden state entering its first layer and the call of every
    layer, in order. The stack's own layers do not run; ``module`` is unchanged afterwards."""
    container = module.get_submodule(path)
    layers = list(container)
    record: list[tuple[torch.Tensor, LayerCall]] = []
    recorders = _like(container, [_Recorder(layer, i == len(layers) - 1, record) for i, layer in enumerate(layers)])
    with _swapped(module, path, recorders):
        try:
            run()
        except _StopForward:
            pass
    if len(record) != len(layers):
        raise UnsupportedModelError(f"{type(module).__name__}'s forward called {len(record)} of its {len(layers)} layers in order: "
                                    "lfgraph cannot run its blocks one at a time")
    return record[0][0], [c for _, c in record]


class _Injector(nn.Module):
    """Stands in for a whole stack: returns a given hidden state as the stack's last block
    would have returned it (a tuple for families whose blocks return one: Falcon)."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool = False) -> None:
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.as_tuple else self.hidden


# ---------------------------------------------------------------------------------------
# the stack's input


@dataclass
class StackInput:
    """The hidden states entering block 0 and each layer's call, per batch.

    ``hidden[b]``: ``(batch, seq, hidden)`` (any shape the first block takes); ``calls[b][i]``:
    what layer ``i`` is called with for batch ``b``; ``ids[b]``: the batch's inputs (token
    ids); ``group[b]``: the index of the group of windows it was cut from."""

    ids: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[LayerCall]] = field(default_factory=list)
    group: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Positions over all batches (tokens, or spatial positions of feature maps)."""
        return sum(_positions(h) for h in self.hidden)

    def __len__(self) -> int:
        return len(self.hidden)


def _positions(h: torch.Tensor) -> int:
    return int(h.numel() // h.shape[-1]) if h.dim() != 4 else int(h.shape[0] * h.shape[2] * h.shape[3])


def batch_groups(groups: Sequence[torch.Tensor], batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """(group index, batch) for each group of windows cut into consecutive batches of
    ``batch_size`` (as :func:`lfgraph.calibration.batches` cuts them), groups in order."""
    out = []
    for g, data in enumerate(groups):
        for start in range(0, data.shape[0], batch_size):
            out.append((g, data[start : start + batch_size]))
    return out


def regroup(inputs: StackInput, ids: torch.Tensor, groups: Sequence[torch.Tensor], states: Sequence[torch.Tensor],
            calls: Sequence[Sequence[LayerCall]] | None = None, batch_size: int = 4) -> StackInput:
    """A :class:`StackInput` for the windows ``ids[g]`` of each group ``g`` of window indices
    of ``groups`` (batches of ``batch_size``, groups in order), holding the rows of
    ``states``: hidden states of every window of ``ids`` in order, in consecutive batches
    (what a pass over ``inputs``' batches computed at some depth). Each window's rows are
    copied into its new batch; the calls are those of the first window's old batch when all
    batches of a new group have the same size (calls depend on shapes only for unpadded
    windows), else ``calls`` must be given per new batch."""
    where = [(b, r) for b, s in enumerate(states) for r in range(s.shape[0])]
    if len(where) != ids.shape[0]:
        raise ValueError(f"{len(where)} hidden states for {ids.shape[0]} windows")
    out = StackInput()
    k = 0
    for g, index in enumerate(groups):
        index = [int(i) for i in index]
        for start in range(0, len(index), batch_size):
            windows = index[start : start + batch_size]
            out.ids.append(ids[windows])
            out.hidden.append(torch.stack([states[where[w][0]][where[w][1]] for w in windows]))
            out.group.append(g)
            out.calls.append(list(calls[k]) if calls is not None else [])
            k += 1
    return out


class StateMemory:
    """The hidden states a pass over the calibration windows keeps for a later one (the
    selection pass for the refit: the state entering the first run), so that the blocks
    below are not run twice. :meth:`want` says which windows and blocks; the pass
    (:func:`lfgraph.passes.selection.stack_scores`) stores them; :meth:`take` hands them
    over once (and forgets them)."""

    def __init__(self) -> None:
        self.windows: torch.Tensor | None = None
        self.blocks: set[int] = set()
        self.inputs: StackInput | None = None
        self.states: dict[int, list[torch.Tensor]] = {}

    def want(self, windows: torch.Tensor, blocks: Sequence[int]) -> None:
        self.windows, self.blocks = windows, set(blocks)
        self.inputs, self.states = None, {}

    def wanted(self, inputs: StackInput) -> set[int]:
        """The blocks whose entering states to keep from a pass over ``inputs``."""
        if self.windows is None or not inputs.ids or not torch.equal(torch.cat(inputs.ids), self.windows):
            return set()
        return self.blocks

    def store(self, inputs: StackInput, states: dict[int, list[torch.Tensor]]) -> None:
        self.inputs, self.states = inputs, states

    def take(self, windows: Any) -> tuple[StackInput, dict[int, list[torch.Tensor]]] | None:
        if self.inputs is None or windows is None or not torch.equal(torch.cat(self.inputs.ids), windows):
            return None
        out = (self.inputs, self.states)
        self.inputs, self.states, self.windows = None, {}, None
        return out


# ---------------------------------------------------------------------------------------
# sources


def read_config(folder: Path) -> Any:
    """The Hugging Face config of a checkpoint folder; ``LfgraphError`` (one line) when
    transformers cannot read it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise LfgraphError(f"cannot read the model config in {folder}: {first[:200]}") from None


def _stored_names(hf_model: nn.Module, ckpt: Any, name: str) -> dict[str, str]:
    """Model tensor path -> checkpoint tensor name, by the renamings transformers applies
    when it loads this model (``transformers.conversion_mapping``: e.g. GPT-NeoX's
    ``embed_out`` is the model's ``lm_head``). A checkpoint whose tensors transformers
    *converts* on load (per-expert weights merged into one tensor) is refused: its blocks
    cannot be read tensor by tensor as the model holds them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversions: names are stored as they are
        return {k: k for k in ckpt.tensors}
    transforms = get_model_conversion_mapping(hf_model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = hf_model.state_dict()
    out: dict[str, str] = {}
    for key in ckpt.tensors:
        renamed, converted = rename_source_key(key, renamings, converters, getattr(hf_model, "base_model_prefix", None), meta)
        if converted is not None:
            raise UnsupportedModelError(
                f"{name}: transformers converts this checkpoint's tensors when it loads them ({key} -> {renamed}): lfgraph reads "
                "a checkpoint block by block only where its tensors are the model's; compress it in memory (leave out --stream)")
        out[renamed] = key
    return out


def check_unexpected(stored: Mapping[str, str], hf_model: nn.Module, folder: Path) -> None:
    """Refuse a checkpoint holding tensors the model has no place for, as the in-memory
    loader refuses them (:func:`lfgraph.blocks.checkpoint.unexpected_tensors`), e.g. layers
    beyond the config's depth: they would be dropped silently. ``stored``: model path ->
    stored name (after transformers' renamings)."""
    from .checkpoint import unexpected_tensors

    bad = [stored[k] for k in unexpected_tensors(list(stored), hf_model)]
    if bad:
        raise LfgraphError(f"config.json and the weights in {folder} disagree: {len(bad)} weight(s) not expected by the config "
                           f"({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}); fix config.json or re-save the checkpoint")


class BlockSource:
    """A model's stack of blocks (see the module docstring).

    Attributes: ``name``; ``num_blocks``; ``container``, the plans' name of the stack
    (blocks are ``f"{container}.{i}"``); ``hf_model``, the Hugging Face model (``None`` for a
    plain module; its parameters are on the meta device for a checkpoint); ``device``.
    """

    name: str = ""
    num_blocks: int = 0
    container: str = ""
    hf_model: nn.Module | None = None
    device: torch.device = torch.device("cpu")
    #: blocks are in memory (opening one reads nothing)
    held: bool = True
    #: what a pass keeps for a later one (None: nothing; blocks in memory are cheap to rerun)
    memory: "StateMemory | None" = None

    def open(self, i: int) -> contextlib.AbstractContextManager[nn.Module]:
        """Block ``i`` (index into this source's stack) in memory, as a context manager."""
        raise NotImplementedError

    def blocks(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, nn.Module]]:
        """``(i, block)`` for each index (default: all, in order), each block in memory while
        the caller holds it (until the next is asked for)."""
        for i in range(self.num_blocks) if indices is None else indices:
            with self.open(i) as block:
                yield i, block

    def stack_input(self, groups: Sequence[torch.Tensor], batch_size: int = 4) -> StackInput:
        """The stack's input for each group of windows (token ids ``(n, seq)``, or samples),
        cut into consecutive batches of ``batch_size``, groups in order."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The model's output (logits) when its stack returns ``hidden`` on inputs ``ids``:
        what comes after the stack (final norm, head, soft-capping), run by the model."""
        raise NotImplementedError

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """``fn(hidden, ids) -> logits`` as :meth:`logits`, for many calls (a checkpoint
        reads what follows the stack once)."""
        yield self.logits

    def shares_head(self, other: "BlockSource") -> bool:
        """Whether ``other`` runs what follows the stack with this source's very tensors (a
        view of the same checkpoint: a rewrite changes blocks only), so one head serves both."""
        return False

    def parameter_count(self) -> int:
        raise NotImplementedError

    def keep_changes(self, i: int, block: nn.Module, names: Sequence[str]) -> None:
        """Keep what was changed in open block ``i``'s tensors ``names`` (block-relative
        parameter names) after it is closed. Held blocks keep every change anyway."""

    def stored_dtypes(self, i: int, block: nn.Module) -> dict[int, torch.dtype]:
        """``id(parameter)`` -> the dtype open block ``i``'s parameter will be written in;
        empty for held blocks (kept as they are)."""
        return {}

    def close(self) -> None:
        """Stop any background reading."""

    def block_name(self, i: int) -> str:
        return f"{self.container}.{i}"

    def output_is_tuple(self, sample: torch.Tensor) -> bool:
        """Whether a block returns a tuple (whose first element is the hidden state), found
        once by running block 0 on the first of the inputs ``sample``."""
        if getattr(self, "_output_is_tuple", None) is None:
            inputs = self.stack_input([sample[:1]], batch_size=1)
            with self.open(0) as block, torch.no_grad():
                out = block(inputs.hidden[0], *inputs.calls[0][0].args, **inputs.calls[0][0].kwargs)
            self._output_is_tuple = isinstance(out, (tuple, list))
        return bool(self._output_is_tuple)


class HeldBlocks(BlockSource):
    """The blocks of ``module`` in memory; ``container`` is the stack's module path in it.

    ``calibration inputs`` are what ``module`` takes (token ids for language models)."""

    held = True

    def __init__(self, module: nn.Module, container: str, name: str = "") -> None:
        from ..models import inner_hf_model

        self.module = module
        self.container = container
        self.stack = module.get_submodule(container)
        self.num_blocks = len(self.stack)
        self.name = name or type(module).__name__
        hf = inner_hf_model(module)
        self.hf_model = hf if hf is not None and hasattr(hf, "base_model_prefix") else None
        first = next(module.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")

    @contextlib.contextmanager
    def open(self, i: int) -> Iterator[nn.Module]:
        yield self.stack[i]

    @torch.no_grad()
    def stack_input(self, groups: Sequence[torch.Tensor], batch_size: int = 4) -> StackInput:
        out = StackInput()
        for g, batch in batch_groups(groups, batch_size):
            x, calls = record_calls(self.module, self.container, lambda: self.module(batch.to(self.device)))
            out.ids.append(batch)
            out.hidden.append(x)
            out.calls.append(calls)
            out.group.append(g)
        return out

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with _swapped(self.module, self.container, _like(self.stack, [_Injector(hidden, self.output_is_tuple(ids))])):
            return self.module(ids.to(self.device))

    def parameter_count(self) -> int:
        """Parameters of the module, each shared tensor once."""
        seen: dict[int, int] = {}
        for _, p in self.module.named_parameters(remove_duplicate=False):
            seen[id(p)] = p.numel()
        return sum(seen.values())


class CheckpointBlocks(BlockSource):
    """A safetensors checkpoint folder, its model on the meta device, blocks onloaded one
    at a time in float32 (see the module docstring).

    Expects a causal LM of a family registered in :mod:`lfgraph.architectures` whose class
    streams (:meth:`~lfgraph.architectures.base.Architecture.stream_refusal` is ``None``);
    raises ``UnsupportedModelError`` naming the reason otherwise, before any weight is read.
    Opening a block reads it (and checks it finite); :meth:`blocks` reads the next block in
    a background thread while the caller computes with the current one (two blocks in
    memory). Nothing here modifies the checkpoint.
    """

    held = False

    def __init__(self, folder: str | Path | Any, device: str | torch.device = "cpu", prefetch: bool = True) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from .. import architectures
        from .checkpoint import Checkpoint

        hf_logging.set_verbosity_error()
        self.ckpt = folder if isinstance(folder, Checkpoint) else Checkpoint(folder)
        self.name = self.ckpt.folder.name
        config = read_config(self.ckpt.folder)
        from ..models import is_causal_lm

        if not is_causal_lm(config):
            raise UnsupportedModelError(f"{self.name} is not a causal language model ({getattr(config, 'model_type', '?')}): lfgraph reads "
                                        "decoder checkpoints block by block, other models in memory (leave out --stream)")
        self.architecture = architectures.for_config(config)
        refusal = self.architecture.stream_refusal(config)
        if refusal:
            raise UnsupportedModelError(f"{self.name}: {refusal}")
        self.config = config
        with init_empty_weights(include_buffers=False):
            self.hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.hf_model.tie_weights()  # tied parameters are one object, as in a loaded model
        self.hf_model.eval()
        self._stored = _stored_names(self.hf_model, self.ckpt, self.name)
        self.stack_path = self.architecture.stack_path(self.hf_model)
        self.container = WRAPPER_PREFIX + self.stack_path
        self.stack = self.hf_model.get_submodule(self.stack_path)
        depth = self.architecture.depth(config)
        if len(self.stack) != depth:
            raise UnsupportedModelError(f"{self.name}: the model has {len(self.stack)} layers for a config of {depth}")
        check_unexpected(self._stored, self.hf_model, self.ckpt.folder)
        self.device = torch.device(device)
        self.prefetch = prefetch
        #: the original blocks this source's stack holds, in order (a view keeps some)
        self.kept: list[int] = list(range(depth))
        #: original block index -> block-relative tensor name -> replacement (stored dtype)
        self.overrides: dict[int, dict[str, torch.Tensor]] = {}
        self.num_blocks = depth
        #: ``fn(original index, block)`` called with every original block (no overrides) a pass opens
        self.observers: list[Callable[[int, nn.Module], None]] = []
        #: hidden states a selection pass keeps for the refit (:class:`StateMemory`), or None
        self.memory: StateMemory | None = StateMemory()
        self._reader: ThreadPoolExecutor | None = None

    # -- views ----------------------------------------------------------------------

    def view(self, kept: Sequence[int], overrides: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> "CheckpointBlocks":
        """The compressed model: original blocks ``kept`` (ascending) as its stack, tensors of
        ``overrides`` (original index -> block-relative name -> tensor) replacing the stored
        ones. Shares the checkpoint and the meta model (both only read)."""
        kept = [int(i) for i in kept]
        if kept != sorted(set(kept)) or not kept or kept[-1] >= len(self.stack):
            raise LfgraphError(f"internal error: a view keeps blocks {kept} of {len(self.stack)}")
        v = copy.copy(self)
        v.kept = kept
        v.num_blocks = len(kept)
        v.overrides = {int(k): dict(t) for k, t in (overrides or {}).items()}
        v._reader = None
        v.memory = None
        return v

    @property
    def is_original(self) -> bool:
        return self.kept == list(range(len(self.stack))) and not self.overrides

    # -- blocks ---------------------------------------------------------------------

    def tensor_names(self, original: int) -> dict[str, str]:
        """Block-relative parameter/buffer name -> checkpoint tensor name of original block
        ``original`` (every persistent tensor of the block); ``LfgraphError`` when the
        checkpoint lacks one."""
        prefix = f"{self.stack_path}.{original}."
        return {k: self.stored_name(prefix + k) for k in self.stack[original].state_dict()}

    def read_state(self, original: int) -> dict[str, torch.Tensor]:
        """Original block ``original``'s float32 tensors (overrides applied) by block-relative
        name, on this source's device; ``LfgraphError`` for NaN or Inf. Safe in a thread."""
        from ..models import all_finite

        names = self.tensor_names(original)
        own = self.overrides.get(original, {})
        stored = self.ckpt.load([v for k, v in names.items() if k not in own], torch.float32)
        state = {}
        for k, v in names.items():
            t = own[k].to(torch.float32) if k in own else stored[v]
            if k not in own and not all_finite(t):
                raise LfgraphError(f"{self.name}: weight {v} contains NaN or Inf values: the checkpoint is damaged; re-save or re-train it")
            state[k] = t.to(self.device)
        return state

    def _build(self, i: int, state: dict[str, torch.Tensor]) -> nn.Module:
        block = copy.deepcopy(self.stack[self.kept[i]])  # meta: costs nothing; never shared between opens
        block.load_state_dict(state, strict=True, assign=True)
        for p in block.parameters():
            p.requires_grad_(False)
        block = block.to(self.device).eval()
        original = self.kept[i]
        if original not in self.overrides:
            for observe in self.observers:
                observe(original, block)
        return block

    @contextlib.contextmanager
    def open(self, i: int) -> Iterator[nn.Module]:
        block = self._build(i, self.read_state(self.kept[i]))
        try:
            yield block
        finally:
            block.to("meta")

    def blocks(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, nn.Module]]:
        order = list(range(self.num_blocks) if indices is None else indices)
        if not self.prefetch or len(order) < 2:
            yield from super().blocks(order)
            return
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfgraph-read")
        following: Future | None = reader.submit(self.read_state, self.kept[order[0]])
        try:
            for k, i in enumerate(order):
                state = following.result()  # type: ignore[union-attr]
                following = reader.submit(self.read_state, self.kept[order[k + 1]]) if k + 1 < len(order) else None
                block = self._build(i, state)
                del state
                try:
                    yield i, block
                finally:
                    block.to("meta")
        finally:
            reader.shutdown(wait=True, cancel_futures=True)

    def stored_dtypes(self, i: int, block: nn.Module) -> dict[int, torch.dtype]:
        from .checkpoint import DTYPES

        full = self.tensor_names(self.kept[i])
        return {id(p): DTYPES[self.ckpt.entry(full[n]).dtype] for n, p in block.named_parameters() if n in full}

    def keep_changes(self, i: int, block: nn.Module, names: Sequence[str]) -> None:
        """Keep tensors ``names`` of open block ``i`` as overrides, in the dtype the
        checkpoint stores them (what will be written), and round the open block's copies to
        that dtype, so that what runs next is what is written."""
        from .checkpoint import DTYPES

        original = self.kept[i]
        full = self.tensor_names(original)
        state = dict(block.named_parameters())
        state.update(dict(block.named_buffers()))
        own = self.overrides.setdefault(original, {})
        for name in names:
            stored = DTYPES[self.ckpt.entry(full[name]).dtype]
            own[name] = state[name].detach().to("cpu", stored, copy=True)
            with torch.no_grad():
                state[name].copy_(own[name].to(state[name].dtype))

    # -- around the stack -----------------------------------------------------------

    def _outside(self) -> dict[str, str]:
        """Parameter/buffer path -> checkpoint tensor name of every persistent tensor of the
        model outside the stack (embeddings, final norm, head), shared ones once."""
        stack = self.stack_path + "."
        out: dict[str, str] = {}
        for name in self.hf_model.state_dict(keep_vars=True):
            if not name.startswith(stack):
                out[name] = self.stored_name(name)
        return out

    def stored_name(self, path: str) -> str:
        """The checkpoint tensor holding model tensor ``path``; for a tied parameter absent
        from the file (``lm_head.weight`` with tied embeddings), its partner's name."""
        if path in self._stored:
            return self._stored[path]
        params = dict(self.hf_model.named_parameters(remove_duplicate=False))
        target = params.get(path)
        if target is not None:
            for name, p in params.items():
                if p is target and name in self._stored:
                    return self._stored[name]
        raise LfgraphError(f"tensor {path} is missing from the checkpoint in {self.ckpt.folder}: the checkpoint does not match its config.json")

    @contextlib.contextmanager
    def _materialized(self, skip: Sequence[str] = (), compact: tuple[str, torch.Tensor] | None = None) -> Iterator[None]:
        """The tensors outside the stack in float32 on the device, except those at the paths
        of ``skip``; ``compact``: (path, rows) of the token embedding, given only those rows.
        The meta tensors are put back afterwards (tied tensors stay one object)."""
        from ..models import all_finite

        outside = self._outside()
        skipped = set(skip) | {p for p, s in outside.items() if any(outside.get(q) == s for q in skip)}
        names = {p: s for p, s in outside.items() if p not in skipped}
        stored = self.ckpt.load(set(names.values()), torch.float32)
        for s, t in stored.items():
            if not all_finite(t):
                raise LfgraphError(f"{self.name}: weight {s} contains NaN or Inf values: the checkpoint is damaged; re-save or re-train it")
        saved: list[tuple[dict, str, Any]] = []
        by_stored: dict[str, Any] = {}

        def put(path: str, t: torch.Tensor, key: str | None) -> None:
            owner_path, _, attr = path.rpartition(".")
            owner = self.hf_model.get_submodule(owner_path) if owner_path else self.hf_model
            table = owner._parameters if attr in owner._parameters else owner._buffers
            saved.append((table, attr, table[attr]))
            if key is not None and key in by_stored:  # a tied partner: the same object
                table[attr] = by_stored[key]
                return
            value = nn.Parameter(t.to(self.device), requires_grad=False) if table is owner._parameters else t.to(self.device)
            table[attr] = value
            if key is not None:
                by_stored[key] = value

        try:
            for p, s in names.items():
                put(p, stored[s], s)
            if compact is not None:
                put(compact[0], compact[1], None)
            yield
        finally:
            for table, attr, original in reversed(saved):
                table[attr] = original

    def _embedding_paths(self) -> tuple[str, str | None]:
        """(token embedding weight path, output head weight path, or None when the head is
        the embedding)."""
        emb = self.hf_model.get_input_embeddings()
        head = self.hf_model.get_output_embeddings()
        path_of = {id(m): n for n, m in self.hf_model.named_modules()}
        emb_path = path_of[id(emb)] + ".weight"
        if head is None or head.weight is emb.weight:
            return emb_path, None
        return emb_path, path_of[id(head)] + ".weight"

    @torch.no_grad()
    def _calls(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
        """The original model's stack input and every layer's call for token ids ``ids``:
        the model's own embedding and forward, given the rows of the tokens present only."""
        from ..models import all_finite

        emb_path, head_path = self._embedding_paths()
        stored = self.stored_name(emb_path)
        vocab = self.ckpt.entry(stored).shape[0]
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise LfgraphError(f"token id {bad} is outside the vocabulary of {vocab} ids: use the model's tokenizer")
        uniq, compact_ids = torch.unique(ids, return_inverse=True)
        rows = self.ckpt.rows(stored, uniq.tolist()).to(torch.float32)
        if not all_finite(rows):
            raise LfgraphError(f"{self.name}: weight {stored} contains NaN or Inf values: the checkpoint is damaged; re-save or re-train it")
        skip = [emb_path] + ([head_path] if head_path else [])
        emb = self.hf_model.get_input_embeddings()
        padding = getattr(emb, "padding_idx", None)
        try:
            if padding is not None:
                emb.padding_idx = None  # it only masks gradients; the compact rows may be fewer than it
            with self._materialized(skip, compact=(emb_path, rows)):
                return record_calls(self.hf_model, self.stack_path,
                                    lambda: self.hf_model(input_ids=compact_ids.reshape(ids.shape).to(self.device), use_cache=False))
        finally:
            if padding is not None:
                emb.padding_idx = padding

    def stack_input(self, groups: Sequence[torch.Tensor], batch_size: int = 4) -> StackInput:
        out = StackInput()
        for g, batch in batch_groups(groups, batch_size):
            x, calls = self._calls(batch)
            out.ids.append(batch)
            out.hidden.append(x)
            out.calls.append([calls[k] for k in self.kept])
            out.group.append(g)
        return out

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """``fn(hidden, ids) -> logits`` (as :meth:`logits`) with what follows the stack read
        once (the final norm and the head in float32; the input embedding too only when the
        head is tied to it)."""
        emb_path, head_path = self._embedding_paths()
        with self._materialized([emb_path] if head_path else []):
            def run(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
                dummy = torch.zeros(hidden.shape, dtype=torch.float32, device=self.device)
                with torch.no_grad(), _swapped(self.hf_model, self.stack_path, _like(self.stack, [_Injector(hidden.to(self.device), self.output_is_tuple(ids))])):
                    return self.hf_model(inputs_embeds=dummy, use_cache=False).logits
            yield run

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with self.head() as run:
            return run(hidden, ids)

    def shares_head(self, other: BlockSource) -> bool:
        return isinstance(other, CheckpointBlocks) and other.hf_model is self.hf_model and other.ckpt is self.ckpt

    def parameter_count(self) -> int:
        """Parameters of the model this source describes (a view: its kept blocks), each
        shared tensor once, from the checkpoint's headers."""
        stack = self.stack_path + "."
        total = 0
        seen: set[str] = set()
        for name, entry in self.ckpt.tensors.items():
            if name.startswith(stack):
                index = int(name[len(stack):].split(".")[0])
                if index not in self.kept:
                    continue
            if name not in seen:
                seen.add(name)
                total += entry.numel
        return total

    def to_module(self) -> nn.Module:
        """The model this source describes (a view: its kept blocks, overrides applied) as
        a Hugging Face causal LM held in memory in float32 on the device: every tensor read.
        Its config is the checkpoint's with the depth and per-layer lists sliced to the kept
        blocks, as the written checkpoint's."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(self.config)
        if len(self.kept) != len(self.stack):
            self.architecture.slice_config(config, self.kept)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state: dict[str, torch.Tensor] = {}
        outside = self._outside()
        stored = self.ckpt.load(set(outside.values()), torch.float32)
        for p, name in outside.items():
            state[p] = stored[name]
        for new, original in enumerate(self.kept):
            for k, t in self.read_state(original).items():
                state[f"{self.stack_path}.{new}.{k}"] = t
        wanted = model.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise LfgraphError(f"internal error: no tensor for {missing[:3]} when holding {self.name} in memory")
        model.load_state_dict({k: state[k].to(self.device) for k in wanted}, strict=True, assign=True)
        model.tie_weights()
        return model.to(self.device).eval()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None
