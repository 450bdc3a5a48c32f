"""The model's structure on the meta device, with one decoder block brought to memory at a time.

:class:`Skeleton` builds the Hugging Face ``*ForCausalLM`` from ``config.json`` with its
parameters on the meta device (``accelerate.init_empty_weights``: no weight memory; buffers
such as the rotary ``inv_freq`` are real, computed from the config as the Hugging Face
model computes them). A block's weights are read from the checkpoint in float32 and
assigned to its parameters (:meth:`Skeleton.materialize`), and given back to the meta
device when done (:meth:`Skeleton.release`).

What a decoder block is called with (attention mask, rotary position embeddings, position
ids) is taken from the model's own forward: the blocks are swapped for recorders that note
their call arguments and pass the hidden state through (:meth:`Skeleton.layer_kwargs`),
so masks and rotary embeddings are exactly those of the in-memory model, per layer (sliding
and full attention layers get their own masks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..calibration import _kwargs_without_hidden, _hidden_arg
from ..errors import LfgraphError, UnsupportedModelError
from ..models import all_finite
from .checkpoint import Checkpoint

#: Module paths of the decoder-layer stack, embeddings and final norm in the Hugging Face
#: causal LMs the streaming path reads (Llama, Qwen2, Qwen3, Mistral and their kin).
LAYERS_PATH = "model.layers"
EMBED_PATH = "model.embed_tokens"
BASE_PATH = "model"


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its call keyword arguments, returns
    its input; the last one stops the forward (the head is not needed)."""

    def __init__(self, index: int, last: bool, attention_type: Any, record: list) -> None:
        super().__init__()
        self.index, self.last, self.record = index, last, record
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.record.append(_kwargs_without_hidden(kwargs))
        if self.last:
            raise _StopForward
        return _hidden_arg(args, kwargs)


class Skeleton:
    """A causal LM from a checkpoint's config, weights on the meta device.

    Expects a Llama-style decoder (``model.embed_tokens``, ``model.layers.N``, ``model.norm``,
    ``lm_head``); raises ``UnsupportedModelError`` otherwise. ``model`` is the Hugging Face
    model (float32 parameters on meta until materialized); nothing here modifies the files.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.ckpt = ckpt
        try:
            config = AutoConfig.from_pretrained(ckpt.folder)
        except Exception as e:
            raise LfgraphError(f"cannot read the model config in {ckpt.folder}: {str(e).splitlines()[0]}") from None
        if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
            raise UnsupportedModelError(f"{ckpt.folder.name} is not a causal LM ({config.architectures}): the streaming path reads decoder checkpoints")
        self.config = config
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.tie_weights()  # tied parameters are one object, as in a loaded model
        self.model.eval()
        try:
            self.layers = self.model.get_submodule(LAYERS_PATH)
            self.base = self.model.get_submodule(BASE_PATH)
            self.model.get_submodule(EMBED_PATH)
        except AttributeError:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no {LAYERS_PATH} / {EMBED_PATH}: the streaming path supports Llama-style decoders "
                "(Llama, Qwen2, Qwen3, Mistral); use the in-memory path (without --stream)"
            ) from None
        if not isinstance(self.layers, nn.ModuleList) or len(self.layers) != ckpt.num_layers:
            raise UnsupportedModelError(f"{type(self.model).__name__}: {LAYERS_PATH} does not hold the config's {ckpt.num_layers} layers")
        self.num_layers = len(self.layers)

    # ---------------------------------------------------------------------------------
    # names

    def block_tensor_names(self, i: int) -> dict[str, str]:
        """Parameter name inside block ``i`` -> tensor name in the checkpoint (every
        parameter and persistent buffer of the block). Raises ``LfgraphError`` when the
        checkpoint lacks one."""
        prefix = f"{LAYERS_PATH}.{i}."
        names = {k: prefix + k for k in self.layers[i].state_dict()}
        for full in names.values():
            self.ckpt.entry(full)
        return names

    def stored_name(self, param_path: str) -> str:
        """The checkpoint tensor holding parameter ``param_path`` of the Hugging Face model;
        for a tied parameter absent from the file (``lm_head.weight`` with tied embeddings),
        the name under which its partner is stored."""
        if param_path in self.ckpt.tensors:
            return param_path
        params = dict(self.model.named_parameters(remove_duplicate=False))
        target = params.get(param_path)
        if target is not None:
            for name, p in params.items():
                if p is target and name in self.ckpt.tensors:
                    return name
        raise LfgraphError(f"tensor {param_path} is missing from the checkpoint in {self.ckpt.folder}: the checkpoint does not match its config.json")

    def parameter_count(self) -> int:
        """Parameters of the whole model, each shared tensor once (as ``model.parameters()``)."""
        return int(sum(p.numel() for p in self.model.parameters()))

    # ---------------------------------------------------------------------------------
    # blocks

    def read_block(self, i: int, check_finite: bool = True) -> dict[str, torch.Tensor]:
        """Decoder block ``i``'s float32 weights read from the checkpoint, by parameter name
        inside the block (what :meth:`materialize` assigns; safe to call from another thread).

        Raises ``LfgraphError`` when a weight holds NaN or Inf."""
        names = self.block_tensor_names(i)
        tensors = self.ckpt.load(names.values(), torch.float32)
        state = {k: tensors[v] for k, v in names.items()}
        if check_finite:
            for k, t in state.items():
                if not all_finite(t):
                    raise LfgraphError(f"{self.ckpt.folder.name}: weight {names[k]} contains NaN or Inf values: the checkpoint is damaged; re-save or re-train it")
        return state

    def materialize(self, i: int, check_finite: bool = True, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Decoder block ``i`` with its float32 weights read from the checkpoint (or ``state``,
        what :meth:`read_block` returned for it).

        Raises ``LfgraphError`` when a weight holds NaN or Inf. Call :meth:`release` when done.
        """
        if state is None:
            state = self.read_block(i, check_finite)
        block = self.layers[i]
        block.load_state_dict(state, strict=True, assign=True)
        return block

    def release(self, i: int) -> None:
        """Give block ``i``'s weights back (to the meta device): its memory is freed."""
        self.layers[i].to("meta")

    # ---------------------------------------------------------------------------------
    # inputs of the stack

    @torch.no_grad()
    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 input embeddings ``(N, seq, hidden)`` of token ids ``(N, seq)``.

        Reads only the embedding rows of the tokens present (the stored rows converted to
        float32 are what a float32 model's embedding lookup returns); raises
        ``LfgraphError`` for an id outside the vocabulary or a row holding NaN or Inf."""
        name = self.stored_name(f"{EMBED_PATH}.weight")
        vocab = self.ckpt.entry(name).shape[0]
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise LfgraphError(f"calibration token id {int(ids.max())} is outside the vocabulary of {vocab}: use the model's tokenizer")
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = self.ckpt.rows(name, uniq.tolist()).to(torch.float32)
        if not all_finite(rows):
            raise LfgraphError(f"{self.ckpt.folder.name}: weight {name} contains NaN or Inf values: the checkpoint is damaged; re-save or re-train it")
        return rows[inverse]

    @torch.no_grad()
    def layer_kwargs(self, inputs_embeds: torch.Tensor) -> list[dict[str, Any]]:
        """The keyword arguments each decoder layer receives when the model runs on
        ``inputs_embeds`` ``(batch, seq, hidden)``: one dict per layer, in order.

        Runs the model's own forward (mask creation, rotary embeddings) with the layers
        swapped for recorders; the skeleton is unchanged when this returns."""
        record: list[dict[str, Any]] = []
        n = self.num_layers
        recorders = nn.ModuleList(
            _Recorder(i, i == n - 1, getattr(self.layers[i], "attention_type", None), record) for i in range(n)
        )
        parent = self.model.get_submodule(LAYERS_PATH.rpartition(".")[0])
        original = parent.layers
        parent.layers = recorders
        try:
            self.base(inputs_embeds=inputs_embeds, use_cache=False)
        except _StopForward:
            pass
        finally:
            parent.layers = original
        if len(record) != n:
            raise UnsupportedModelError(f"{type(self.model).__name__}'s forward called {len(record)} of its {n} layers: cannot stream it")
        return record
