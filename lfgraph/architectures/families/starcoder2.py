"""StarCoder2 (``model_type`` ``starcoder2``): Llama's layout with LayerNorm (with bias)
instead of RMSNorm, a GELU MLP ``c_fc`` -> ``c_proj`` (biased), biased attention projections
and tied embeddings by default. Blocks are pre-norm: ``x + attn(ln1 x)``, then
``h + mlp(ln2 h)``; the refit folds into ``mlp.c_proj``. onnxruntime-genai has no
``starcoder2`` model type: the deploy folder's genai config runs it as a plain decoder loop
over lfgraph's standard-op ONNX (``llama``, as for Phi and GPT-2)."""

from __future__ import annotations

from ..base import Architecture
from ..registry import register


@register
class Starcoder2(Architecture):
    name = "starcoder2"
    model_types = ("starcoder2",)
    mlp_out = "mlp.c_proj"
    # the rest is Llama's: stack "layers", attn_out "self_attn.o_proj", pre-norm, genai
    # "llama", the default per-layer lists (sliding_window is one number for all layers)
