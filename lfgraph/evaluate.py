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
def final_states(source: Any, windows: torch.Tensor, batch_size: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """(final hidden state per batch, the batches' token ids, seconds): ``windows`` through
    ``source``'s stack block by block (a :class:`~lfgraph.blocks.BlockSource`)."""
    import time

    t0 = time.perf_counter()
    inputs = source.stack_input([windows], batch_size)
    xs = list(inputs.hidden)
    for i, block in source.blocks():
        xs = [calls[i](block, x) for x, calls in zip(xs, inputs.calls)]
    return xs, inputs.ids, time.perf_counter() - t0


#: Positions whose log-probabilities the quality measure holds at once.
KL_CHUNK = 64


@torch.no_grad()
def blockwise_lm_quality(original: Any, compressed: Any, windows: torch.Tensor, batch_size: int = 4) -> tuple[QualityReport, tuple[float, float]]:
    """Held-out perplexity of both models, next-token top-1 agreement and the mean KL
    divergence of the compressed model's next-token distribution from the original's
    (nats per token), on ``windows`` ``(n, seq)``; both models are block sources, run block
    by block, and what follows their stacks (final norm, head) runs one window at a time.
    Returns the report and each model's seconds for the pass over its blocks."""
    import contextlib

    states_o, ids, t_o = final_states(original, windows, batch_size)
    states_c, _, t_c = final_states(compressed, windows, batch_size)
    nll_before = nll_after = kl = 0.0
    agree = total = 0
    # one head when both run the same tensors after the stack (a checkpoint and its view):
    # the head of a large vocabulary is GBs in float32
    shared = original.shares_head(compressed)
    with original.head() as head_o, (contextlib.nullcontext(head_o) if shared else compressed.head()) as head_c:
        for xo, xc, batch in zip(states_o, states_c, ids):
            for r in range(batch.shape[0]):
                w = batch[r : r + 1]
                ref, got = head_o(xo[r : r + 1], w).float()[0, :-1], head_c(xc[r : r + 1], w).float()[0, :-1]
                targets = w[0, 1:].to(ref.device)
                # positions in chunks: the log-probabilities of a window are vocabulary x tokens
                for c in range(0, targets.numel(), KL_CHUNK):
                    lp, lq = torch.log_softmax(ref[c : c + KL_CHUNK], -1), torch.log_softmax(got[c : c + KL_CHUNK], -1)
                    t = targets[c : c + KL_CHUNK, None]
                    nll_before -= float(lp.gather(1, t).sum())
                    nll_after -= float(lq.gather(1, t).sum())
                    kl += float((lp.exp() * (lp - lq)).sum())
                    agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
                total += targets.numel()
                del ref, got
    ppl_before, ppl_after = float(np.exp(nll_before / total)), float(np.exp(nll_after / total))
    report = QualityReport(
        kind="causal-lm", loss=ppl_after / ppl_before - 1.0, loss_name="relative perplexity increase",
        protocol=f"{windows.shape[0]} held-out windows x {windows.shape[1]} tokens",
        rows=[("held-out perplexity", f"{ppl_before:.2f}", f"{ppl_after:.2f}", _ratio(ppl_before, ppl_after)),
              ("top-1 agreement", "1.000", f"{agree / max(total, 1):.3f}", ""),
              ("KL to the original (nats/token)", "0", f"{kl / max(total, 1):.4f}", "")],
    )
    return report, (t_o, t_c)


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
