"""What does not train is computed once (lfgraph.retrain.frozen), checked against the plain
computation it replaces: cached teacher logits against a fresh teacher forward, the student
run from its first trained block against the whole student (loss and gradients), and the
cached distillation against heal on the plain models (the same training, step for step)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.models import CausalLMLogits
from lfgraph.passes.calibrated_fusion import calibrated_merge
from lfgraph.passes.map_distillation import DistillSettings
from lfgraph.retrain.frozen import FrozenPrefix, TeacherCache, first_trained_block
from lfgraph.retrain.objectives import masked_distillation_loss
from tiny_models import tiny_llama

#: float reassociation only: the cached tensors come from batches of another size
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _windows(n: int = 6, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


class _Scaled(nn.Module):
    """Logits that are not ``head(hidden)``: twice the model's (as soft-capped or scaled heads)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return 2 * self.model(ids)


@pytest.mark.parametrize("max_logit_bytes", [2**30, 0], ids=["logits", "head-input"])
def test_cached_teacher_logits_equal_a_fresh_teacher_forward(max_logit_bytes: int) -> None:
    teacher = CausalLMLogits(tiny_llama(layers=3)).eval()
    windows = _windows()
    cache = TeacherCache.build(teacher, windows, batch_size=4, max_logit_bytes=max_logit_bytes)
    assert cache is not None and cache.stores == ("logits" if max_logit_bytes else "head input")
    rows = windows[[5, 0]]  # another batch composition than the build's
    with torch.no_grad():
        fresh = teacher(rows)
    assert _rel(cache(rows), fresh) < RTOL
    with pytest.raises(LfgraphError, match="not built on"):
        cache(_windows(seed=1)[:1])


@pytest.mark.parametrize("max_logit_bytes", [2**30, 0], ids=["logits", "head-input"])
def test_a_saved_teacher_table_is_read_back_without_running_the_teacher(max_logit_bytes: int, tmp_path) -> None:
    """``saved``: the first build writes the table, the second reads it (the teacher is not
    run: its forward raises) and gives the same outputs; a table saved for other windows, or
    a damaged file, is not used."""
    teacher = CausalLMLogits(tiny_llama(layers=3)).eval()
    windows, path = _windows(), tmp_path / "t.pt"
    first = TeacherCache.build(teacher, windows, batch_size=4, max_logit_bytes=max_logit_bytes, saved=path)
    assert path.is_file()
    inner = teacher.model
    real_forward = inner.forward
    inner.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the teacher ran"))
    try:
        again = TeacherCache.build(teacher, windows, batch_size=4, max_logit_bytes=max_logit_bytes, saved=path)
    finally:
        inner.forward = real_forward
    assert again.stores == first.stores
    assert torch.equal(again(windows[[2, 4]]), first(windows[[2, 4]]))
    other = _windows(seed=3)
    fresh = TeacherCache.build(teacher, other, batch_size=4, max_logit_bytes=max_logit_bytes, saved=path)  # other windows: rebuilt
    with torch.no_grad():
        assert _rel(fresh(other[:2]), teacher(other[:2])) < RTOL
    path.write_bytes(b"damaged")
    assert TeacherCache.build(teacher, windows, batch_size=4, max_logit_bytes=max_logit_bytes, saved=path) is not None


def test_teacher_whose_logits_are_not_its_head_is_not_cached_by_head_input() -> None:
    teacher = _Scaled(CausalLMLogits(tiny_llama(layers=2)).eval())
    assert TeacherCache.build(teacher, _windows(), max_logit_bytes=0) is None
    assert TeacherCache.build(teacher, _windows()).stores == "logits"  # small: stored whole, still exact


def _student_with_trained_blocks(trained: tuple[int, ...]) -> nn.Module:
    student = CausalLMLogits(tiny_llama(layers=5, seed=3)).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    for i in trained:
        for p in student.model.model.layers[i].parameters():
            p.requires_grad_(True)
    return student


def test_first_trained_block_is_the_lowest_and_refuses_a_trained_embedding() -> None:
    student = _student_with_trained_blocks((2, 4))
    stack, first = first_trained_block(student)  # type: ignore[misc]
    assert stack is student.model.model.layers and first == 2
    student.model.model.embed_tokens.weight.requires_grad_(True)
    assert first_trained_block(student) is None


def test_run_from_the_first_trained_block_gives_the_full_loss_and_gradients() -> None:
    """Same loss and the same gradients on every trained parameter (rel tol 1e-5); the lower
    blocks do not run at all inside ``active()``; afterwards the stack is the original one
    and no hook is left behind."""
    student = _student_with_trained_blocks((2, 4))
    teacher = CausalLMLogits(tiny_llama(layers=5, seed=4)).eval()
    windows = _windows()
    stack, first = first_trained_block(student)  # type: ignore[misc]
    before = list(stack)
    prefix = FrozenPrefix.build(student, stack, first, windows, batch_size=4)
    assert prefix is not None and prefix.first == 2
    rows = windows[[3, 1]]
    with torch.no_grad():
        target = teacher(rows)
    trained = [p for p in student.parameters() if p.requires_grad]

    def loss_and_grads(model: nn.Module) -> tuple[float, list[torch.Tensor]]:
        for p in trained:
            p.grad = None
        loss = masked_distillation_loss(model(rows), target, None, 1.0)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in trained]

    full_loss, full_grads = loss_and_grads(student)
    calls = []
    hooks = [b.register_forward_hook(lambda *_: calls.append(1)) for b in before[:first]]
    with prefix.active():
        fast_loss, fast_grads = loss_and_grads(prefix)
    for h in hooks:
        h.remove()
    assert calls == []
    assert fast_loss == pytest.approx(full_loss, rel=RTOL)
    assert all(_rel(f, g) < RTOL for f, g in zip(fast_grads, full_grads))
    assert list(stack) == before
    assert all(not b._forward_pre_hooks for b in stack)
    assert all(p.grad is None for p in student.parameters() if not p.requires_grad)


def _distil(model: nn.Module, ids: torch.Tensor, cache: bool, trainable: str = "neighbors"):
    run = [f"model.model.layers.{i}" for i in (2, 3)]
    # keep_best off: the result is the last step's, so that every step's update is compared
    settings = DistillSettings(steps=20, lr=1e-3, eval_every=5, sampled_windows=4, prompt_tokens=4, trainable=trainable,
                               cache_frozen=cache, extra={"keep_best": False})
    out = calibrated_merge(model, [run], ids, refit="map", distill=settings)
    (rec,) = [r for r in out.log.records if r.action == "distill"]
    return out.model, rec.detail


def test_cached_distillation_trains_like_heal_on_the_plain_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached distillation is heal on the plain models, minus the repeated work: the
    same result and held-out KL (rel tol 1e-5); the optimizer holds only the trained
    parameters, and no frozen parameter ever gets a gradient."""
    model = CausalLMLogits(tiny_llama(layers=6)).eval()
    ids = _windows(8, 16, seed=7)
    plain, plain_rec = _distil(model, ids, cache=False)

    optimized: list[list[nn.Parameter]] = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(params, **kwargs):
        params = list(params)
        optimized.append(params)
        return real_adamw(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    fast, fast_rec = _distil(model, ids, cache=True)
    assert fast_rec["teacher_cache"] == "logits" and fast_rec["frozen_blocks"] == 2
    assert fast_rec["kl_best"] == pytest.approx(plain_rec["kl_best"], rel=RTOL) and fast_rec["best_step"] == plain_rec["best_step"]
    a, b = fast.state_dict(), plain.state_dict()
    assert all(_rel(a[k], b[k]) < RTOL for k in b if b[k].is_floating_point())
    # it trained: the comparison is not of two starting states
    start = calibrated_merge(model, [[f"model.model.layers.{i}" for i in (2, 3)]], ids, refit="map").model.state_dict()
    assert max(_rel(a[k], start[k]) for k in start) > 1e-3
    # the merged stack is 0, 1, 2 (kept, holds the map), 3 (after the cut), 4: only blocks
    # 2 and 3 and the map train, nothing else is handed to the optimizer
    (params,) = optimized
    layers = fast.model.model.layers
    frozen = {id(p) for n, p in fast.named_parameters() if not n.startswith(("model.model.layers.2.", "model.model.layers.3."))}
    assert not frozen & {id(p) for p in params}
    assert sum(p.numel() for p in params) == sum(p.numel() for i in (2, 3) for p in layers[i].parameters()) + 64 * 64
    assert all(p.grad is None for p in fast.parameters())


def test_distillation_without_a_frozen_prefix_still_caches_the_teacher() -> None:
    """``blocks``: every block trains, nothing below the first one to skip; the teacher is
    still cached and the result is heal's."""
    model = CausalLMLogits(tiny_llama(layers=6)).eval()
    ids = _windows(8, 16, seed=8)
    plain, _ = _distil(model, ids, cache=False, trainable="blocks")
    fast, rec = _distil(model, ids, cache=True, trainable="blocks")
    assert rec["frozen_blocks"] == 0 and rec["teacher_cache"] == "logits"
    a, b = fast.state_dict(), plain.state_dict()
    assert all(_rel(a[k], b[k]) < RTOL for k in b if b[k].is_floating_point())
    assert copy.deepcopy(rec)["sampled_windows"] == 4
