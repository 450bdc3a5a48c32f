"""How far the compressed model is from the original: the report's quality check.

Different from the export check (:mod:`lfgraph.verify`: "the file computes what the
rewritten model computes"), this measures what the compression cost, against the
*uncompressed* model, on data the calibration never saw:

- causal LMs: held-out perplexity before/after, next-token top-1 agreement with the
  original, and greedy completions of a few prompts from both;
- encoders: cosine of mean-pooled embeddings to the original's;
- other PyTorch models: top-1 agreement (class scores) and relative output error;
- ONNX sources: the same agreement and error, input graph vs compressed graph, on ORT.

Each result carries one number, ``loss`` (0 = no loss), that ``--max-quality-loss`` gates:
relative perplexity increase for causal LMs, ``1 - cosine`` for encoders,
``1 - top-1 agreement`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

#: Prompts whose greedy completions the report shows for language models.
PROMPTS = ("The capital of France is", "def fibonacci(n):")


@dataclass
class QualityReport:
    """What the compression cost; ``rows`` are (name, before, after, ratio) report rows."""

    kind: str
    loss: float
    loss_name: str
    protocol: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    completions: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, original, compressed)
    skipped: str = ""

    def lines(self) -> list[str]:
        out = [f"  quality vs the original ({self.protocol}): {self.loss_name} = {self.loss:.4f}"]
        for prompt, before, after in self.completions:
            out.append(f"    {prompt!r}")
            out.append(f"      original:   {before!r}")
            out.append(f"      compressed: {after!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "loss": self.loss, "loss_name": self.loss_name, "protocol": self.protocol,
                "rows": [list(r) for r in self.rows], "completions": [list(c) for c in self.completions]}


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}x" if a else ""


@torch.no_grad()
def _logits(module: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    return [module(windows[i : i + batch_size]).float() for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def causal_lm_quality(original: nn.Module, compressed: nn.Module, windows: torch.Tensor, tokenizer: Any = None,
                      hf_original: nn.Module | None = None, hf_compressed: nn.Module | None = None,
                      new_tokens: int = 16) -> QualityReport:
    """Perplexity (next-token NLL over ``windows``), top-1 agreement, greedy completions."""
    nll_before = nll_after = 0.0
    agree = total = 0
    for start, (ref, got) in zip(range(0, windows.shape[0], 4), zip(_logits(original, windows), _logits(compressed, windows))):
        targets = windows[start : start + len(ref), 1:].reshape(-1)
        # every position but the last is scored against the next token, as perplexity() does
        nll_before += float(torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), targets, reduction="sum"))
        nll_after += float(torch.nn.functional.cross_entropy(got[:, :-1].reshape(-1, got.shape[-1]), targets, reduction="sum"))
        agree += int((ref[:, :-1].argmax(-1) == got[:, :-1].argmax(-1)).sum())
        total += targets.numel()
    ppl_before, ppl_after = float(np.exp(nll_before / total)), float(np.exp(nll_after / total))
    agreement = agree / max(total, 1)
    report = QualityReport(
        kind="causal-lm", loss=ppl_after / ppl_before - 1.0, loss_name="relative perplexity increase",
        protocol=f"{windows.shape[0]} held-out windows x {windows.shape[1]} tokens",
        rows=[("held-out perplexity", f"{ppl_before:.2f}", f"{ppl_after:.2f}", _ratio(ppl_before, ppl_after)),
              ("top-1 agreement", "1.000", f"{agreement:.3f}", "")],
    )
    if tokenizer is not None and hf_original is not None and hf_compressed is not None:
        report.completions = [(p, greedy(hf_original, tokenizer, p, new_tokens), greedy(hf_compressed, tokenizer, p, new_tokens)) for p in PROMPTS]
    return report


@torch.no_grad()
def greedy(hf_model: nn.Module, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (text only, prompt excluded)."""
    enc = tokenizer(prompt, return_tensors="pt")
    out = hf_model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def encoder_quality(original: nn.Module, compressed: nn.Module, windows: torch.Tensor) -> QualityReport:
    """Cosine between mean-pooled last hidden states of the original and the compressed encoder."""
    cos = []
    for ref, got in zip(_logits(original, windows), _logits(compressed, windows)):
        a, b = ref.mean(dim=1), got.mean(dim=1)
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
    c = float(torch.cat(cos).mean())
    return QualityReport(
        kind="encoder", loss=1.0 - c, loss_name="1 - embedding cosine",
        protocol=f"{windows.shape[0]} held-out windows x {windows.shape[1]} tokens, mean pooling",
        rows=[("embedding cosine", "1.000", f"{c:.3f}", "")],
    )


def output_quality(reference: Mapping[str, np.ndarray], compressed: Mapping[str, np.ndarray], protocol: str, kind: str) -> QualityReport:
    """Top-1 agreement (on the last axis) and relative error of every output, by name."""
    agreements, errors = [], []
    for name, want in reference.items():
        got = compressed.get(name)
        if got is None or np.shape(got) != np.shape(want):
            agreements.append(0.0)
            errors.append(float("inf"))
            continue
        want, got = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
        scale = float(np.abs(want).max()) or 1.0
        errors.append(float(np.abs(got - want).max()) / scale)
        if want.ndim >= 2 and want.shape[-1] > 1:
            agreements.append(float((want.argmax(-1) == got.argmax(-1)).mean()))
    agreement = float(np.mean(agreements)) if agreements else float("nan")
    rows = [("max output error", "", f"{max(errors, default=0.0):.2e} rel", "")]
    if agreements:
        rows.append(("top-1 agreement", "1.000", f"{agreement:.3f}", ""))
        return QualityReport(kind=kind, loss=1.0 - agreement, loss_name="1 - top-1 agreement", protocol=protocol, rows=rows)
    return QualityReport(kind=kind, loss=max(errors, default=0.0), loss_name="relative output error", protocol=protocol, rows=rows)
