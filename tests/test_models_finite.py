"""``lfgraph.models.all_finite``: NaN and Inf found anywhere, in every float dtype."""

from __future__ import annotations

import pytest
import torch

from lfgraph.models import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_any_bad_value(dtype, bad):
    t = torch.randn(1000, 37).to(dtype)
    assert all_finite(t)
    for pos in (0, 12345, t.numel() - 1):
        u = t.clone()
        u.view(-1)[pos] = bad
        assert not all_finite(u), (dtype, bad, pos)
    assert all_finite(torch.arange(5)) and all_finite(torch.empty(0))
