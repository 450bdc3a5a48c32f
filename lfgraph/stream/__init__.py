"""The streaming path: compress a safetensors checkpoint folder without ever holding the model.

Llama-style decoders (Llama, Qwen2, Qwen3, Mistral) are read one decoder block at a time:
the model's skeleton on the meta device (:mod:`.skeleton`), tensors read on demand from the
shards (:mod:`.checkpoint`), the calibration windows passed through the stack block by block
while the selection scores (:mod:`.select`) and the calibrated refit's statistics
(:mod:`.refit`) accumulate, and the output written shard by shard (:mod:`.write`) into a
staging folder moved into place when complete (:mod:`.staging`). Peak memory and time are
estimated before any weight is read (:mod:`.estimate`). Plans are the in-memory path's for
the same inputs, and so are the weights (to rounding for the calibrated refit, which starts
from the selection pass's hidden states). The output is a Hugging Face checkpoint, plus float32 ONNX from
onnxruntime-genai's builder, checked against it, when ONNX Runtime can hold the model
(:mod:`lfgraph.stream.onnx`).

    from lfgraph.stream import compress_checkpoint
    report = compress_checkpoint("llama-1b/", "llama-1b-lf/", target=0.25)
    print(report.table())
"""

from .api import STREAM_FUSION_RULES, StreamReport, compress_checkpoint
from .select import STREAM_SELECTIONS

__all__ = ["compress_checkpoint", "StreamReport", "STREAM_FUSION_RULES", "STREAM_SELECTIONS"]
