"""The allocator policy of training loops (lfgraph.allocator): inside ``keep_freed_memory`` a
tensor freed and allocated again reuses its pages (no new page faults); after it, the
memory goes back to the system."""

from __future__ import annotations

import resource

import pytest
import torch

from lfgraph.allocator import _libc, keep_freed_memory

pytestmark = pytest.mark.skipif(_libc() is None, reason="glibc only")

MB = 1 << 20


def _page_faults(steps: int = 10, size: int = 64 * MB) -> int:
    """Minor page faults of allocating, filling and freeing ``size`` bytes ``steps`` times
    (what a training step does with its logits and gradients)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t = torch.ones(size // 4)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_freed_memory_is_reused_inside_and_returned_after():
    pages = 64 * MB // resource.getpagesize()
    outside = _page_faults()
    assert outside >= 5 * pages  # glibc maps every 64 MB block afresh: each step faults it in
    base = _rss()
    with keep_freed_memory():
        inside = _page_faults()
        held = _rss()
    after = _rss()
    assert inside <= 2 * pages, (inside, outside)  # the first block faults, the others reuse it
    assert held - base >= 32 * MB  # kept while the loop runs...
    assert after - base <= 16 * MB, (base, held, after)  # ...and given back when it ends
