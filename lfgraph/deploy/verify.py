"""Verification of generation: the exported decoder with its cache against PyTorch.

Checks (each a ✓/✗ line in :class:`GenerationReport`):

1. prefill logits on ORT (past length 0) vs the PyTorch model, relative error
   ``max|ort - torch| / max|torch|`` at most ``rtol``;
2. ``decode_steps`` single-token steps fed with ORT's own cache vs PyTorch's ``DynamicCache``
   steps, same measure;
3. greedy generation of ``new_tokens`` tokens on ORT (hand-fed cache) equals transformers'
   ``generate`` token for token;
4. when the folder has ``genai_config.json``: onnxruntime-genai's greedy generation equals
   transformers' token for token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..verify import CheckList
from .generation import OrtDecoder, eos_ids, genai_greedy, torch_greedy

#: Default tolerance on the relative logit error (fp32 on CPU: observed ~1e-6).
RTOL = 1e-4


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    max_abs: float = 0.0
    max_rel: float = 0.0


@dataclass
class GenerationReport(CheckList):
    """Per-check results; ``lines()`` renders them for the compress report."""

    path: Path
    checks: list[Check] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    provider: str = "ONNX Runtime (CPU) and onnxruntime-genai"

    def items(self) -> list[Check]:
        return self.checks

    def lines(self) -> list[str]:
        return [f"  {'✓' if c.ok else '✗'} {c.name}: {c.detail}" for c in self.checks]

    def __str__(self) -> str:
        head = f"generation check of {self.path}: {'✓ passed' if self.ok else '✗ FAILED'}"
        return "\n".join([head, *self.lines()])


def _errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    diff = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    return diff, diff / scale if scale > 0 else diff


def default_prompt(vocab: int, length: int = 12, seed: int = 0) -> list[int]:
    """A fixed token prompt (no tokenizer needed): deterministic ids below ``vocab``."""
    g = np.random.default_rng(seed)
    return [int(t) for t in g.integers(3, max(4, vocab), size=length)]


def verify_generation(
    hf_model: Any,
    onnx_path: str | os.PathLike,
    prompt: Sequence[int] | None = None,
    decode_steps: int = 4,
    new_tokens: int = 32,
    rtol: float = RTOL,
    genai: bool | None = None,
) -> GenerationReport:
    """Compare the with-past decoder at ``onnx_path`` (a file or its folder) with ``hf_model``.

    ``prompt`` is a list of token ids (default: 12 fixed ids). ``genai`` None runs the
    onnxruntime-genai check when ``genai_config.json`` is beside the model. Modifies
    nothing; returns a :class:`GenerationReport` (never raises on a mismatch: the report
    says ✗).
    """
    from transformers import DynamicCache

    path = Path(onnx_path)
    folder = path if path.is_dir() else path.parent
    model_file = path / "model.onnx" if path.is_dir() else path
    hf_model.eval()
    cfg = hf_model.config
    prompt = list(prompt) if prompt is not None else default_prompt(cfg.vocab_size)
    report = GenerationReport(model_file)
    dec = OrtDecoder(model_file)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    # 1 + 2: prefill and decode steps, ORT feeding its own cache, PyTorch its DynamicCache
    ids = np.asarray([prompt], np.int64)
    ort_logits, past = dec.prefill(ids, head_dim=head_dim)
    with torch.no_grad():
        cache = DynamicCache(config=cfg)
        ref = hf_model(input_ids=torch.from_numpy(ids), cache=cache, use_cache=True)
    a, r = _errors(ort_logits, ref.logits.numpy())
    report.checks.append(Check(f"prefill ({len(prompt)} tokens, past 0) logits vs PyTorch", r <= rtol,
                               f"max abs {a:.2e}, rel {r:.2e} (tolerance {rtol:.0e})", a, r))
    worst_a, worst_r = 0.0, 0.0
    mask = np.ones_like(ids)
    cache = ref.cache
    tok = int(np.argmax(ref.logits[0, -1].numpy()))
    for _ in range(decode_steps):
        step_ids = np.asarray([[tok]], np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        ort_logits, past = dec.step(step_ids, mask, past)
        with torch.no_grad():
            ref = hf_model(input_ids=torch.from_numpy(step_ids), attention_mask=torch.from_numpy(mask),
                           cache=cache, use_cache=True)
        cache = ref.cache
        a, r = _errors(ort_logits, ref.logits.numpy())
        worst_a, worst_r = max(worst_a, a), max(worst_r, r)
        tok = int(np.argmax(ref.logits[0, -1].numpy()))
    report.checks.append(Check(f"{decode_steps} decode steps with the cache vs PyTorch", worst_r <= rtol,
                               f"max abs {worst_a:.2e}, rel {worst_r:.2e} (tolerance {rtol:.0e})", worst_a, worst_r))

    # 3: greedy generation, ORT vs transformers
    want = torch_greedy(hf_model, prompt, new_tokens)
    got = dec.greedy(prompt, new_tokens, eos=eos_ids(hf_model), head_dim=head_dim)
    report.tokens.update({"torch": want, "ort": got})
    report.checks.append(_token_check(f"greedy {new_tokens} tokens on ORT == PyTorch", got, want))

    # 4: onnxruntime-genai from the folder
    if genai is None:
        genai = (folder / "genai_config.json").is_file()
    if genai:
        try:
            got_g = genai_greedy(folder, prompt, new_tokens)
        except Exception as e:  # report, do not raise: the coordinator appends this report
            report.checks.append(Check("onnxruntime-genai loads the folder and generates", False, str(e).splitlines()[0][:200]))
        else:
            report.tokens["genai"] = got_g
            # onnxruntime-genai stops at end-of-sequence without returning it; transformers returns it
            want_g = want[:-1] if want and want[-1] in eos_ids(hf_model) and len(got_g) == len(want) - 1 else want
            report.checks.append(_token_check(f"greedy {new_tokens} tokens on onnxruntime-genai == PyTorch", got_g, want_g))
    return report


def _token_check(name: str, got: list[int], want: list[int]) -> Check:
    if got == want:
        return Check(name, True, f"{len(got)} tokens identical")
    first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    return Check(name, False, f"first difference at token {first} of {len(want)} ({got[first:first + 3]} vs {want[first:first + 3]})")
