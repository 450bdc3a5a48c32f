"""How final/ was assembled (run from the repository root):
python docs/study/smollm2/final/assemble.py

Rows come from study.json files of runs with one protocol (tools/study_smollm2.py):
the peers from the 30 Nov run (../study.json) and the 50% peers (../remeasured/peers_50),
LaCo (../remeasured/lfgraph_laco, runs-1dec/laco_rel), and lfgraph from runs-1dec/.
lfgraph's rows are renamed to what they are: ``lfgraph`` = the default recipe of each level
(angular + calibrated-distill at 10/20/50%, Block Influence + calibrated-distill at 30%),
``lfgraph-closed-form`` = the same selection + calibrated (full refit, no distillation),
``lfgraph-map`` = angular + calibrated-map (the previous default up to 20%).
"""

import json
import tempfile
from pathlib import Path

from lfgraph_study.study import merge_studies

HERE = Path(__file__).parent
S = HERE.parent
PEERS = {"shortgpt", "gromov", "sleb", "replaceme-lstsq", "replaceme-cosine", "linearpatch"}


def rows(path: Path, keep: dict[str, str], targets: set[float] | None = None) -> dict:
    """A study.json with only the rows whose method is in ``keep``, renamed by it."""
    data = json.loads(path.read_text())
    out = []
    for r in data["rows"]:
        if r["method"] in keep and (targets is None or r["target"] in targets):
            out.append(r | {"method": keep[r["method"]]})
    return data | {"rows": out}


SOURCES = [
    (S / "study.json", {m: m for m in PEERS}, None),
    (S / "remeasured/peers_50/study.json", {m: m for m in PEERS}, None),
    (S / "remeasured/lfgraph_laco/study.json", {"laco": "laco"}, None),
    (S / "runs-1dec/laco_rel.json", {"laco-released": "laco-released"}, None),
    (S / "runs-1dec/angfull_distill.json", {"lfgraph-angular-full-distill": "lfgraph"}, None),
    (S / "runs-1dec/bifull_distill60.json", {"lfgraph-full-distill": "lfgraph"}, None),
    (S / "runs-1dec/default50.json", {"lfgraph": "lfgraph"}, None),
    (S / "runs-1dec/angfull.json", {"lfgraph-angular-full": "lfgraph-closed-form"}, None),
    (S / "remeasured/lfgraph_laco/study.json", {"lfgraph": "lfgraph-closed-form"}, {0.3}),
    (S / "remeasured/angular_50/study.json", {"lfgraph-angular": "lfgraph-closed-form"}, None),
    (S / "remeasured/lfgraph_laco/study.json", {"lfgraph": "lfgraph-map"}, {0.1, 0.2}),
]

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for i, (path, keep, targets) in enumerate(SOURCES):
            d = Path(tmp) / str(i)
            d.mkdir()
            (d / "study.json").write_text(json.dumps(rows(path, keep, targets)))
            dirs.append(d)
        for p in merge_studies(dirs, HERE):
            print(p)
