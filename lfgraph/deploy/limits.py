"""What ONNX Runtime cannot run, known from the config before the heavy work.

onnxruntime-genai's model builder (the streaming path's ONNX, and the in-memory path's
``engine="genai-builder"``) writes attention as the ``com.microsoft.GroupQueryAttention``
contrib op. ONNX Runtime's CPU provider runs it only for head sizes that are multiples of
16, and says so only when the model runs (``head_size shall be a multiple of 16``): after
the builder has written the file. Measured with onnxruntime 1.32.0 and onnxruntime-genai
0.18.0 on one-layer Llama checkpoints: head sizes 4, 6, 8, 10, 12, 20, 24, 260 and 264
refused, 16, 48, 80, 256, 512 and 1024 run and match PyTorch (max rel <= 1e-6).
lfgraph's own exporter (:func:`lfgraph.deploy.export_decoder_with_past`, standard ONNX ops,
``engine="export"``) runs them all (6, 12, 24 measured). Odd head sizes never reach either:
transformers refuses a rotary config whose head size is odd.
"""

from __future__ import annotations

from typing import Any

#: Head sizes ONNX Runtime's ``GroupQueryAttention`` runs on the CPU provider are multiples of this.
GQA_HEAD_SIZE_MULTIPLE = 16
#: The engines that write ``GroupQueryAttention``.
GQA_ENGINES = ("genai-builder",)


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def head_size(config: Any) -> int | None:
    """The attention head size of ``config`` (a ``config.json`` dict or a transformers
    config): ``head_dim``, else ``hidden_size // num_attention_heads``; ``None`` when unknown."""
    explicit = _get(config, "head_dim")
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def onnx_refusal(config: Any, engine: str) -> str | None:
    """Why ONNX Runtime could not run the ONNX file ``engine`` (``"genai-builder"`` or
    ``"export"``) would write for a model with ``config``, naming what avoids it; ``None``
    when nothing known stands in the way."""
    size = head_size(config)
    if engine in GQA_ENGINES and size is not None and size % GQA_HEAD_SIZE_MULTIPLE:
        return (f"the model's attention head size is {size}, and ONNX Runtime's GroupQueryAttention, which onnxruntime-genai's "
                f"builder writes, runs only head sizes that are multiples of {GQA_HEAD_SIZE_MULTIPLE}: write the checkpoint "
                "alone (--no-onnx, onnx='none'), or export with lfgraph's own exporter (the in-memory path, engine='export')")
    return None
