"""The model fingerprint's rule (two levels: a digest per layer, then the digests in name
order) and how a plan made under the older one-level rule is refused."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import lfgraph
from lfgraph.errors import LfgraphError
from lfgraph.fingerprint import FINGERPRINT_SINCE, combine, layer_digest, version_before
from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.plan import FusionPlan

import tiny_models as zoo


def _graph():
    return build_layer_graph(zoo.MLP(), (torch.randn(2, 16),))


def test_fingerprint_is_sha256_of_the_layer_digests_in_name_order():
    g = _graph()
    digests = []
    for n in sorted(g.nodes, key=lambda n: n.name):
        h = hashlib.sha256()
        h.update(n.name.encode())
        h.update(str(tuple(n.weight.shape)).encode())
        h.update(np.ascontiguousarray(n.weight, dtype=np.float32).tobytes())
        if n.bias is not None:
            h.update(np.ascontiguousarray(n.bias, dtype=np.float32).tobytes())
        digests.append(h.digest())
    assert g.fingerprint() == hashlib.sha256(b"".join(digests)).hexdigest()[:16]
    # the order the digests are given in does not matter; pieces of rows hash as the whole
    by_name = {n.name: layer_digest(n.name, n.weight.shape, np.array_split(np.ascontiguousarray(n.weight, dtype=np.float32), 3),
                                    None if n.bias is None else [n.bias.astype(np.float32)]) for n in reversed(g.nodes)}
    assert combine(by_name) == g.fingerprint()


def test_version_before():
    assert version_before("0.1.0") and version_before("0.1.9")
    assert not version_before(FINGERPRINT_SINCE) and not version_before(lfgraph.__version__) and not version_before("1.0.0")
    assert not version_before("dev") and not version_before(None)


def test_a_plan_with_an_old_style_fingerprint_says_to_replan():
    g = _graph()
    plan = FusionPlan(fusions=[], provenance={"model_fingerprint": "0123456789abcdef", "lfgraph_version": "0.1.0"})
    with pytest.raises(LfgraphError, match=r"made by lfgraph 0\.1\.0.*computed differently.*make the plan again"):
        plan.check_applies_to(g.fingerprint())
    plan.provenance["lfgraph_version"] = lfgraph.__version__
    with pytest.raises(LfgraphError, match="plan was made for model fingerprint 0123456789abcdef, this model is"):
        plan.check_applies_to(g.fingerprint())
    plan.provenance["model_fingerprint"] = g.fingerprint()
    plan.check_applies_to(g.fingerprint())


def test_version_before_reads_pre_releases():
    from lfgraph.fingerprint import version_before

    assert version_before("0.1.0") and version_before("0.2.0.dev3") and version_before("0.2.0rc1")
    assert not version_before("0.2.0") and not version_before("0.3.1")
    assert not version_before("not a version") and not version_before(None)
