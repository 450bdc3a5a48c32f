"""The first model families lfgraph compressed, one class each (see docs/architectures.md).

Each class overrides only what differs from :class:`~lfgraph.architectures.base.Architecture`
(Llama). Their tiny test models are in ``tests/architectures/tiny_families.py``. A new
family does not go here: it is a new module beside this one (the package imports every
module in its folder), with its own test file.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..base import Architecture
from ..registry import register


@register
class Llama(Architecture):
    name = "llama"
    model_types = ("llama",)


@register
class Mistral(Architecture):
    name = "mistral"
    model_types = ("mistral",)
    genai_type = "mistral"


@register
class Qwen2(Architecture):
    name = "qwen2"
    model_types = ("qwen2",)
    genai_type = "qwen2"


@register
class Qwen3(Architecture):
    name = "qwen3"
    model_types = ("qwen3",)
    genai_type = "qwen3"


@register
class Gemma(Architecture):
    name = "gemma"
    model_types = ("gemma",)
    genai_type = "gemma"


@register
class Gemma2(Architecture):
    """Norm after the MLP, before the residual add; RMSNorm scale ``1 + w``."""

    name = "gemma2"
    model_types = ("gemma2",)
    block = "post-norm"
    post_mlp_norm = "post_feedforward_layernorm"
    norm_offset = 1.0
    genai_type = "gemma2"


@register
class Gemma3Text(Gemma2):
    name = "gemma3_text"
    model_types = ("gemma3_text",)
    genai_type = "llama"


@register
class Phi3(Architecture):
    name = "phi3"
    model_types = ("phi3",)
    genai_type = "phi3"


@register
class Phi(Architecture):
    """Parallel attention and MLP on one LayerNorm, one residual add."""

    name = "phi"
    model_types = ("phi",)
    block = "parallel"
    mlp_out = "mlp.fc2"
    attn_out = "self_attn.dense"


@register
class Granite(Architecture):
    """Llama with ``residual_multiplier`` scaling each branch before the residual add."""

    name = "granite"
    model_types = ("granite",)
    genai_type = "granite"

    def residual_scale(self, cfg: Any) -> float:
        return float(getattr(cfg, "residual_multiplier", 1.0))


@register
class Olmo(Architecture):
    name = "olmo"
    model_types = ("olmo",)
    genai_type = "olmo"


@register
class Olmo2(Architecture):
    """Norm after the MLP, before the residual add; RMSNorm scale ``w``."""

    name = "olmo2"
    model_types = ("olmo2",)
    block = "post-norm"
    post_mlp_norm = "post_feedforward_layernorm"


@register
class StableLm(Architecture):
    name = "stablelm"
    model_types = ("stablelm",)

    def block_kind(self, cfg: Any) -> str:
        return "parallel" if getattr(cfg, "use_parallel_residual", False) else "pre-norm"


@register
class Cohere(Architecture):
    """Parallel attention and MLP on one LayerNorm, one residual add."""

    name = "cohere"
    model_types = ("cohere",)
    block = "parallel"


@register
class SmolLM3(Architecture):
    """Llama with some layers without RoPE (``no_rope_layers``: one flag per layer)."""

    name = "smollm3"
    model_types = ("smollm3",)
    genai_type = "smollm3"


@register
class GPT2(Architecture):
    name = "gpt2"
    model_types = ("gpt2",)
    stack = "h"
    mlp_out = "mlp.c_proj"
    attn_out = "attn.c_proj"


@register
class GPTNeoX(Architecture):
    """Parallel residual (``use_parallel_residual``, the default): ``x + attn(ln1 x) + mlp(ln2 x)``."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    mlp_out = "mlp.dense_4h_to_h"
    attn_out = "attention.dense"

    def block_kind(self, cfg: Any) -> str:
        return "parallel" if getattr(cfg, "use_parallel_residual", True) else "pre-norm"


@register
class OPT(Architecture):
    """The MLP is ``fc1``/``fc2`` on the layer itself; 350m-style configs normalise after
    the residual add (``do_layer_norm_before=False``)."""

    name = "opt"
    model_types = ("opt",)
    stack = "decoder.layers"
    mlp_out = "fc2"
    attn_out = "self_attn.out_proj"

    def block_kind(self, cfg: Any) -> str:
        return "pre-norm" if getattr(cfg, "do_layer_norm_before", True) else "post-norm-residual"


@register
class Falcon(Architecture):
    """Parallel attention and MLP (``parallel_attn`` / new decoder architecture), one add."""

    name = "falcon"
    model_types = ("falcon",)
    stack = "h"
    mlp_out = "mlp.dense_4h_to_h"
    attn_out = "self_attention.dense"
    no_onnx = "torch.export cannot trace Falcon's attention with its KV cache (transformers 5)"

    def block_kind(self, cfg: Any) -> str:
        return "parallel" if getattr(cfg, "parallel_attn", True) or getattr(cfg, "new_decoder_architecture", False) else "pre-norm"


@register
class Mixtral(Architecture):
    """Sparse MoE MLP: experts' down projections stacked in one ``(experts, hidden, inter)``
    parameter. The refit is a square map on the MoE's output, folded into every expert."""

    name = "mixtral"
    model_types = ("mixtral",)
    mlp_out = "mlp"
    experts_down = "mlp.experts.down_proj"
    #: the distilled maps train dense projections only (see lfgraph.passes.calibrated_fusion)
    default_fuse = "calibrated"
    no_stream = ("transformers merges this family's per-expert checkpoint tensors into one tensor per layer when it loads them; "
                 "lfgraph reads checkpoints block by block only where the stored tensors are the model's: compress it in memory "
                 "(leave out --stream)")
    no_onnx = "torch.onnx cannot convert the data-dependent loop over the experts"

    def mlp_target(self, block: nn.Module) -> tuple[str, str | None]:
        try:
            block.get_parameter(self.experts_down)  # type: ignore[arg-type]
        except AttributeError:
            return "mlp.down_proj", None  # a dense layer of a partly sparse model
        return self.mlp_out, self.experts_down


@register
class Qwen3Moe(Mixtral):
    """Mixtral-like MoE; layers in ``mlp_only_layers`` (or off the ``decoder_sparse_step``)
    have a dense MLP, so slicing rewrites both so the kept layers keep their kind."""

    name = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def slice_config(self, cfg: Any, kept: Sequence[int]) -> None:
        n = self.depth(cfg)
        if n != len(kept):
            step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
            dense_only = set(getattr(cfg, "mlp_only_layers", None) or [])
            sparse = [i not in dense_only and getattr(cfg, "num_experts", 0) > 0 and (i + 1) % step == 0 for i in range(n)]
            # with step 1 a layer is sparse unless listed: list the kept dense layers by new index
            cfg.decoder_sparse_step = 1
            cfg.mlp_only_layers = [new for new, old in enumerate(kept) if not sparse[old]]
        super().slice_config(cfg, kept)


@register
class Bert(Architecture):
    """Encoder (``AutoModel``): post-LayerNorm blocks, ``norm(x + f(x))``."""

    name = "bert"
    model_types = ("bert",)
    stack = "encoder.layer"
    per_layer_keys = ()
    mlp_out = "output.dense"
    attn_out = "attention.output.dense"
    block = "post-norm-residual"
    default_fuse = "remove"
    no_stream = ("bert is an encoder: lfgraph compresses causal language models block by block from a checkpoint, "
                 "encoders in memory (leave out --stream)")
