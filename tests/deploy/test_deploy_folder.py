"""The deploy folder: Hugging Face checkpoint + with-past ONNX + genai_config, verified."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lfgraph import pipeline
from lfgraph.deploy.checkpoint import save_hf_checkpoint, stored_tensor_names
from lfgraph.deploy.folder import write_deploy_folder
from lfgraph.deploy.generation import OrtDecoder, torch_greedy
from lfgraph.deploy.verify import default_prompt, verify_generation
from lfgraph.errors import LfgraphError

from deploy_helpers import PROMPT, remove_plan


@pytest.fixture(scope="module")
def deployed(gqa_loaded, tmp_path_factory):
    """Block 1 of 4 merged into block 0 by the aligned mean (the kept block's weights change)."""
    model, graph = gqa_loaded
    plan = remove_plan(graph, [1])
    plan.fuse = "mean"
    hf = pipeline.rewrite(model, graph, plan).model.model
    out = tmp_path_factory.mktemp("deploy") / "out"
    report = write_deploy_folder(hf, out, plan=plan, n_layers_before=4)
    return model, hf, out, report


def _reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)


def test_checkpoint_reloads_exactly(deployed):
    _, hf, out, _ = deployed
    loaded, info = _reload(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.num_hidden_layers == 3 and len(loaded.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == [0, 1, 2]
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits)


def test_checkpoint_stores_tied_embedding_once_and_copies_tokenizer(deployed, gqa_folder):
    from transformers import AutoTokenizer

    _, _, out, _ = deployed
    names = stored_tensor_names(out)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert (out / "generation_config.json").is_file() and (out / "plan.json").is_file()
    text = "The quick brown fox"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(gqa_folder)(text).input_ids


def test_generation_report_passes_and_is_not_vacuous(deployed):
    model, hf, out, report = deployed
    gen = report.generation
    assert gen.ok, str(gen)
    names = [c.name for c in gen.checks]
    assert any("prefill" in n for n in names) and any("decode" in n for n in names)
    assert any("onnxruntime-genai" in n for n in names), "genai_config.json was written, genai must be checked"
    assert gen.max_rel < 1e-4
    # the compressed model generates differently from the original: equality above is informative
    assert gen.tokens["torch"] != torch_greedy(model.hf_model, default_prompt(hf.config.vocab_size), 32)


def test_verification_fails_for_the_uncompressed_model(deployed):
    model, _, out, _ = deployed
    # the original has 4 layers, the ONNX file 3: the checks say ✗ (a report, not an exception)
    report = verify_generation(model.hf_model, out, new_tokens=8, genai=False)
    assert not report.ok and report.max_rel > 1e-3


def test_verification_detects_different_weights(deployed, gqa_loaded):
    model, graph = gqa_loaded
    _, _, out, _ = deployed
    other = pipeline.rewrite(model, graph, remove_plan(graph, [1])).model.model  # same depth, no averaging
    report = verify_generation(other, out, new_tokens=8, genai=False)
    assert not report.ok and "✗" in "\n".join(report.lines())


def test_onnx_layout_and_dynamic_axes(deployed):
    _, hf, out, report = deployed
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*m.graph.input, *m.graph.output]}
    assert [v.name for v in m.graph.input] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(3) for k in ("key", "value")]
    assert [v.name for v in m.graph.output] == ["logits"] + [f"present.{i}.{k}" for i in range(3) for k in ("key", "value")]
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.2.value"] == ["batch", 2, "past_sequence", 16]  # GQA: 2 kv heads of 4
    assert dims["present.0.key"] == ["batch", 2, "total_sequence", 16]
    cfg = hf.config
    big = [i for i in m.graph.initializer if sorted(i.dims) == sorted([cfg.vocab_size, cfg.hidden_size])]
    assert len(big) == 1, "the tied embedding / lm_head must be stored once"
    assert dict((p.key, p.value) for p in m.metadata_props)["lfgraph.plan"] == (out / "plan.json").read_text()


def test_padded_batch_prefill_and_decode_match_pytorch(deployed):
    from transformers import DynamicCache

    _, hf, out, _ = deployed
    dec = OrtDecoder(out / "model.onnx")
    ids = np.array([PROMPT, [0, 0, 0] + PROMPT[:7]], np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    logits, past = dec.prefill(ids, mask, head_dim=16)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(np.maximum(mask.cumsum(1) - 1, 0)),
                 cache=DynamicCache(config=hf.config), use_cache=True)
    keep = mask.astype(bool)
    assert np.abs(logits[keep] - ref.logits.numpy()[keep]).max() <= 1e-4 * np.abs(ref.logits.numpy()[keep]).max()
    step = np.array([[7], [8]], np.int64)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    logits2, _ = dec.step(step, mask2, past)
    with torch.no_grad():
        ref2 = hf(torch.from_numpy(step), attention_mask=torch.from_numpy(mask2),
                  position_ids=torch.from_numpy(mask2.cumsum(1)[:, -1:] - 1), cache=ref.cache, use_cache=True)
    assert np.abs(logits2 - ref2.logits.numpy()).max() <= 1e-4 * np.abs(ref2.logits.numpy()).max()


def test_untied_mha_model(mha_untied_folder, tmp_path):
    model = pipeline.load(str(mha_untied_folder))
    graph = pipeline.trace(model)
    hf = pipeline.rewrite(model, graph, remove_plan(graph, [2])).model.model
    report = write_deploy_folder(hf, tmp_path / "out", new_tokens=16)
    assert report.generation.ok, str(report.generation)
    assert "lm_head.weight" in stored_tensor_names(tmp_path / "out")
    loaded, info = _reload(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, hf(ids).logits)


def test_per_layer_config_lists_are_sliced(gqa_loaded, tmp_path):
    model, graph = gqa_loaded
    hf = pipeline.rewrite(model, graph, remove_plan(graph, [0, 2])).model.model
    hf.config.no_rope_layers = [10, 11, 12, 13]  # a per-layer list rewrite_torch does not know
    with pytest.raises(LfgraphError, match="no_rope_layers"):
        save_hf_checkpoint(hf, tmp_path / "a")
    save_hf_checkpoint(hf, tmp_path / "b", kept_layers=[1, 3])
    loaded, _ = _reload(tmp_path / "b")
    assert loaded.config.no_rope_layers == [11, 13]
    assert hf.config.no_rope_layers == [10, 11, 12, 13], "the model passed in is not modified"


def test_bad_outputs_are_refused(deployed, tmp_path):
    _, hf, _, _ = deployed
    with pytest.raises(LfgraphError, match="folder"):
        write_deploy_folder(hf, tmp_path / "x.onnx", verify=False)
    with pytest.raises(LfgraphError, match="does not exist"):
        write_deploy_folder(hf, tmp_path / "missing" / "out", verify=False)


@pytest.mark.slow
def test_genai_builder_engine_on_the_compressed_checkpoint(gqa_loaded, tmp_path):
    model, graph = gqa_loaded
    hf = pipeline.rewrite(model, graph, remove_plan(graph, [0])).model.model
    report = write_deploy_folder(hf, tmp_path / "out", engine="genai-builder", new_tokens=16)
    assert report.generation.ok, str(report.generation)
    assert any("onnxruntime-genai" in c.name for c in report.generation.checks)
    m = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert "position_ids" not in [i.name for i in m.graph.input]  # the builder's layout
    assert any(n.op_type == "GroupQueryAttention" for n in m.graph.node)
    with pytest.raises(LfgraphError, match="unknown engine"):
        write_deploy_folder(hf, tmp_path / "o2", engine="tensorrt", verify=False)


def test_calibrated_fusion_the_default_recipe(gqa_loaded, tmp_path):
    model, graph = gqa_loaded
    plan = remove_plan(graph, [2])
    plan.fuse = "calibrated"
    calibration = torch.randint(0, model.hf_model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    hf = pipeline.rewrite(model, graph, plan, calibration=calibration).model.model
    report = write_deploy_folder(hf, tmp_path / "out", plan=plan, n_layers_before=4, new_tokens=16)
    assert report.generation.ok, str(report.generation)
    loaded, info = _reload(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, hf(ids).logits)


def test_checkpoint_files_get_ordinary_permissions(deployed):
    import os
    import stat

    _, _, out, _ = deployed
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
