"""Node-data overlays for Google's Model Explorer, keyed by the ONNX node names of the ORIGINAL graph.

A user opens the original ONNX file in Model Explorer (with the ``model-explorer-onnx``
adapter) and loads the overlays to see what lfgraph did to each node:

- **fate** (:func:`fate_overlay`): value = fate code (:data:`FATES`), colour = fate;
  every node of a removed block is grey, of a block that absorbed others blue, tied
  layers green, refitted layers orange, the rest white.
- **score** (:func:`score_overlay`): value = the selection score of the node's block (the
  first criterion given, else the plan's fusion score), coloured by a gradient; only
  nodes of scored blocks appear, so removed nodes carry their fate (in the first) and
  their score (in the second).

Keys are the node ids Model Explorer's ONNX adapter shows: node names, and
``<node_{i}>`` (i = index in the graph) for unnamed nodes, as the adapter names them.

Both are built with ``model_explorer.node_data_builder`` (the ``ai-edge-model-explorer``
package), not by hand. The ONNX graph is mapped to lfgraph's layers with lfgraph's own
ONNX frontend (``analyze_onnx``): weighted nodes by their layer names (module paths for
an export of a PyTorch model), every other node by the block whose body holds it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import onnx

from ..errors import LfgraphError

#: Fate codes (the overlay's values), their names and colours.
FATES: dict[str, tuple[int, str]] = {
    "kept": (0, "#ffffff"),
    "keeper": (1, "#9ecae1"),
    "removed": (2, "#bdbdbd"),
    "tied": (3, "#a1d99b"),
    "refitted": (4, "#fdae6b"),
}


def _builder() -> Any:
    try:
        from model_explorer import node_data_builder
    except ImportError:
        raise LfgraphError("Model Explorer overlays need the ai-edge-model-explorer package: pip install ai-edge-model-explorer") from None
    return node_data_builder


@dataclass
class NodeFate:
    """What happened to one ONNX node: its fate, the lfgraph block or layer it belongs to,
    the block that absorbed it (removed nodes) and its block's score (if any)."""

    fate: str
    block: str | None
    layer: str | None
    absorbed_by: str | None
    score: float | None


def node_id(node: onnx.NodeProto, index: int) -> str:
    """The id Model Explorer's ONNX adapter (``model-explorer-onnx``) gives a node of the
    main graph: its name, or ``<node_{index}>`` for an unnamed one (``create_graph`` in
    its ``main.py`` names unnamed nodes so). Output tensor names would not do: the
    adapter writes them as ``__tensor_tag``, not the ``tensor_name`` the app matches."""
    return node.name or f"<node_{index}>"


def node_fates(onnx_model: onnx.ModelProto, data: Mapping[str, Any]) -> dict[str, NodeFate]:
    """Fate of every node (keyed by :func:`node_id`) of ``onnx_model`` (the ORIGINAL model) from the
    report ``data`` (:func:`lfgraph.visualize.data.report_data`).

    Expects ``onnx_model`` to be the model the plan was made for, or the ONNX export of
    it. Raises ``LfgraphError`` when none of the graph's weighted layers is found in the
    ONNX model (another model). The model is not modified.
    """
    from ..frontends.onnx_graph import analyze_onnx

    st = analyze_onnx(onnx_model)
    layers = {l["name"]: (r, l) for r in data["rows"] for l in r["layers"]}
    rows = {r["name"]: r for r in data["rows"] if r["kind"] == "block"}
    scores = data.get("scores") or {}
    crit = next(iter(scores), None)

    def score(block: str | None) -> float | None:
        return scores[crit].get(block) if crit and block else None

    found = {i: layers[st.layer_names[i]] for i in st.weighted if st.layer_names.get(i) in layers}
    if not found:
        raise LfgraphError("none of the model's layers is in this ONNX graph: give the original ONNX file of the model the plan was made for")
    # an ONNX block belongs to the lfgraph block that holds most of its weighted nodes
    node_block: dict[int, str] = {}
    for b in st.blocks:
        owners = Counter(found[i][0]["name"] for i in b.members if i in found and found[i][0]["kind"] == "block")
        if owners:
            owner = owners.most_common(1)[0][0]
            node_block.update(dict.fromkeys(b.nodes, owner))
            node_block.update(dict.fromkeys(b.members, owner))
    counts = Counter(n.name for n in st.nodes)
    out: dict[str, NodeFate] = {}
    for i, node in enumerate(st.nodes):
        key = node_id(node, i)
        if node.name and counts[node.name] > 1:
            continue  # a repeated name is no id: Model Explorer could not tell the nodes apart
        block = node_block.get(i)
        layer = found[i][1] if i in found else None
        if block is None and i in found and found[i][0]["kind"] == "block":
            block = found[i][0]["name"]
        row = rows.get(block) if block else None
        fate = row["fate"] if row else "kept"
        if fate != "removed" and layer is not None:
            if layer["refit"]:
                fate = "refitted"
            elif layer["tie"] is not None and not layer["tie_keep"]:
                fate = "tied"
        out[key] = NodeFate(fate, block, layer["name"] if layer else None, row["absorbed_by"] if row else None, score(block))
    return out


def fate_overlay(fates: Mapping[str, NodeFate]) -> Any:
    """A ``GraphNodeData`` (Model Explorer's builder) with one result per node: value =
    fate code, background = fate colour."""
    b = _builder()
    legend = ", ".join(f"{code} {name}" for name, (code, _) in FATES.items())
    return b.GraphNodeData(
        name=f"lfgraph fate ({legend})",
        results={k: b.NodeDataResult(value=FATES[f.fate][0], bgColor=FATES[f.fate][1]) for k, f in sorted(fates.items())},
        thresholds=[b.ThresholdItem(value=code, bgColor=colour) for code, colour in sorted(FATES.values())],
    )


def score_overlay(fates: Mapping[str, NodeFate], criterion: str) -> Any:
    """A ``GraphNodeData`` with the block score of every node whose block has one
    (gradient: low score = pale, high = dark)."""
    b = _builder()
    return b.GraphNodeData(
        name=f"lfgraph selection score: {criterion}",
        results={k: b.NodeDataResult(value=float(f.score)) for k, f in sorted(fates.items()) if f.score is not None},
        gradient=[b.GradientItem(stop=0, bgColor="#fff5eb"), b.GradientItem(stop=1, bgColor="#d94801")],
    )


def overlays(onnx_model: onnx.ModelProto, data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"fate": GraphNodeData, "score": GraphNodeData | None}`` for the original ONNX model."""
    fates = node_fates(onnx_model, data)
    crit = next(iter(data.get("scores") or {}), None)
    return {"fate": fate_overlay(fates), "score": score_overlay(fates, crit) if crit else None}
