"""Running a with-past ONNX decoder: a greedy loop on ONNX Runtime and on onnxruntime-genai.

:class:`OrtDecoder` feeds the cache by hand (prefill, then one token at a time) through a
plain ``onnxruntime.InferenceSession``; it reads the cache names and shapes from the graph,
so it runs both the layout lfgraph writes and onnxruntime-genai's (no ``position_ids``).
:func:`genai_greedy` asks onnxruntime-genai itself to generate from a folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import LfgraphError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class OrtDecoder:
    """A with-past decoder in an ONNX Runtime session (CPU unless ``providers`` says otherwise)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:
            raise LfgraphError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted((n for n in self.inputs if _PAST.match(n)), key=lambda n: (int(_PAST.match(n).group(1)), n))
        if not self.past or "input_ids" not in self.inputs:
            raise LfgraphError(f"{path} has no KV-cache inputs past_key_values.N.key/value (found {sorted(self.inputs)[:6]})")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.has_positions = "position_ids" in self.inputs
        shape = self.inputs[self.past[0]].shape
        self.kv_heads, self.head_dim = int(shape[1]), _static_or(shape[3], None)

    def _empty_past(self, batch: int, head_dim: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, head_dim), np.float32) for n in self.past}

    def step(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: ``ids`` (batch, sequence) after ``past``; ``mask`` covers past + sequence.
        Returns the logits and the new cache (named as the next call's inputs)."""
        feed: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **past}
        if self.has_positions:
            # positions count real tokens only (left padding gets position 0, as in transformers)
            pos = np.cumsum(mask, axis=1) - 1
            feed["position_ids"] = np.maximum(pos, 0)[:, -ids.shape[1]:].astype(np.int64)
        outs = dict(zip(self.outputs, self.session.run(None, feed)))
        new_past = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past}
        return outs["logits"], new_past

    def prefill(self, ids: np.ndarray, mask: np.ndarray | None = None, head_dim: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        mask = np.ones_like(ids) if mask is None else mask
        hd = head_dim or self.head_dim
        if hd is None:
            raise LfgraphError("the cache's head size is symbolic in this graph: pass head_dim")
        return self.step(ids, mask, self._empty_past(ids.shape[0], hd))

    def greedy(self, prompt: Sequence[int], new_tokens: int, eos: Sequence[int] = (), head_dim: int | None = None) -> list[int]:
        """Greedy decoding of ``new_tokens`` after ``prompt`` (batch 1); stops after an ``eos`` token."""
        ids = np.asarray([list(prompt)], np.int64)
        logits, past = self.prefill(ids, head_dim=head_dim)
        mask = np.ones_like(ids)
        out: list[int] = []
        for _ in range(new_tokens):
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            if tok in eos:
                break
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            logits, past = self.step(np.asarray([[tok]], np.int64), mask, past)
        return out


def _static_or(dim: Any, default: Any) -> Any:
    return int(dim) if isinstance(dim, int) else default


def genai_greedy(folder: str | os.PathLike, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy generation by onnxruntime-genai from ``folder`` (``genai_config.json`` + model);
    returns the new tokens (it stops at the configured end-of-sequence tokens)."""
    import onnxruntime_genai as og

    try:
        model = og.Model(str(folder))
    except Exception as e:
        raise LfgraphError(f"onnxruntime-genai cannot load {folder}: {str(e).splitlines()[0][:300]}") from None
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False, top_k=1, min_length=0)
    gen = og.Generator(model, params)
    gen.append_tokens([list(int(t) for t in prompt)])
    while not gen.is_done():
        gen.generate_next_token()
    seq = [int(t) for t in gen.get_sequence(0)]
    return seq[len(prompt):]


def torch_greedy(hf_model: Any, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy generation by transformers' ``generate`` (with its KV cache); the new tokens."""
    import torch

    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                num_beams=1, top_k=None, top_p=None, temperature=None, pad_token_id=_pad(hf_model))
    return [int(t) for t in out[0, len(prompt):]]


def eos_ids(hf_model: Any) -> list[int]:
    gc = getattr(hf_model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = hf_model.config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad(hf_model: Any) -> int | None:
    pad = getattr(hf_model.config, "pad_token_id", None)
    if pad is None:
        eos = eos_ids(hf_model)
        pad = eos[0] if eos else 0
    return pad


def folder_of(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def timed_generation(dec: OrtDecoder, prompt: Sequence[int], new_tokens: int, head_dim: int | None = None) -> tuple[float, float, list[int]]:
    """(prefill seconds, seconds for ``new_tokens`` decode steps, tokens): greedy, batch 1,
    no early stop (so every model does the same number of steps)."""
    import time

    ids = np.asarray([list(prompt)], np.int64)
    t0 = time.perf_counter()
    logits, past = dec.prefill(ids, head_dim=head_dim)
    t1 = time.perf_counter()
    mask = np.ones_like(ids)
    out: list[int] = []
    for _ in range(new_tokens):
        tok = int(np.argmax(logits[0, -1]))
        out.append(tok)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, past = dec.step(np.asarray([[tok]], np.int64), mask, past)
    return t1 - t0, time.perf_counter() - t1, out


def alternating_decode_speed(
    paths: Sequence[str | os.PathLike], prompt: Sequence[int], new_tokens: int = 64, rounds: int = 3,
    head_dim: int | None = None, threads: int | None = None,
) -> list[tuple[float, float]]:
    """(median prefill ms, median decode tokens/s) of each with-past decoder, run alternately
    round by round so machine noise hits every model alike."""
    decs = [OrtDecoder(p, threads=threads) for p in paths]
    for d in decs:  # warm-up
        timed_generation(d, list(prompt)[:8], 2, head_dim)
    pre: list[list[float]] = [[] for _ in decs]
    dec_s: list[list[float]] = [[] for _ in decs]
    for _ in range(rounds):
        for k, d in enumerate(decs):
            p, t, _ = timed_generation(d, prompt, new_tokens, head_dim)
            pre[k].append(p)
            dec_s[k].append(t)
    return [(float(np.median(p)) * 1e3, new_tokens / float(np.median(t))) for p, t in zip(pre, dec_s)]
