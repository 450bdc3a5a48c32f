"""Deploy-ready outputs for compressed causal language models.

- :func:`write_deploy_folder`: the ``-o out/`` folder (Hugging Face checkpoint, with-past
  ``model.onnx`` + ``genai_config.json``, ``plan.json``) plus generation checks;
- :func:`save_hf_checkpoint`, :func:`export_decoder_with_past`: the two halves on their own;
- :func:`verify_generation`: prefill/decode logits and greedy tokens, ORT and onnxruntime-genai
  vs PyTorch, as a :class:`GenerationReport`;
- :func:`compress_decoder_onnx`, :func:`plan_decoder_onnx`: with-past ONNX decoders made
  shallower straight from the graph (lfgraph's and onnxruntime-genai's layouts);
- :mod:`lfgraph.deploy.cli`: ``lfgraph generate``.
"""

from .checkpoint import save_hf_checkpoint
from .decoder_onnx import build_with_genai_builder, export_decoder_with_past
from .folder import DeployReport, write_deploy_folder
from .onnx_compress import compress_decoder_onnx, plan_decoder_onnx
from .onnx_decoder import is_decoder_with_past, remove_decoder_layers
from .verify import GenerationReport, verify_generation

__all__ = [
    "DeployReport", "GenerationReport", "build_with_genai_builder", "compress_decoder_onnx", "export_decoder_with_past",
    "is_decoder_with_past", "plan_decoder_onnx", "remove_decoder_layers", "save_hf_checkpoint", "verify_generation",
    "write_deploy_folder",
]
