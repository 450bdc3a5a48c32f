"""Calibration and evaluation data: token windows for language models, samples for vision.

Calibrated fusion and the data-driven selection criteria (Block Influence, angular distance,
SLEB) need a few thousand real inputs. For language models the bundled default is Python's
own documentation (``pydoc_data.topics``, ~113k SmolLM2 tokens, always installed): its
tokens are split once, deterministically, into a **calibration pool** (the first 70%) and a
**held-out part** (the last 30%) used only to measure perplexity, so that no compressed
model is ever scored on text it was fitted on. Users can calibrate on their own text files
(:func:`load_calibration_text`) or give a token tensor directly.

For vision models calibration data is a tensor of inputs ``(N, C, H, W)`` or a
``torch.utils.data.Dataset`` whose items are inputs or ``(input, label, ...)`` tuples
(:func:`vision_samples`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import LfgraphError

#: Fraction of the bundled corpus's tokens that form the calibration pool; the rest is held out.
CALIBRATION_FRACTION = 0.7

_TOKEN_CACHE: dict[tuple[str, str, int, int], torch.Tensor] = {}


def corpus_text() -> str:
    """The bundled English corpus: every ``pydoc_data.topics`` entry, in sorted key order,
    joined by blank lines. Deterministic for a given Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """All tokens of ``text`` as a 1-D LongTensor, without special tokens; cached per tokenizer."""
    key = (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer), hash(text))
    if key not in _TOKEN_CACHE:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def corpus_split(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration_pool, heldout)``: the bundled corpus's tokens cut once at 70%.

    The two parts are disjoint slices of one token sequence, so windows drawn from one never
    share a token position with windows drawn from the other.
    """
    ids = _tokenize(tokenizer, corpus_text())
    cut = int(len(ids) * CALIBRATION_FRACTION)
    return ids[:cut], ids[cut:]


def windows_from_tokens(ids: torch.Tensor, n_windows: int, seq_len: int, what: str = "token sequence") -> torch.Tensor:
    """``n_windows`` non-overlapping windows of ``seq_len`` tokens, spread evenly over ``ids``.

    Spreading (rather than taking the first windows) samples the whole text, which for the
    alphabetically sorted pydoc topics means many different subjects. Returns a
    ``(n_windows, seq_len)`` LongTensor. Raises ``LfgraphError`` when ``ids`` is too short.
    """
    if n_windows < 1 or seq_len < 2:
        raise LfgraphError(f"need at least one window of at least 2 tokens, got {n_windows} x {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if n_windows * seq_len > len(ids):
        raise LfgraphError(
            f"the {what} has {len(ids)} tokens, fewer than the {n_windows} x {seq_len} = {n_windows * seq_len} asked for: "
            "ask for fewer or shorter windows, or give more text"
        )
    span = len(ids) - seq_len
    starts = [0] if n_windows == 1 else [math.floor(i * span / (n_windows - 1)) for i in range(n_windows)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


def calibration_windows(tokenizer: Any, n_windows: int, seq_len: int, text: str | None = None) -> torch.Tensor:
    """``(n_windows, seq_len)`` token windows to calibrate on.

    With ``text=None`` they come from the bundled corpus's calibration pool (never from its
    held-out part); with ``text`` (e.g. from :func:`load_calibration_text`) from that text.
    """
    if text is None:
        pool, _ = corpus_split(tokenizer)
        return windows_from_tokens(pool, n_windows, seq_len, "bundled calibration pool")
    return windows_from_tokens(_tokenize(tokenizer, text), n_windows, seq_len, "calibration text")


def heldout_windows(tokenizer: Any, n_windows: int, seq_len: int) -> torch.Tensor:
    """``(n_windows, seq_len)`` token windows from the bundled corpus's held-out part, for
    measuring perplexity; disjoint from every calibration window."""
    _, held = corpus_split(tokenizer)
    return windows_from_tokens(held, n_windows, seq_len, "bundled held-out part")


def load_calibration_text(path: str | Path) -> str:
    """Read a UTF-8 text file (or every ``*.txt`` file in a folder, sorted) for calibration.

    Raises ``LfgraphError`` when the path does not exist or holds no text.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise LfgraphError(f"calibration folder {p} has no *.txt files: give a text file or a folder of them")
        text = "\n\n".join(read_text_file(f) for f in files)
    elif p.is_file():
        text = read_text_file(p)
    else:
        raise LfgraphError(f"calibration text {p} does not exist: give a UTF-8 text file, or leave it out to use the bundled corpus")
    if not text.strip():
        raise LfgraphError(f"calibration text {p} is empty: give a file with some real text in it")
    return text


def read_text_file(path: Path) -> str:
    """The file's text, or ``LfgraphError`` when it is not text: bytes that are not UTF-8, or
    NUL bytes (weights, archives and other binary files have both)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LfgraphError(f"{path} is not a UTF-8 text file (byte {e.start} cannot be decoded): give a text file") from None
    if "\x00" in text:
        raise LfgraphError(f"{path} holds NUL bytes, so it is a binary file, not text: give a text file")
    return text


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str) -> torch.Tensor:
    """``ids`` unchanged, or ``LfgraphError`` when one lies outside ``[0, vocab_size)``."""
    if ids.numel() and vocab_size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise LfgraphError(f"{what} holds token id {bad}, outside the model's vocabulary of {vocab_size} ids (0..{vocab_size - 1}): "
                           "give ids made with this model's tokenizer")
    return ids


def load_token_file(path: str | Path) -> torch.Tensor:
    """Token ids from a ``.npy`` or ``.pt`` file (any shape; read as one sequence), for
    models without a tokenizer. Raises ``LfgraphError`` for a missing, unreadable or
    non-integer file."""
    p = Path(path)
    if not p.is_file():
        raise LfgraphError(f"token file {p} does not exist: give a .npy or .pt file of token ids")
    try:
        if p.suffix == ".npy":
            import numpy as np

            ids = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix == ".pt":
            ids = torch.load(p, weights_only=True)
        else:
            raise ValueError("not .npy or .pt")
    except Exception as e:
        raise LfgraphError(f"cannot read token ids from {p} ({str(e).splitlines()[0][:120]}): give a .npy or .pt file of integers") from None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.numel() == 0:
        raise LfgraphError(f"{p} holds no integer token ids: give a .npy or .pt file of integers")
    return ids.reshape(-1).long()


def vision_samples(data: torch.Tensor | torch.utils.data.Dataset, n_samples: int | None = None) -> torch.Tensor:
    """The first ``n_samples`` inputs of ``data`` stacked into one tensor ``(N, ...)``.

    ``data`` is a tensor of inputs or a ``Dataset`` whose items are an input tensor or a
    tuple/list whose first element is the input (labels are ignored). Raises
    ``LfgraphError`` when it is empty or of another type.
    """
    if isinstance(data, torch.Tensor):
        out = data if n_samples is None else data[:n_samples]
    elif isinstance(data, torch.utils.data.Dataset):
        n = len(data) if n_samples is None else min(n_samples, len(data))  # type: ignore[arg-type]
        items = [data[i] for i in range(n)]
        out = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]) if items else torch.empty(0)
    else:
        raise LfgraphError(f"calibration data must be a tensor or a torch Dataset, got {type(data).__name__}")
    if out.shape[0] == 0:
        raise LfgraphError("calibration data is empty: give at least one sample")
    return out


def batches(data: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``data`` along its first axis, ``batch_size`` at a time."""
    for i in range(0, data.shape[0], batch_size):
        yield data[i : i + batch_size]


@torch.no_grad()
def mean_nll(module: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats) of ``module`` over ``windows``.

    ``module(ids)`` must return logits ``(batch, seq, vocab)``; every position but the last
    of each window is scored. The module is not modified (it is only run).
    """
    total, count = 0.0, 0
    it = batches(windows, batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=math.ceil(windows.shape[0] / batch_size), desc="perplexity", leave=False)
    for ids in it:
        logits = module(ids)
        logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        nll = nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / count


def perplexity(module: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """``exp`` of :func:`mean_nll`: the perplexity of ``module`` on ``windows``."""
    return math.exp(mean_nll(module, windows, batch_size, progress))


@torch.no_grad()
def accuracy(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier ``module(inputs) -> scores (N, classes)``."""
    correct = 0
    for x, y in zip(batches(inputs, batch_size), batches(labels, batch_size)):
        correct += int((module(x).argmax(-1) == y).sum())
    return correct / max(1, inputs.shape[0])


# ---------------------------------------------------------------------------------------
# Activations of a block stack, captured with hooks and streamed batch by batch.
# ---------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the activations needed are captured."""


def block_output(out: Any) -> torch.Tensor:
    """The hidden state a block returns (Hugging Face layers of some versions return tuples)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "x", "input"):
        if key in kwargs:
            return kwargs[key]
    raise LfgraphError("cannot find the hidden state among a block's call arguments: pass it as the first argument")


def _kwargs_without_hidden(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in ("hidden_states", "x", "input")}


@torch.no_grad()
def capture_block_input(module: nn.Module, block: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run ``module(batch)`` only up to ``block`` and return the block's input hidden state
    and its call keyword arguments (attention mask, position embeddings, ...).

    The forward pass stops at the block (nothing above it runs), so the cost is that of the
    layers below. With the keyword arguments a caller can re-run any block of the same stack
    standalone: ``block_output(other_block(hidden, **kwargs))``.
    """
    got: dict[str, Any] = {}

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        got["hidden"] = _hidden_arg(args, kwargs)
        got["kwargs"] = _kwargs_without_hidden(kwargs)
        raise _StopForward

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        module(batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in got:
        raise LfgraphError(f"{type(block).__name__} did not run when the model ran: is it part of the model?")
    return got["hidden"], got["kwargs"]


@torch.no_grad()
def stack_hidden_states(module: nn.Module, blocks: list[nn.Module], batch: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Inputs of every block of ``blocks`` (in order) plus the last block's output:
    ``L + 1`` tensors for one batch, and the first block's call keyword arguments.

    One forward pass, with hooks; memory is that of one batch's hidden states per block,
    so callers stream over batches instead of collecting all of them.
    """
    states: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
    got: dict[str, Any] = {}
    handles = []
    for i, b in enumerate(blocks):

        def pre(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            states[i] = _hidden_arg(args, kwargs)
            if i == 0:
                got["kwargs"] = _kwargs_without_hidden(kwargs)

        handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))

    def post(_m: nn.Module, _args: tuple, out: Any) -> None:
        states[-1] = block_output(out)
        raise _StopForward  # the head is not needed

    handles.append(blocks[-1].register_forward_hook(post))
    try:
        module(batch)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if any(s is None for s in states):
        raise LfgraphError("not every block ran when the model ran: the blocks must form the model's main stack")
    return states, got.get("kwargs", {})  # type: ignore[return-value]


class _Injector(nn.Module):
    """Stands in for the bottom of a block stack: returns a stored hidden state."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden


@torch.no_grad()
def run_from(module: nn.Module, container_path: str, start_hidden: torch.Tensor, upper_blocks: list[nn.Module], batch: torch.Tensor) -> torch.Tensor:
    """The model's output when the stack at ``container_path`` is replaced by
    ``upper_blocks`` fed with ``start_hidden`` (the hidden state the first of them reads).

    The container is swapped for the duration of one forward pass and restored afterwards
    (also on error), so the module is unchanged when this returns. Lets a caller evaluate
    "the model without block j" from cached inputs, running only the blocks above j.
    """
    parent_path, _, attr = container_path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    original = getattr(parent, attr)
    stack = [_Injector(start_hidden), *upper_blocks]
    replacement = nn.ModuleList(stack) if isinstance(original, nn.ModuleList) else nn.Sequential(*stack)
    # the replacement is registered like the original (setattr on an nn.Module)
    setattr(parent, attr, replacement)
    try:
        return module(batch)
    finally:
        setattr(parent, attr, original)
