"""The allocator policy of training loops (lfgraph.allocator): inside ``keep_freed_memory`` a
training loop reuses the memory its steps free instead of mapping and faulting it in again
(far fewer page faults); after it, that memory goes back to the system."""

from __future__ import annotations

import resource

import pytest
import torch
from torch import nn

from lfgraph.allocator import _libc, keep_freed_memory

pytestmark = pytest.mark.skipif(_libc() is None, reason="glibc only")


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_a_training_loop_reuses_its_memory_inside_and_returns_it_after():
    torch.manual_seed(0)
    vocab = 8192
    model = nn.Sequential(nn.Embedding(vocab, 128), nn.Linear(128, 256), nn.GELU(), nn.Linear(256, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (4, 256))  # 32 MB of logits: above any mmap threshold glibc adapts to

    def steps(n: int = 8) -> int:
        """Page faults of ``n`` training steps (logits, their gradients, AdamW)."""
        before = _page_faults()
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(x).view(-1, vocab), x.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return _page_faults() - before

    steps(2)  # optimizer state and first-touch pages
    outside = steps()
    base = _rss()
    with keep_freed_memory():
        inside = steps()
    after = _rss()
    # measured: 370-760 thousand faults outside, 109-119 thousand inside
    assert 2 * inside < outside, (inside, outside)  # measured here: 295 thousand outside, 54 thousand inside
    assert after - base <= 32 << 20, (base, after)  # what the loop kept was handed back


def test_nested_blocks_leave_the_policy_to_the_outermost():
    from lfgraph import allocator

    with keep_freed_memory():
        with keep_freed_memory():
            assert allocator._depth == 1
        assert allocator._depth == 1  # the inner block's end did not restore glibc's defaults
    assert allocator._depth == 0
