"""The streaming path against the in-memory path on the same folder: same plan; weights and
logits bit for bit with ``remove``, equal to rounding with the calibrated rules (their refit
starts from the selection pass's hidden states); float32 checkpoints, tiny random Llama- and
Qwen2-style decoders, and SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lfgraph import pipeline
from lfgraph.stream import api as stream_api
from lfgraph.stream import compress_checkpoint

from stream_helpers import save_folder

WINDOWS, SEQ = 8, 32
#: What is promised for the calibrated rules' refitted weights and logits against the
#: in-memory path's, as max abs difference over max abs value (see ``_rel``): their refit
#: starts from the selection pass's states, computed in other batches, and float32 products
#: may round differently (another CPU's kernels may block other batch shapes otherwise).
#: Measured here (tiny models and SmolLM2): still bit for bit, printed by the tests; asserted:
#: these bounds, which hold on any machine. ``remove`` copies tensors: bit for bit always.
WEIGHT_RTOL = LOGIT_RTOL = 1e-5


def _rel(got, want):
    """Max abs difference relative to the largest magnitude of ``want``."""
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def in_memory(folder, select, fuse):
    """The in-memory path's plan and rewritten Hugging Face model for the same options."""
    source, graph = pipeline.graph_of(str(folder))
    cal = pipeline.calibration_tokens(source.model, WINDOWS, SEQ)
    plan = pipeline.plan_model(source, graph, 0.25, select=select, fuse=fuse, calibration=cal, progress=False)
    return plan, pipeline.rewrite(source, graph, plan, calibration=cal, progress=False).model.model, cal


@pytest.mark.parametrize(
    "arch,sharded,select,fuse",
    [
        ("llama", False, "block_influence", "calibrated"),
        ("llama", True, "angular", "calibrated"),
        ("qwen2", True, "block_influence", "calibrated"),
        ("qwen2", False, "angular", "calibrated"),
        ("llama", True, "block_influence", "remove"),
        ("qwen2", True, "angular", "calibrated-map"),
    ],
)
def test_streamed_equals_in_memory(tmp_path, monkeypatch, arch, sharded, select, fuse):
    folder = save_folder(tmp_path / "model", arch, layers=8, sharded=sharded)
    plan, model, cal = in_memory(folder, select, fuse)
    out = tmp_path / "out"
    refits = _record_refits(monkeypatch)
    report = compress_checkpoint(folder, out, target=0.25, select=select, fuse=fuse, calibration_windows=WINDOWS,
                                 calibration_seq_len=SEQ, progress=False, onnx="none")
    assert report.plan.to_json() == plan.to_json()
    assert json.loads((out / "plan.json").read_text()) == json.loads(plan.to_json())
    streamed, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref, got = model.state_dict(), streamed.state_dict()
    assert set(ref) == set(got)
    with torch.no_grad():
        want_logits, got_logits = model(cal[:2]).logits, streamed(cal[:2]).logits
    unequal = sorted(k for k in ref if not torch.equal(ref[k], got[k]))
    print(f"{arch} {select} {fuse}: unequal tensors {unequal}, max rel: weights {max([_rel(got[k], ref[k]) for k in unequal], default=0.0):.1e}, "
          f"logits {_rel(got_logits, want_logits):.1e}")
    if fuse == "remove":  # tensors copied: bit for bit by construction
        assert not unequal
        assert torch.equal(want_logits, got_logits)
    else:  # the refit's batches differ: see WEIGHT_RTOL
        assert all(_rel(got[k], ref[k]) <= WEIGHT_RTOL for k in unequal), unequal
        assert _rel(got_logits, want_logits) <= LOGIT_RTOL
    if fuse != "remove":
        # the refit starts at the first run: it runs the runs' blocks (and any between them) only
        (runs, res), = refits
        first, last = min(r.blocks[0] for r in runs), max(r.blocks[-1] for r in runs)
        assert first > 0 and res.blocks_run == last + 1 - first
    else:
        assert not refits
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 == model.config.num_hidden_layers
    if "layer_types" in cfg:
        assert cfg["layer_types"] == model.config.layer_types
    assert (out / "model.safetensors.index.json").is_file() == sharded
    assert (out / "tokenizer.json").is_file()
    assert report.blocks == (8, 6)
    refits = [r for r in report.log.records if r.action == "refit"]
    assert len(refits) == (len(plan.fusions) if fuse != "remove" else 0)


def _record_refits(monkeypatch):
    """Record each ``refit_runs`` call's runs and result."""
    calls = []

    def recording(skeleton, runs, *args, **kwargs):
        res = refit(skeleton, runs, *args, **kwargs)
        calls.append((runs, res))
        return res

    refit = stream_api.refit_runs
    monkeypatch.setattr(stream_api, "refit_runs", recording)
    return calls


@pytest.mark.slow
def test_smollm2_streamed_equals_in_memory(tmp_path):
    """The issue's target on the real model: same plan, same weights and logits (promised to
    rel 1e-5, measured bit for bit; Block Influence + calibrated at 25%, the streaming path's default)."""
    from lfgraph.models import smollm2_folder

    folder = smollm2_folder()
    plan, model, cal = in_memory(folder, "block_influence", "calibrated")
    out = tmp_path / "out"
    report = compress_checkpoint(folder, out, target=0.25, select="block_influence", fuse="calibrated",
                                 calibration_windows=WINDOWS, calibration_seq_len=SEQ, progress=False, onnx="none")
    assert report.plan.to_json() == plan.to_json()
    streamed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        want, got = model(cal[:2]).logits, streamed(cal[:2]).logits
    ref, new = model.state_dict(), streamed.state_dict()
    print(f"SmolLM2: max rel: weights {max(_rel(new[k], ref[k]) for k in ref):.1e}, logits {_rel(got, want):.1e}")
    for k in ref:  # promised and asserted: WEIGHT_RTOL, LOGIT_RTOL; measured here: bit for bit
        assert _rel(new[k], ref[k]) <= WEIGHT_RTOL, k
    assert _rel(got, want) <= LOGIT_RTOL


def test_refit_from_the_selection_states_skips_the_blocks_below(tmp_path):
    """``refit_runs`` given the selection pass's states runs the run's blocks only; without
    them it runs the stack from block 0; the refitted tensors agree (promised to WEIGHT_RTOL;
    measured bit for bit)."""
    from lfgraph.passes.selection import Run
    from lfgraph.stream.calibrate import stack_input
    from lfgraph.stream.checkpoint import Checkpoint
    from lfgraph.stream.refit import refit_runs
    from lfgraph.stream.select import score_blocks
    from lfgraph.stream.skeleton import Skeleton

    folder = save_folder(tmp_path / "model", "qwen2", layers=6)
    skeleton = Skeleton(Checkpoint(folder))
    ids = torch.randint(0, 100, (WINDOWS, SEQ), generator=torch.Generator().manual_seed(0))
    scores = score_blocks(skeleton, stack_input(skeleton, [ids]), "angular", 2, keep_states=4)
    assert sorted(scores.states) == [0, 1, 2, 3]
    unread = score_blocks(skeleton, stack_input(skeleton, [ids]), "angular", 2, prefetch=False)  # each block read when needed
    assert (unread.angular, unread.block_influence, unread.states) == (scores.angular, scores.block_influence, {})
    runs = [Run([2, 3, 4], keep=2)]
    new = refit_runs(skeleton, runs, ids, states=scores.states)
    assert not scores.states  # handed over and freed
    old = refit_runs(skeleton, runs, ids)
    assert (new.blocks_run, old.blocks_run) == (3, 5)
    assert set(new.changed) == set(old.changed) and new.changed
    for k in new.changed:
        assert _rel(new.changed[k].float(), old.changed[k].float()) <= WEIGHT_RTOL, k
