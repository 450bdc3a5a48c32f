"""What differs per model type, in one small interface (as Optimum's ``OnnxConfig`` holds
it): export inputs and named dynamic axes, verification inputs, the timing input, the
export tolerance, and the calibration data a selection or refit reads.

The pipeline never branches on a model family; it asks the model's :class:`ModelType`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .errors import LfgraphError
from .evaluate import QualityReport, encoder_quality, output_quality
from .models import LoadedModel

#: Two sentences of different length: verification sees real text, padding and a batch.
VERIFICATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Layer fusion merges similar layers of a trained network into one, so the model gets shallower and faster.",
)


@dataclass
class CalibrationOptions:
    """Where calibration data comes from (CLI ``--calibration-*``)."""

    text_file: str | None = None
    token_file: str | None = None
    windows: int = 16
    seq_len: int = 256


class ModelType:
    """Base: a model that takes tensors and returns tensors (vision, generic)."""

    #: relative tolerance of the export check (ONNX vs PyTorch)
    rtol = 1e-4

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    @property
    def input_names(self) -> list[str]:
        return list(self.model.input_names)[: len(self.model.example_inputs)]

    @property
    def output_names(self) -> list[str]:
        return list(self.model.output_names)

    def export_args(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.example_inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {n: {0: "batch"} for n in self.input_names}

    def verification_inputs(self) -> dict[str, torch.Tensor]:
        """Real inputs of another shape than the export example (a new batch size)."""
        x = self.model.example_inputs[0]
        g = torch.Generator().manual_seed(0)
        return {self.input_names[0]: torch.randn((3, *x.shape[1:]), generator=g, dtype=x.dtype)}

    def latency_feed(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.verification_inputs().items()}

    def has_calibration(self, options: CalibrationOptions) -> bool:
        return self.model.calibration is not None

    def quality(self, compressed: torch.nn.Module, feed: Mapping[str, np.ndarray], eval_windows: int, eval_seq_len: int) -> QualityReport:
        """Top-1 agreement and output error against the original, on the calibration
        samples when there are some (up to 256), else on the verification inputs."""
        from .verify import torch_outputs

        samples = self.model.calibration if isinstance(self.model.calibration, torch.Tensor) else None
        if samples is not None:
            data, names = {self.input_names[0]: samples[:256]}, self.input_names[:1]
        else:
            data, names = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}, list(feed)
        reference = torch_outputs(self.model.module, data, names, self.output_names)
        got = torch_outputs(compressed, data, names, self.output_names)
        what = "calibration samples" if samples is not None else "verification inputs"
        return output_quality(reference, got, f"{next(iter(data.values())).shape[0]} {what}, PyTorch", self.model.family)

    def calibration(self, options: CalibrationOptions) -> Any:
        if self.model.calibration is None:
            raise LfgraphError(f"{self.model.name} needs calibration inputs for this selection/fusion rule: pass them in the Python API (wrap_module(..., calibration=samples))")
        return self.model.calibration


class TextModelType(ModelType):
    """Causal LMs and encoders: ``(input_ids, attention_mask)``, batch and sequence axes."""

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"]

    def export_args(self) -> tuple[torch.Tensor, ...]:
        ids = self.model.example_inputs[0]
        return ids, torch.ones_like(ids)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {n: {0: "batch", 1: "sequence"} for n in self.input_names}

    def verification_inputs(self) -> dict[str, torch.Tensor]:
        """Two sequences of different length, the shorter one padded."""
        tok = self.model.tokenizer
        if tok is None:  # ids below the vocabulary; the second row padded by the mask
            ids = (torch.arange(2 * 24).reshape(2, 24) * 11 + 5) % max(self.model.vocab_size, 2)
            mask = torch.ones_like(ids)
            mask[1, 16:] = 0
            return {"input_ids": ids, "attention_mask": mask}
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(list(VERIFICATION_TEXTS), return_tensors="pt", padding=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def quality(self, compressed: torch.nn.Module, feed: Mapping[str, np.ndarray], eval_windows: int, eval_seq_len: int) -> QualityReport | None:
        """Held-out perplexity, top-1 agreement and completions (causal LMs) or embedding
        cosine (encoders) against the original; ``None`` when ``eval_windows`` is 0."""
        if eval_windows <= 0:
            return None
        model = self.model
        if model.tokenizer is None:
            return QualityReport(kind=model.family, loss=float("nan"), loss_name="not measured",
                                 protocol="no tokenizer", skipped="the model folder has no tokenizer files, and held-out text needs one")
        from .calibration import heldout_windows

        # a window never longer than the model takes (BERT-style position tables are fixed)
        limit = int(getattr(model.hf_model.config, "max_position_embeddings", 0) or eval_seq_len)
        windows = heldout_windows(model.tokenizer, eval_windows, min(eval_seq_len, limit))
        if model.family == "encoder":
            return encoder_quality(model.module, compressed, windows)
        from .architectures import of_model
        from .blocks import HeldBlocks
        from .evaluate import PROMPTS, blockwise_lm_quality, greedy

        stack = of_model(model.module).stack_path(model.module)  # type: ignore[union-attr]
        report, _ = blockwise_lm_quality(HeldBlocks(model.module, stack), HeldBlocks(compressed, stack), windows)
        hf_compressed = getattr(compressed, "model", None)
        if hf_compressed is not None and model.hf_model is not None:
            report.completions = [(p, greedy(model.hf_model, model.tokenizer, p, 16), greedy(hf_compressed, model.tokenizer, p, 16)) for p in PROMPTS]
        return report

    def latency_feed(self) -> dict[str, np.ndarray]:
        """One sequence of 128 tokens."""
        vocab = min(self.model.vocab_size or 1000, 1000)
        ids = np.arange(128, dtype=np.int64)[None, :] % vocab
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def has_calibration(self, options: CalibrationOptions) -> bool:
        return self.model.tokenizer is not None or options.token_file is not None

    def calibration(self, options: CalibrationOptions) -> torch.Tensor:
        """Calibration windows ``(n, seq_len)``: token ids from a file, the user's text, or a
        part of the bundled corpus kept apart from evaluation."""
        from .calibration import calibration_windows, check_token_ids, load_calibration_text, load_token_file, windows_from_tokens

        if options.token_file:
            ids = check_token_ids(load_token_file(options.token_file), self.model.vocab_size, options.token_file)
            return windows_from_tokens(ids, options.windows, options.seq_len, what=options.token_file)
        tok = self.model.require_tokenizer("calibration")
        text = load_calibration_text(options.text_file) if options.text_file else None
        return calibration_windows(tok, options.windows, options.seq_len, text=text)


def model_type(model: LoadedModel) -> ModelType:
    """The :class:`ModelType` for a loaded model (by its family)."""
    return TextModelType(model) if model.family in ("causal-lm", "encoder") else ModelType(model)
