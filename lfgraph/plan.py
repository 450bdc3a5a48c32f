"""FusionPlan: the contract between analysis and rewrite.

A plan is an ordered list of fusions with the provenance that produced it. It is plain
JSON, so that a pipeline can store it, diff it, review it and apply it later to the same
model (``model_fingerprint`` guards against applying it to another one). Serialisation is
deterministic: the same plan always gives the same bytes.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import LfgraphError
from .fileio import write_text_atomic
from .fingerprint import FINGERPRINT_SINCE, version_before

SCHEMA_VERSION = 1

#: What a fusion acts on: whole blocks (merge: depth drops) or single layers (tie).
UNITS = ("block", "layer")
#: How the weights of a fused set become one: ``remove`` keeps the kept member as it is
#: (layer deletion), ``mean`` averages (the paper's test-time rule; with ``align`` after
#: neuron alignment), ``calibrated`` refits the kept block's output projections on
#: calibration activations so that it reproduces the whole fused run.
FUSE_RULES = ("remove", "mean", "calibrated")


@dataclass
class Fusion:
    """One fusion: ``absorb`` members are fused into ``keep``.

    For ``unit == "block"`` the names are block names and, under ``merge``, the absorbed
    blocks disappear from the graph. For ``unit == "layer"`` they are layer names and, under
    ``tie``, all of them end up sharing one weight tensor.

    ``score`` is the distance (lower = more alike) that ranked this fusion; ``align`` asks
    the rewrite to permute the absorbed members' hidden units onto the kept one's before
    averaging.
    """

    keep: str
    absorb: list[str]
    unit: str = "block"
    score: float = 0.0
    align: bool = True


#: The fields of a plan and of each fusion, as they are spelled in the JSON.
FUSION_FIELDS = ("keep", "absorb", "unit", "score", "align")
PLAN_FIELDS = ("fusions", "mode", "fuse", "provenance", "schema_version")


def _check_fields(data: Any, known: tuple[str, ...], required: set[str], where: str) -> None:
    """Name, in the plan's own words, a field that is missing or unknown (a typo)."""
    if not isinstance(data, dict):
        raise LfgraphError(f"{where} must be a JSON object with the fields {', '.join(known)}")
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise LfgraphError(f"{where} has an unknown field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f": its fields are {', '.join(known)}")
    for key in sorted(required - set(data)):
        raise LfgraphError(f"{where} lacks the field {key!r}: regenerate the plan with `lfgraph plan`")


@dataclass
class FusionPlan:
    """An ordered, serialisable list of fusions plus how it was made."""

    fusions: list[Fusion]
    mode: str = "merge"
    fuse: str = "mean"
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def absorbed(self) -> list[str]:
        return [name for f in self.fusions for name in f.absorb]

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, fixed float formatting, trailing newline)."""
        data = asdict(self)
        for f in data["fusions"]:
            f["score"] = float(f"{f['score']:.9g}")
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the plan atomically."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, text: str) -> "FusionPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LfgraphError(f"plan is not valid JSON ({e}): regenerate it with `lfgraph plan`") from None
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            raise LfgraphError(
                f"plan has schema_version {data.get('schema_version') if isinstance(data, dict) else '?'}, "
                f"this lfgraph reads {SCHEMA_VERSION}: regenerate it with `lfgraph plan`"
            )
        _check_fields(data, PLAN_FIELDS, {"fusions", "mode"}, "the plan")
        if not isinstance(data["fusions"], list):
            raise LfgraphError("the plan's field 'fusions' must be a list of fusions: regenerate it with `lfgraph plan`")
        for i, f in enumerate(data["fusions"]):
            _check_fields(f, FUSION_FIELDS, {"keep", "absorb"}, f"fusions[{i}]")
            if not isinstance(f["keep"], str) or not isinstance(f["absorb"], list) or not all(isinstance(a, str) for a in f["absorb"]):
                raise LfgraphError(f"fusions[{i}] of the plan: 'keep' must be a name and 'absorb' a list of names")
        fusions = [Fusion(**f) for f in data["fusions"]]
        plan = cls(fusions=fusions, mode=data["mode"], fuse=data.get("fuse", "mean"), provenance=data.get("provenance", {}))
        if plan.mode not in ("merge", "tie"):
            raise LfgraphError(f"the plan's field 'mode' is {plan.mode!r}: it must be 'merge' or 'tie'")
        if plan.fuse not in FUSE_RULES:
            raise LfgraphError(f"the plan's field 'fuse' is {plan.fuse!r}: it must be one of {', '.join(FUSE_RULES)}")
        plan.validate()
        return plan

    def validate(self) -> None:
        """Refuse, in the plan's own words (``fusions[2] ...``), a plan no rewrite can apply
        as written: an unknown unit, a fusion that absorbs nothing, absorbs its own kept
        member or one member twice, the same fusion twice, or a member in two fusions (the
        rewrites would remove a kept block, or remove one block twice). Called by
        :meth:`from_json` and by :meth:`check_names` (so every rewrite path checks it)."""
        where: dict[str, int] = {}
        seen: dict[tuple[str, tuple[str, ...]], int] = {}
        for i, f in enumerate(self.fusions):
            if f.unit not in UNITS:
                raise LfgraphError(f"fusions[{i}] has unit {f.unit!r}: it must be one of {', '.join(UNITS)}")
            what = f.unit
            if not f.absorb:
                raise LfgraphError(f"fusions[{i}] absorbs no {what} (its 'absorb' is empty): list the {what}s to fuse into "
                                   f"{f.keep}, or drop the fusion; regenerate the plan with `lfgraph plan`")
            if f.keep in f.absorb:
                raise LfgraphError(f"fusions[{i}] absorbs its own kept {what} {f.keep}: a {what} cannot be kept and fused away; "
                                   "remove it from 'absorb' or regenerate the plan with `lfgraph plan`")
            key = (f.keep, tuple(sorted(f.absorb)))
            if key in seen:
                raise LfgraphError(f"fusions[{i}] repeats fusions[{seen[key]}] (keep {f.keep}): list each fusion once")
            seen[key] = i
            for name in [f.keep, *f.absorb]:
                if name in where:
                    j = where[name]
                    clash = f"fusions[{i}] absorbs {name} twice" if j == i else f"fusions[{i}] names {what} {name}, which fusions[{j}] already names"
                    raise LfgraphError(f"{clash}: a {what} is in one fusion at most; merge them into one fusion "
                                       "or regenerate the plan with `lfgraph plan`")
                where[name] = i

    def check_matches(self, graph: Any) -> None:
        """Everything that makes this plan unfit for the model of ``graph`` (a
        :class:`~lfgraph.graph.LayerGraph`), checked before any rewrite: its fingerprint
        (:meth:`check_applies_to`), then :meth:`check_names` against its blocks and layers.
        Every rewrite path (PyTorch, ONNX) calls it."""
        self.check_applies_to(graph.fingerprint())
        self.check_names([b.name for b in graph.blocks], [n.name for n in graph.nodes])

    def check_names(self, blocks: Iterable[str], layers: Iterable[str]) -> None:
        """:meth:`validate`, then refuse a fusion naming a block (``unit`` block) or a layer
        (``unit`` layer) that is not among the model's ``blocks`` / ``layers``."""
        self.validate()
        known = {"block": set(blocks), "layer": set(layers)}
        for i, f in enumerate(self.fusions):
            for name in [f.keep, *f.absorb]:
                if name not in known[f.unit]:
                    close = difflib.get_close_matches(name, sorted(known[f.unit]), n=1)
                    raise LfgraphError(f"fusions[{i}] names {f.unit} {name!r}, which this model does not have"
                                       + (f" (did you mean {close[0]!r}?)" if close else "")
                                       + ": make the plan for this model with `lfgraph plan`")

    @classmethod
    def load(cls, path: str | Path) -> "FusionPlan":
        """Read and :meth:`validate` the plan in ``path``; ``LfgraphError`` for a missing,
        binary or malformed file."""
        p = Path(path)
        if not p.is_file():
            raise LfgraphError(f"plan file {p} does not exist: make one with `lfgraph plan MODEL -o {p}`")
        data = p.read_bytes()
        try:
            text = data.decode("utf-8")
            if "\0" in text:  # a .safetensors file whose header length is small reads as UTF-8
                raise ValueError("NUL byte")
        except (UnicodeDecodeError, ValueError):
            raise LfgraphError(f"plan file {p} is not a text file (binary data, not JSON): give the plan JSON that "
                               f"`lfgraph plan MODEL -o {p.name}` writes") from None
        return cls.from_json(text)

    def check_applies_to(self, fingerprint: str) -> None:
        """Refuse a plan made for a model with different weights (or whose fingerprint an
        older lfgraph computed by a rule that differs: then the message says to re-plan)."""
        want = self.provenance.get("model_fingerprint")
        if want and want != fingerprint:
            made_by = self.provenance.get("lfgraph_version")
            if made_by is not None and version_before(made_by):
                raise LfgraphError(
                    f"plan was made by lfgraph {made_by}, whose model fingerprint ({want}) is computed differently from this "
                    f"lfgraph's (since {FINGERPRINT_SINCE}; this model is {fingerprint}): the weights may well be the same, "
                    "but the plan cannot be checked against them: make the plan again with this lfgraph (`lfgraph plan`)"
                )
            raise LfgraphError(
                f"plan was made for model fingerprint {want}, this model is {fingerprint}: "
                "make a new plan for this model with `lfgraph plan`"
            )
