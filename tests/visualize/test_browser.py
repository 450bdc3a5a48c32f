"""End to end: the page in a real headless Chromium (Selenium + Debian's chromium-driver).

Fails on any console error; expands a block and checks its layers are shown; checks the
removed blocks are drawn struck through with an arrow to their keeper; saves a screenshot.
Skipped only where Chromium/chromedriver or selenium cannot be found (CI installs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfgraph.frontends.torch_fx import build_layer_graph
from lfgraph.models import CausalLMLogits
from lfgraph.passes.analysis import analyze
from lfgraph.passes.planner import make_plan
from lfgraph.passes.rewrite_torch import apply_plan
from lfgraph.visualize import read_page_data, write_report
from lfgraph.visualize.browser import console_errors, find_chromium, headless, open_page, screenshot
from tiny_models import tiny_llama

pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no chromium + chromedriver on PATH (apt-get install chromium chromium-driver)")


def test_page_in_headless_chromium(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    torch.manual_seed(0)
    model = CausalLMLogits(tiny_llama(layers=8, hidden=32)).eval()
    graph = build_layer_graph(model, (torch.arange(10).reshape(1, 10) % 128,), model_name="tiny-llama-8")
    analysis = analyze(graph, "euclidean")
    plan = make_plan(graph, metric="euclidean", target=0.375, mode="merge", fuse="mean", analysis=analysis)
    log = apply_plan(model, graph, plan).log
    page = tmp_path / "report.html"
    write_report(page, graph, plan, log, analysis=analysis, loss_curve=[(0, 3.0), (5, 2.0), (10, 1.5)])
    with headless() as d:
        open_page(d, page)
        assert console_errors(d) == []
        before = d.find_elements(By.CSS_SELECTOR, '#before .row')
        after = d.find_elements(By.CSS_SELECTOR, '#after .row')
        assert len(after) == len(before) - len(plan.absorbed)
        # removed blocks: struck through, greyed, one dashed arrow each into the keeper
        removed = d.find_elements(By.CSS_SELECTOR, '#before .row.removed')
        assert sorted(r.get_attribute("data-row") for r in removed) == sorted(plan.absorbed)
        for r in removed:
            name = r.find_element(By.CSS_SELECTOR, ".name")
            assert "line-through" in name.value_of_css_property("text-decoration")
        assert len(d.find_elements(By.CSS_SELECTOR, "#links path.link.removed")) == len(plan.absorbed)
        assert not d.find_elements(By.CSS_SELECTOR, '#after .row.removed')
        # expand the first keeper: its layers appear in both columns
        keep = plan.fusions[0].keep
        head = d.find_element(By.CSS_SELECTOR, f'#before .row[data-row="{keep}"] .head')
        layers = d.find_elements(By.CSS_SELECTOR, f'#before .row[data-row="{keep}"] .layer')
        assert layers and not any(e.is_displayed() for e in layers)
        head.click()
        n_layers = len(graph.blocks[[b.name for b in graph.blocks].index(keep)].members)
        for side in ("before", "after"):
            shown = [e for e in d.find_elements(By.CSS_SELECTOR, f'#{side} .row[data-row="{keep}"] .layer') if e.is_displayed()]
            assert len(shown) == n_layers
        assert d.find_element(By.CSS_SELECTOR, "#curve polyline").get_attribute("points")
        assert len(d.find_elements(By.CSS_SELECTOR, "#heatmaps figure")) == len(analysis.groups) + 1
        assert console_errors(d) == []
        shot = tmp_path / "report.png"
        screenshot(d, shot)
        # a tie plan: one lane per tie set joins its members; nothing is drawn as removed
        tie = make_plan(graph, metric="euclidean", target=0.3, target_kind="params", mode="tie", scope="global", analysis=analysis)
        tie_page = tmp_path / "tie.html"
        write_report(tie_page, graph, tie, apply_plan(model, graph, tie).log)
        open_page(d, tie_page)
        d.find_element(By.ID, "expand-all").click()
        n_sets = len(read_page_data(tie_page.read_text())["tie_sets"])
        assert n_sets > 0
        # lanes are redrawn on the next animation frame after the layout changes
        WebDriverWait(d, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#links g.lane")) == n_sets)
        members = d.find_elements(By.CSS_SELECTOR, "#after .layer.tied")
        assert len(members) == sum(len(f.absorb) + 1 for f in tie.fusions)
        assert not d.find_elements(By.CSS_SELECTOR, ".row.removed")
        assert console_errors(d) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
