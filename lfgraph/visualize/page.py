"""The report page: one self-contained HTML file (data, CSS and JavaScript inline, no network).

The page embeds the report data (:func:`lfgraph.visualize.data.report_data`) as JSON in a
``<script type="application/json" id="lfgraph-data">`` element and draws it with the plain
DOM/SVG script ``page.js`` (no library): the original and rewritten model side by side
(blocks, expandable to layers), heatmaps, selection scores, the before/after table, the
healing curve and the rewrite log. Tools read the same JSON back with :func:`read_page_data`.
"""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import LfgraphError
from ..fileio import write_text_atomic

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="lfgraph">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1 id="title">{title}</h1>
<div id="subtitle"></div>
<div id="facts"></div>
<div class="legend" id="legend">
  <span class="k"><span class="sample">blk</span> block (click: its layers)</span>
  <span class="k"><span class="sample removed">blk</span> removed</span>
  <span class="k"><svg width="40" height="12"><path d="M2,6 H34" stroke="#c0392b" stroke-width="1.6" stroke-dasharray="5 3"/><path d="M31,2 L38,6 L31,10 z" fill="#c0392b"/></svg> absorbed by</span>
  <span class="k"><span class="sample keeper">blk</span> kept block that absorbed others (⊕)</span>
  <span class="k"><span class="sample refit">blk</span> refitted / healed</span>
  <span class="k"><svg width="30" height="14"><line x1="15" x2="15" y1="1" y2="13" stroke="#2ca02c" stroke-width="3"/><circle cx="15" cy="3" r="3" fill="#2ca02c"/><circle cx="15" cy="11" r="3" fill="#2ca02c"/></svg> tied layers (one colour per set; "= X": shares X's weight)</span>
</div>
<h2>Model: original → rewritten</h2>
<div class="toolbar"><button id="expand-all" type="button">expand all</button><button id="collapse-all" type="button">collapse all</button>
<span class="note">Click a block to see its layers; hover a tied layer to see its set.</span></div>
<div class="cols-head"><div>original</div><div></div><div>rewritten</div></div>
<div id="graph"><div id="before"></div><div id="after"></div><svg id="links" xmlns="http://www.w3.org/2000/svg"></svg></div>
<section id="score-section"><h2>Selection scores</h2><p class="note">Per block; red bars: blocks the plan removed.</p><div id="scores"></div></section>
<section id="heat-section"><h2>Distances per compatible group (<span id="heat-metric"></span>)</h2>
<p class="note">Lower = more alike (yellow). Red outlines: the pairs the plan fused. Axis: block index (or position in the group).</p>
<div class="cards" id="heatmaps"></div><p class="note" id="heat-note"></p></section>
<section id="table-section"><h2>Before / after</h2><table><thead><tr><th></th><th>before</th><th>after</th><th>ratio</th></tr></thead><tbody id="table"></tbody></table></section>
<section id="curve-section"><h2>Healing loss</h2><div id="curve"></div></section>
<h2>Rewrite log: <span id="log-count"></span></h2>
<label>show <select id="log-filter"><option value="">all actions</option></select></label>
<table><thead><tr><th>#</th><th>pass</th><th>action</th><th>target</th><th>sources</th><th>detail</th></tr></thead><tbody id="log"></tbody></table>
<details><summary>Plan provenance</summary><table><tbody id="provenance"></tbody></table></details>
<script type="application/json" id="lfgraph-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def to_json(data: dict[str, Any], indent: int | None = None) -> str:
    """The report data as JSON (sorted keys; values JSON cannot hold are written as strings)."""
    return json.dumps(data, indent=indent, sort_keys=True, default=str, allow_nan=False)


def render_html(data: dict[str, Any]) -> str:
    """The page for ``data`` as one HTML string (nothing fetched when it is opened)."""
    # inside <script>, "</" would end the element early: JSON allows the escaped form
    payload = to_json(data).replace("</", "<\\/")
    return _TEMPLATE.format(title=html.escape(str(data.get("title", "lfgraph report"))), css=_asset("page.css"),
                            js=_asset("page.js"), data=payload)


def write_html(data: dict[str, Any], path: str | Path) -> None:
    """Write the page atomically; ``LfgraphError`` when it cannot be written."""
    _write(path, render_html(data))


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """Write the report data as JSON atomically; ``LfgraphError`` when it cannot be written."""
    _write(path, to_json(data, indent=1) + "\n")


def _write(path: str | Path, text: str) -> None:
    folder = Path(path).parent
    if not folder.is_dir():
        raise LfgraphError(f"cannot write {path}: folder {folder} does not exist")
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise LfgraphError(f"cannot write {path}: {e.strerror or e}") from None


def read_page_data(text: str) -> dict[str, Any]:
    """The report data embedded in a page written by :func:`render_html`."""
    m = re.search(r'<script type="application/json" id="lfgraph-data">(.*?)</script>', text, re.S)
    if not m:
        raise LfgraphError("this is not an lfgraph report page (no embedded data): write one with `lfgraph visualize`")
    return json.loads(m.group(1))
