"""Hidden states of a block stack for the depth methods (streamed batch by batch)."""

from __future__ import annotations

import torch
from torch import nn

from lfgraph.calibration import batches, block_output, capture_block_input


def calibration_slice(calibration: torch.Tensor, max_windows: int, max_tokens: int) -> torch.Tensor:
    """The first ``max_windows`` windows of at most ``max_tokens`` tokens (token ids), or the
    first ``max_windows`` samples (other inputs): a method's reduced budget."""
    if calibration.dim() == 2 and not calibration.is_floating_point():
        return calibration[:max_windows, :max_tokens]
    return calibration[:max_windows]


@torch.no_grad()
def stack_inputs(model: nn.Module, stack: nn.Module, calibration: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """For each batch: the first block's input and the blocks' keyword arguments (attention
    mask, position embeddings), so any list of blocks can be re-run from the bottom."""
    return [capture_block_input(model, stack[0], b) for b in batches(calibration, batch_size)]


@torch.no_grad()
def run_stack(blocks: list[nn.Module], x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``blocks`` applied in order to ``x`` (each with ``kwargs``)."""
    for b in blocks:
        x = block_output(b(x, **kwargs))
    return x


def tokens(h: torch.Tensor) -> torch.Tensor:
    """A hidden state as ``(tokens, features)`` (channels are the features of a feature map)."""
    if h.dim() == 4:
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    return h.reshape(-1, h.shape[-1])
