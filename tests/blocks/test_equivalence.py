"""Both sources of one folder, the model held in memory and its checkpoint read block by
block, give the same plan and the same weights, for every selection and fusion rule and
every family that streams.

Tolerance (asserted): the rewritten weights and logits agree to a relative 1e-5 (max abs
difference over max abs value). The two rewrites are one implementation on two sources;
the checkpoint's refit starts from the hidden states its selection pass kept (in that
pass's batches, regathered window by window), where the in-memory refit recomputes them
in its own batches, and float32 products may round differently with another batch
composition. Measured here: bit for bit in every case (printed)."""

from __future__ import annotations

import pytest
import torch

from lfgraph import pipeline
from lfgraph.sources import CheckpointSource, TorchSource

from blocks_helpers import save_folder
from tiny_families import FAMILIES

WINDOWS, SEQ = 8, 32
RTOL = 1e-5


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def rewrite_both(folder, select, fuse, target=0.25, objective=None, **plan_options):
    """(plans, in-memory HF model, checkpoint view's HF model, calibration) for one recipe."""
    out = []
    for source in (TorchSource(pipeline.load(str(folder))), CheckpointSource(folder, objective=objective)):
        graph = source.graph()
        cal = source.calibration(pipeline.CalibrationOptions(windows=WINDOWS, seq_len=SEQ))
        plan = pipeline.plan_model(source, graph, target, select=select, fuse=fuse, calibration=cal, progress=False, **plan_options)
        result = source.rewrite(plan, calibration=cal, progress=False)
        model = result.model.model if isinstance(source, TorchSource) else result.model.to_module()
        out.append((plan, model, cal, result.log))
    return out


def assert_same(both, label):
    (plan_a, a, cal, log_a), (plan_b, b, _, log_b) = both
    assert plan_a.to_json() == plan_b.to_json()
    assert [(r.action, r.target) for r in log_a.records] == [(r.action, r.target) for r in log_b.records]
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    unequal = sorted(k for k in sa if not torch.equal(sa[k], sb[k]))
    with torch.no_grad():
        la, lb = a(cal[:2]).logits, b(cal[:2]).logits
    print(f"{label}: unequal tensors {len(unequal)}, weights max rel {max([_rel(sb[k], sa[k]) for k in unequal], default=0.0):.1e}, "
          f"logits max rel {_rel(lb, la):.1e}")
    assert all(_rel(sb[k], sa[k]) <= RTOL for k in unequal), unequal
    assert _rel(lb, la) <= RTOL


RECIPES = [
    ("llama", False, "block_influence", "calibrated"),
    ("llama", True, "angular", "calibrated"),
    ("qwen2", True, "block_influence", "calibrated-map"),
    ("qwen2", False, "angular", "remove"),
    ("llama", True, "sleb", "remove"),
    ("qwen2", False, "similarity", "aligned-mean"),
    ("llama", False, "similarity", "mean"),
    ("qwen2", True, "angular", "calibrated-distill"),
    ("llama", False, "block_influence", "calibrated-map-distill"),
]


def test_every_registered_selection_and_fusion_rule_that_streams_is_compared():
    """A new selection or fusion rule registered for checkpoints (lfgraph/registry.py) runs
    on both sources with no other change; this keeps it from running untested on one."""
    from lfgraph.registry import CHECKPOINT, FUSION_RULE_REGISTRY, SELECTION_REGISTRY

    selections = {n for n, s in SELECTION_REGISTRY.items() if CHECKPOINT in s.source_kinds}
    rules = {n for n, r in FUSION_RULE_REGISTRY.items() if CHECKPOINT in r.source_kinds}
    assert selections == {r[2] for r in RECIPES} and rules == {r[3] for r in RECIPES}


@pytest.mark.parametrize("arch,sharded,select,fuse", RECIPES)
def test_every_recipe_gives_the_same_plan_and_weights(tmp_path, arch, sharded, select, fuse):
    folder = save_folder(tmp_path / "model", arch, layers=8, sharded=sharded)
    assert_same(rewrite_both(folder, select, fuse), f"{arch} {select} {fuse}")


def _streams(cls_name: str, kwargs: dict) -> bool:
    import transformers

    from lfgraph import architectures

    cfg = getattr(transformers, cls_name)(**kwargs)
    return architectures.for_config(cfg).stream_refusal(cfg) is None


#: every tiny family whose class does not refuse block by block, and the family added in its own file
STREAMED = {f: v for f, v in FAMILIES.items() if _streams(*v)}
STREAMED["starcoder2"] = ("Starcoder2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                                   num_key_value_heads=2, max_position_embeddings=256, sliding_window=128))


def test_the_families_that_do_not_stream_are_the_ones_their_class_refuses():
    assert sorted(set(FAMILIES) - set(STREAMED)) == ["mixtral", "qwen3_moe"]


@pytest.mark.parametrize("family", sorted(STREAMED))
def test_every_family_that_streams_gives_the_same_refit(tmp_path, family):
    """The calibrated refit on every family (pre-norm, parallel, post-norm Gemma 2/3 and
    OLMo 2, biased LayerNorm Phi, GPT-NeoX and StarCoder2, Conv1D GPT-2, sliding windows...)."""
    from tiny_families import tiny_model

    folder = tmp_path / family
    tiny_model(*STREAMED[family], folder)
    assert_same(rewrite_both(folder, "block_influence", "calibrated"), family)


@pytest.mark.slow
def test_smollm2_gives_the_same_plan_and_weights(tmp_path):
    """The real model, the default recipe's selection and refit at 25% (angular's band is 20%:
    Block Influence + the refit here)."""
    from lfgraph.models import smollm2_folder

    assert_same(rewrite_both(smollm2_folder(), "block_influence", "calibrated"), "SmolLM2 block_influence calibrated")


#: the families of issue 27's wrong-output cases (Gemma's embedding scaling, GPT-2's n_layer
#: and Conv1D) in the fast suite; the rest in the whole suite
_WRITTEN_FAST = {"gemma2", "gemma3_text", "gpt2"}


@pytest.mark.parametrize("family", [f if f in _WRITTEN_FAST else pytest.param(f, marks=pytest.mark.slow) for f in sorted(STREAMED)])
def test_the_streamed_checkpoint_folder_loads_as_the_in_memory_rewrite(tmp_path, family):
    """What `compress --stream` writes (the sliced config with the family's own name for its
    depth, the kept and refitted tensors) loads in transformers as the in-memory rewrite of
    the same plan: logits to the same relative 1e-5."""
    from transformers import AutoModelForCausalLM

    from lfgraph.cli import main
    from tiny_families import tiny_model

    folder = tmp_path / family
    tiny_model(*STREAMED[family], folder)
    (plan, in_memory, cal, _), _ = rewrite_both(folder, "block_influence", "calibrated")
    out = tmp_path / "out"
    assert main(["compress", str(folder), "--stream", "--select", "block_influence", "--fuse", "calibrated", "--target", "0.25",
                 "--calibration-windows", str(WINDOWS), "--calibration-seq-len", str(SEQ), "--eval-windows", "0", "--no-onnx",
                 "--quiet", "-o", str(out)]) == 0
    written = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    from lfgraph import architectures

    depth = len(architectures.for_config(in_memory.config).blocks(in_memory))
    assert written.config.num_hidden_layers == depth
    with torch.no_grad():
        got, want = written(cal[:2]).logits, in_memory(cal[:2]).logits
    print(f"{family}: written folder vs in-memory rewrite, logits max rel {_rel(got, want):.1e}")
    assert _rel(got, want) <= RTOL

