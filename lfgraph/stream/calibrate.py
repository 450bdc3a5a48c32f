"""Calibration windows and the hidden states entering the block stack, for the streaming path.

The windows are the in-memory path's (``lfgraph.model_types.TextModelType.calibration``):
the same functions of :mod:`lfgraph.calibration` on the same tokenizer (the folder's), the
same text or token file, the same count and length. The hidden states are kept as a list
of float32 batches (``batch_size`` windows each), the batching the in-memory passes use,
so that every block call sees the same tensors and the statistics add up in the same order.
:func:`regroup` gathers hidden states computed in one batching (the selection pass's) into
another (the refit's fitting and held-out groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..calibration import calibration_windows, load_calibration_text, load_token_file, windows_from_tokens
from ..errors import LfgraphError
from .skeleton import Skeleton


def calibration_ids(folder: Path, windows: int, seq_len: int, text_file: str | None = None, token_file: str | None = None) -> torch.Tensor:
    """``(windows, seq_len)`` token ids, exactly the windows the in-memory path calibrates on
    for the same options. Raises ``LfgraphError`` when there is no tokenizer and no token file."""
    from ..models import _tokenizer_or_none

    if windows < 1 or seq_len < 2:
        raise LfgraphError(f"need at least one calibration window of at least 2 tokens, got {windows} x {seq_len}")
    if token_file:
        return windows_from_tokens(load_token_file(token_file), windows, seq_len, what=token_file)
    tok = _tokenizer_or_none(folder)
    if tok is None:
        raise LfgraphError(
            f"{folder.name} has no tokenizer files, and calibration needs text: add the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) to the model folder, or pass token ids with --calibration-tokens FILE.npy"
        )
    text = load_calibration_text(text_file) if text_file else None
    return calibration_windows(tok, windows, seq_len, text=text)


@dataclass
class StackInput:
    """The hidden states entering block 0 and each layer's call arguments, per batch.

    ``hidden[b]`` is float32 ``(batch, seq, hidden)``; ``kwargs[b][i]`` is what layer ``i``
    is called with for batch ``b``; ``ids[b]`` the batch's token ids; ``group[b]`` the index
    of the group of windows it was cut from."""

    ids: list[torch.Tensor]
    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]
    group: list[int]

    @property
    def tokens(self) -> int:
        return sum(int(i.numel()) for i in self.ids)


@torch.no_grad()
def stack_input(skeleton: Skeleton, groups: Sequence[torch.Tensor], batch_size: int = 4) -> StackInput:
    """The stack's input for each group of windows ``(n, seq)`` of ``groups``, each cut into
    consecutive batches of ``batch_size`` windows (as :func:`lfgraph.calibration.batches`
    cuts them), groups in order. The embedding matrix is read once."""
    ids = torch.cat(list(groups))
    starts = [0]
    for g in groups:
        starts.append(starts[-1] + int(g.shape[0]))
    index = [torch.arange(a, b) for a, b in zip(starts, starts[1:])]
    return regroup(skeleton, ids, index, [skeleton.embeddings(ids)], batch_size)


@torch.no_grad()
def regroup(skeleton: Skeleton, ids: torch.Tensor, groups: Sequence[torch.Tensor], states: Sequence[torch.Tensor],
            batch_size: int = 4) -> StackInput:
    """The stack's input for the windows ``ids[g]`` of each group ``g`` of window indices of
    ``groups``, each group cut into consecutive batches of ``batch_size`` windows (as
    :func:`lfgraph.calibration.batches` cuts them), groups in order, holding the rows of
    ``states``: hidden states of every window of ``ids`` in order, in consecutive batches
    (the embeddings, for :func:`stack_input`; the state the selection pass holds entering a
    block, for the refit). Each window's rows are copied into its new batch; ``states`` is
    not modified."""
    where = [(b, r) for b, s in enumerate(states) for r in range(s.shape[0])]  # window -> (batch, row)
    if len(where) != ids.shape[0]:
        raise ValueError(f"{len(where)} hidden states for {ids.shape[0]} windows")
    out = StackInput([], [], [], [])
    for g, index in enumerate(groups):
        index = [int(k) for k in index]
        for start in range(0, len(index), batch_size):
            windows = index[start : start + batch_size]
            x = torch.stack([states[where[k][0]][where[k][1]] for k in windows])
            out.ids.append(ids[windows])
            out.hidden.append(x)
            out.kwargs.append(skeleton.layer_kwargs(x))
            out.group.append(g)
    return out
