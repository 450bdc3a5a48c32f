"""Decoders compressed straight from ONNX: whole layers and their cache removed, renumbered."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from lfgraph import pipeline
from lfgraph.deploy.decoder_onnx import build_with_genai_builder, export_decoder_with_past
from lfgraph.deploy.generation import OrtDecoder, genai_greedy, torch_greedy
from lfgraph.deploy.onnx_compress import compress_decoder_onnx
from lfgraph.deploy.onnx_decoder import cache_layout, remove_decoder_layers
from lfgraph.errors import LfgraphError

from deploy_helpers import PROMPT, remove_plan

NEW = 24


@pytest.fixture(scope="module")
def sources(gqa_folder, gqa_loaded, tmp_path_factory):
    """The uncompressed 4-layer decoder in lfgraph's layout and in onnxruntime-genai's."""
    model, _ = gqa_loaded
    ours = tmp_path_factory.mktemp("lfgraph-layout")
    for f in gqa_folder.iterdir():  # tokenizer beside the model, as in a deploy folder
        if f.name.startswith("tokenizer"):
            (ours / f.name).write_bytes(f.read_bytes())
    export_decoder_with_past(model.hf_model, ours)
    genai = tmp_path_factory.mktemp("genai-layout")
    build_with_genai_builder(gqa_folder, genai)
    return {"lfgraph": ours, "genai": genai, "torchscript": torchscript_export(model.hf_model, tmp_path_factory.mktemp("ts-layout"))}


def torchscript_export(hf, folder):
    """The layout Optimum's exporter writes: TorchScript export, ``/model/layers.N/...`` node
    names, no module-scope metadata (Optimum itself needs transformers<4.58, not installable here)."""
    import warnings

    from lfgraph.deploy.decoder_onnx import DecoderWithPast, past_names, present_names, write_genai_config

    L, kv = hf.config.num_hidden_layers, hf.config.num_key_value_heads
    B, S, P = 2, 3, 5
    args = (torch.randint(0, 200, (B, S)), torch.ones(B, P + S, dtype=torch.long), torch.arange(P, P + S)[None].expand(B, S),
            tuple(torch.randn(B, kv, P, 16) for _ in range(2 * L)))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past_names(L)})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present_names(L)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(DecoderWithPast(hf), args, str(folder / "model.onnx"), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask", "position_ids", *past_names(L)],
                          output_names=["logits", *present_names(L)], dynamic_axes=axes)
    write_genai_config(hf, folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["lfgraph", "genai", "torchscript"])
@pytest.mark.parametrize("drop", [[1], [0, 2]])
def test_onnx_straight_generates_like_the_pytorch_plan(sources, gqa_loaded, tmp_path, layout, drop):
    model, graph = gqa_loaded
    plan = remove_plan(graph, drop)
    report = compress_decoder_onnx(sources[layout], tmp_path / "out", plan=plan)
    assert report.layers == (4, 4 - len(drop)) and report.file_bytes[1] < report.file_bytes[0]
    cfg = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == 4 - len(drop)
    m = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert cache_layout(m).n_layers == 4 - len(drop)

    hf = pipeline.rewrite(model, graph, plan).model.model
    want = torch_greedy(hf, PROMPT, NEW)
    assert want != torch_greedy(model.hf_model, PROMPT, NEW), "removing these layers must change the tokens"
    assert genai_greedy(tmp_path / "out", PROMPT, NEW) == want
    dec = OrtDecoder(tmp_path / "out" / "model.onnx")
    assert dec.greedy(PROMPT, NEW, head_dim=16) == want
    logits, _ = dec.prefill(np.array([PROMPT]), head_dim=16)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()


def test_single_file_output_and_input_untouched(sources, tmp_path):
    src = sources["lfgraph"] / "model.onnx"
    before = src.read_bytes()
    report = compress_decoder_onnx(src, tmp_path / "cut.onnx", layers=[3])
    assert report.layers == (4, 3) and (tmp_path / "cut.onnx").is_file()
    assert src.read_bytes() == before
    with pytest.raises(LfgraphError, match="overwrite"):
        compress_decoder_onnx(src, src, layers=[3])


def _graph(inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """A tiny graph with the given float inputs/outputs (Identity nodes)."""
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, None, 4]) for n in inputs]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, None, 4]) for n in outputs]
    nodes = [helper.make_node("Identity", [i], [o]) for i, o in zip(inputs, outputs)]
    return helper.make_model(helper.make_graph(nodes, "g", ins, outs))


def test_unknown_cache_layout_is_refused_with_what_was_found():
    m = _graph(["input_ids_f", "past.0.key", "past.0.value"], ["logits", "present_0_key", "present_0_value"])
    with pytest.raises(LfgraphError, match=r"unknown KV-cache layout \['past.0.key', 'past.0.value'"):
        remove_decoder_layers(m, [0])
    with pytest.raises(LfgraphError, match="no KV-cache inputs"):
        remove_decoder_layers(_graph(["x"], ["y"]), [0])


def test_graph_without_layer_ownership_is_refused(sources):
    m = onnx.load(str(sources["lfgraph"] / "model.onnx"))
    for node in m.graph.node:
        del node.metadata_props[:]
        node.name = ""
    with pytest.raises(LfgraphError, match="cannot tell which nodes belong to decoder layers"):
        remove_decoder_layers(m, [1])


def test_bad_requests_are_refused(sources, gqa_loaded, tmp_path):
    _, graph = gqa_loaded
    plan = remove_plan(graph, [1])
    plan.fuse = "mean"
    with pytest.raises(LfgraphError, match="fuse rule 'mean'"):
        compress_decoder_onnx(sources["lfgraph"], tmp_path / "o", plan=plan)
    with pytest.raises(LfgraphError, match="every decoder layer"):
        compress_decoder_onnx(sources["lfgraph"], tmp_path / "o", layers=[0, 1, 2, 3])
    with pytest.raises(LfgraphError, match="does not exist"):
        compress_decoder_onnx(sources["lfgraph"], tmp_path / "o", layers=[7])


@pytest.mark.parametrize("layout", ["lfgraph", "genai"])
def test_block_influence_on_onnx_matches_pytorch(sources, gqa_loaded, layout):
    from lfgraph.deploy.onnx_compress import plan_decoder_onnx
    from lfgraph.passes.selection import block_influence_scores

    model, graph = gqa_loaded
    windows = torch.randint(0, model.hf_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    blocks = [b.name for b in graph.blocks]
    want = block_influence_scores(model.module, blocks, windows)
    plan = plan_decoder_onnx(sources[layout], 0.5, windows=windows.numpy())
    got = plan.provenance["scores"]
    assert np.allclose(got, [want[i] for i in range(4)], atol=1e-4), (got, want)
    ranked = sorted(range(4), key=lambda i: (want[i], i))
    assert sorted(int(b.rsplit(".", 1)[1]) for b in plan.absorbed) == sorted(ranked[:2])


def test_compress_runs_the_decoder_stages_through_the_one_manager(sources, tmp_path):
    from lfgraph import stages

    src = sources["lfgraph"] / "model.onnx"
    out = tmp_path / "cut.onnx"
    built = stages.build_stages(stages.CompressState(spec=str(src), out=out))
    names = ["options", "load", "plan", "staging", "write", "verify", "quality", "time", "finish", "report"]
    assert [s.name for s in built] == names
    assert type(built[2]) is stages.PlanDecoder and type(built[4]) is stages.WriteDecoder
    report = pipeline.compress(str(src), out, target=0.25, quiet=True)
    assert report.exit_code == 0 and report.out == out and out.is_file()
    assert report.source_kind == "onnx decoder" and report.blocks == (4, 3)
    assert list(report.stage_seconds) == names
