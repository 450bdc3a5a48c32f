"""heal(): batch forms, masked objectives, what trains, recovery of a merged tiny Llama, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfgraph import pipeline
from lfgraph.calibration import mean_nll
from lfgraph.errors import LfgraphError
from lfgraph.models import CausalLMLogits, LoadedModel
from lfgraph.plan import Fusion, FusionPlan
from lfgraph.retrain import HealConfig, heal, neighbor_blocks
from lfgraph.retrain.batches import WindowBatches, as_batch
from lfgraph.retrain.heal import hidden_pairs
from lfgraph.retrain.objectives import masked_distillation_loss, masked_next_token_loss
from lfgraph.retrain.trainable import lora_targets

import tiny_models as zoo
from chain_data import V, trained_chain_llama


@pytest.fixture(scope="module")
def trained() -> dict:
    """A tiny Llama trained on the chain (the 'original'), and its 50 % merge (one-shot)."""
    got = trained_chain_llama()
    teacher, train, held = got["teacher"], got["train"], got["held"]
    lm = LoadedModel(module=teacher, example_inputs=(held[:1],), name="tiny", family="causal-lm")
    graph = pipeline.trace(lm)
    plan = pipeline.plan_model(lm, graph, 0.5, mode="merge", select="block_influence", fuse="remove",
                               calibration=train[:8], progress=False)
    student = pipeline.rewrite(lm, graph, plan, progress=False).model.eval()
    return {"teacher": teacher, "student": student, "plan": plan, "train": train, "held": held}


# --------------------------------------------------------------------------- batches


def test_batch_forms_are_read_explicitly() -> None:
    ids = torch.randint(0, 10, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    # an (ids, mask) tuple: the second element is the mask, never labels
    b = as_batch((ids, mask))
    assert b.lm and b.mask is mask and b.labels is None
    b = as_batch({"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert b.mask is mask and b.labels is ids
    assert as_batch(ids).mask is None and as_batch(ids).tokens == 10
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    c = as_batch((x, y))
    assert not c.lm and c.labels is y
    with pytest.raises(LfgraphError, match="labels in a dict"):
        as_batch((ids, mask, ids))
    with pytest.raises(LfgraphError, match="does not match"):
        as_batch((ids, mask[:, :3]))
    with pytest.raises(LfgraphError, match="cannot read a batch"):
        as_batch("text")


def test_window_batches_shard_into_the_single_process_batch() -> None:
    data = torch.arange(40).view(20, 2)
    one = WindowBatches(data, 4, seed=3).iterate()
    r0, r1 = WindowBatches(data, 4, seed=3, rank=0, world=2).iterate(), WindowBatches(data, 4, seed=3, rank=1, world=2).iterate()
    for _ in range(12):  # several epochs
        whole = next(one)
        a, b = next(r0), next(r1)
        assert sorted(torch.cat([a, b])[:, 0].tolist()) == sorted(whole[:, 0].tolist())
    # a resumed iterator replays the same batches
    fresh = WindowBatches(data, 4, seed=3).iterate()
    seq = [next(fresh) for _ in range(9)]
    assert torch.equal(next(WindowBatches(data, 4, seed=3).iterate(start=7)), seq[7])


# --------------------------------------------------------------------------- objectives


def test_padding_is_masked_in_both_losses() -> None:
    torch.manual_seed(0)
    logits, teacher = torch.randn(1, 6, 9), torch.randn(1, 6, 9)
    ids = torch.randint(0, 9, (1, 6))
    padded_logits = torch.cat([logits, torch.randn(1, 3, 9) * 50], 1)
    padded_teacher = torch.cat([teacher, torch.randn(1, 3, 9) * 50], 1)
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    torch.testing.assert_close(masked_next_token_loss(padded_logits, padded_ids, mask), F.cross_entropy(logits[0, :-1], ids[0, 1:]))
    T = 2.0
    p = F.softmax(teacher / T, -1)
    expected = (p * (p.log() - F.log_softmax(logits / T, -1))).sum(-1).mean() * T**2
    torch.testing.assert_close(masked_distillation_loss(padded_logits, padded_teacher, mask, T), expected)
    labels = ids.clone()
    labels[0, 3] = -100
    keep = torch.tensor([True, True, False, True, True])
    torch.testing.assert_close(masked_next_token_loss(logits, ids, None, labels), F.cross_entropy(logits[0, :-1][keep], ids[0, 1:][keep]))


def test_a_padded_batch_trains_like_the_unpadded_one() -> None:
    """The (ids, mask) tuple form: padding changes nothing (mask honoured end to end)."""
    teacher = CausalLMLogits(zoo.tiny_llama(layers=2, hidden=32, vocab_size=V)).eval()
    ids = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)], 1)
    a = CausalLMLogits(zoo.tiny_llama(layers=2, hidden=32, vocab_size=V, seed=1))
    b = copy.deepcopy(a)
    cfg = dict(steps=3, lr=1e-3, progress=False, warmup=0)
    ra = heal(a, teacher, [ids], HealConfig(**cfg))
    rb = heal(b, teacher, [(padded, mask)], HealConfig(**cfg))
    for (k, pa), pb in zip(ra.model.state_dict().items(), rb.model.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4, msg=k)


# --------------------------------------------------------------------------- healing


@pytest.mark.parametrize("trainable,lr", [("all", 1e-3), ("neighbors", 1e-3), ("lora", 3e-3)])
def test_healing_recovers_most_of_what_merging_half_the_blocks_lost(trained: dict, trainable: str, lr: float) -> None:
    t, s, held = trained["teacher"], trained["student"], trained["held"]
    original, one_shot = mean_nll(t, held), mean_nll(s, held)
    assert one_shot > original + 0.1  # merging 2 of 4 blocks hurts
    student = copy.deepcopy(s)
    result = heal(student, t, trained["train"], HealConfig(steps=40, lr=lr, batch_size=8, trainable=trainable, plan=trained["plan"], progress=False))
    healed = mean_nll(result.model, held)
    # "most": at least 70 % of the held-out loss that one-shot merging lost is recovered
    assert (one_shot - healed) >= 0.7 * (one_shot - original), (original, one_shot, healed)
    assert isinstance(result.model, CausalLMLogits) and not any("lora" in n for n, _ in result.model.named_modules())
    assert result.tokens == 40 * 8 * 32 and result.tokens_per_second > 0 and len(result.losses) == 40


def test_neighbors_trains_only_the_blocks_next_to_the_removed_run(trained: dict) -> None:
    plan = trained["plan"]  # removes layers 2, 3 of 0..3 (kept: 1)
    s = copy.deepcopy(trained["student"])
    names = neighbor_blocks(s, plan)
    assert names == ["model.model.layers.1"]
    before = {k: v.clone() for k, v in s.state_dict().items()}
    heal(s, trained["teacher"], trained["train"], HealConfig(steps=3, lr=1e-3, trainable="neighbors", plan=plan, progress=False))
    changed = {k for k, v in s.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.model.layers.1.") for k in changed)


def test_neighbor_blocks_of_a_run_in_the_middle() -> None:
    model = CausalLMLogits(zoo.tiny_llama(layers=3, hidden=32))  # 6 blocks before, 3 removed
    plan = FusionPlan([Fusion("model.model.layers.1", ["model.model.layers.2", "model.model.layers.3"]),
                       Fusion("model.model.layers.5", ["model.model.layers.4"])], mode="merge", fuse="remove")
    # survivors 0, 1, 5 -> new 0, 1, 2: run 2-3 has neighbours old 1 (new 1) and old 5 (new 2)
    assert neighbor_blocks(model, plan) == ["model.model.layers.1", "model.model.layers.2"]


def test_lora_is_merged_back_and_adapts_linear_layers_only(trained: dict) -> None:
    s = copy.deepcopy(trained["student"])
    emb = s.model.model.embed_tokens.weight.detach().clone()
    targets = lora_targets(s)
    assert "model.lm_head" not in targets and targets  # the head is tied to the embedding
    expected = sum(4 * (m.in_features + m.out_features) for m in map(s.get_submodule, targets))
    r = heal(s, trained["teacher"], trained["train"], HealConfig(steps=3, trainable="lora", lora_rank=4, progress=False))
    assert torch.equal(r.model.model.model.embed_tokens.weight, emb)
    assert r.model.model.lm_head.weight is r.model.model.model.embed_tokens.weight
    assert r.trainable_params == expected  # rank-4 A and B of every adapted layer, nothing else
    assert type(r.model.model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_retraining_modes_work_through_heal() -> None:
    teacher = CausalLMLogits(zoo.tiny_llama(layers=2, hidden=32, vocab_size=V)).eval()
    ids = torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(0))
    for mode in ("mean", "freeze", "mix"):
        s = copy.deepcopy(teacher)
        sets = [["model.model.layers.0.mlp.up_proj", "model.model.layers.1.mlp.up_proj"]]
        r = heal(s, teacher, ids, HealConfig(steps=3, retrain_mode=mode, fused_sets=sets, lr=1e-3, progress=False))
        assert r.model.model.model.layers[0].mlp.up_proj.weight is r.model.model.model.layers[1].mlp.up_proj.weight
        assert not any(hasattr(m, "parametrizations") for m in r.model.modules())


def test_hidden_state_pairs_match_the_teacher_at_the_end_of_each_run(trained: dict) -> None:
    pairs = hidden_pairs(trained["student"], trained["teacher"], trained["plan"])
    t_layers = list(trained["teacher"].model.model.layers)
    # survivors 0, 1 (run 2-3 removed): block 0 <-> teacher 0, block 1 <-> teacher 3
    assert [t_layers.index(t) for _, t in pairs] == [0, 3]
    r = heal(copy.deepcopy(trained["student"]), trained["teacher"], trained["train"],
             HealConfig(steps=2, hidden_weight=1.0, plan=trained["plan"], progress=False))
    assert all(torch.isfinite(torch.tensor(r.losses)))


def test_eval_keeps_the_best_state(trained: dict) -> None:
    held = trained["held"]
    evaluate = lambda m: mean_nll(m, held)  # noqa: E731
    # a far too high learning rate: the loss rises after the first evaluation
    r = heal(copy.deepcopy(trained["student"]), trained["teacher"], trained["train"],
             HealConfig(steps=12, lr=1e-3, eval_every=4, evaluate=evaluate, progress=False, warmup=0))
    values = [v for _, v, _ in r.evals]
    assert [s for s, _, _ in r.evals] == [4, 8, 12]
    best = min(range(3), key=lambda i: values[i])
    assert r.best_step == r.evals[best][0]
    assert mean_nll(r.model, held) == pytest.approx(values[best], abs=1e-6)


def test_a_best_starting_state_is_restored_without_periodic_evaluation(trained: dict) -> None:
    """eval_at_start with eval_every=0: the only evaluation is step 0, so keep_best must hand
    back the starting weights, scored with the same ``evaluate`` the steps would use."""
    start = copy.deepcopy(trained["student"])
    reference = [p.detach().clone() for p in start.parameters()]
    # distance from the starting weights: 0 at step 0, positive after any update
    evaluate = lambda m: float(sum((p.detach() - r).abs().sum() for p, r in zip(m.parameters(), reference)))  # noqa: E731
    r = heal(start, trained["teacher"], trained["train"],
             HealConfig(steps=3, lr=1e-3, eval_every=0, eval_at_start=True, evaluate=evaluate, progress=False, warmup=0))
    assert r.evals == [(0, 0.0, 0.0)] and r.best_step == 0
    assert all(torch.equal(p, q) for p, q in zip(r.model.parameters(), reference))


def test_interrupted_run_resumes_to_the_same_weights(trained: dict, tmp_path) -> None:
    """In-process interruption (an exception at step 6, after the checkpoint at 4); the
    subprocess kill -9 variant is in test_heal_cli.py."""
    t, s, train = trained["teacher"], trained["student"], trained["train"]
    cfg = dict(steps=10, lr=1e-3, batch_size=8, progress=False, checkpoint_every=4)
    full = heal(copy.deepcopy(s), t, train, HealConfig(**cfg)).model

    class Crash(Exception):
        pass

    def crash(_m: nn.Module) -> float:
        raise Crash

    with pytest.raises(Crash):
        heal(copy.deepcopy(s), t, train, HealConfig(**cfg, checkpoint_dir=str(tmp_path), eval_every=6, evaluate=crash))
    resumed = heal(copy.deepcopy(s), t, train, HealConfig(**cfg, checkpoint_dir=str(tmp_path), resume=True))
    assert resumed.resumed_from == 4
    for (k, a), b in zip(full.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(LfgraphError, match="other settings"):
        heal(copy.deepcopy(s), t, train, HealConfig(**{**cfg, "lr": 2e-3}, checkpoint_dir=str(tmp_path), resume=True))


def test_heal_user_errors(trained: dict) -> None:
    t, s = trained["teacher"], trained["student"]
    with pytest.raises(LfgraphError, match="needs data"):
        heal(copy.deepcopy(s), t, None, HealConfig(steps=1, progress=False))
    with pytest.raises(LfgraphError, match="not one of"):
        heal(copy.deepcopy(s), t, trained["train"], HealConfig(trainable="some", progress=False))
    with pytest.raises(LfgraphError, match="teacher"):
        heal(copy.deepcopy(s), None, trained["train"], HealConfig(objective="distill", progress=False))
    with pytest.raises(LfgraphError, match="checkpoint-dir"):
        heal(copy.deepcopy(s), t, trained["train"], HealConfig(resume=True, progress=False))
    with pytest.raises(LfgraphError, match=">= 1"):
        heal(copy.deepcopy(s), t, trained["train"], HealConfig(steps=1, batch_size=0, progress=False))


def test_a_cnn_heals_by_distillation_from_unlabelled_images() -> None:
    from lfgraph.passes.block_stack import remove_blocks

    torch.manual_seed(0)
    teacher = zoo.randomize_batchnorm(zoo.ResNetCNN()).eval()
    with torch.no_grad():
        teacher.fc.weight.mul_(30.0)  # confident teacher: removing a block visibly changes its outputs
    names = [n for n, m in teacher.named_modules() if type(m).__name__ == "BasicBlock"]
    student = copy.deepcopy(teacher)
    remove_blocks(student, [names[1]])
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def kd(m: nn.Module) -> float:
        with torch.no_grad():
            return float(masked_distillation_loss(m.eval()(images), teacher(images)))

    before = kd(student)
    r = heal(student, teacher, images, HealConfig(steps=15, lr=1e-3, batch_size=8, progress=False))
    assert kd(r.model) < 0.7 * before
    bn = [m for m in r.model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    bn_teacher = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert torch.equal(bn.running_mean, bn_teacher.running_mean)  # statistics kept (freeze_norm_stats)
