"""The live view's statistics of the selected layer in a real headless Chromium against the real stack: the
distribution of a tensor's log2 magnitudes over steps (/histograms?matrix=1) as a heatmap, the per-tensor
table (/tensors?layer=: a NaN-poisoned weight reads NaN in red, never 0), the optimizer panel (/optimizer) and
valid ranges set through the page's form, whose out-of-range steps the loss curve marks in red.
Screenshots go to $GRADWATCH_ARTIFACTS/ui (default test-artifacts/ui)."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest

from tests.scenarios.ui.pages import ARTIFACTS, Page, get, wait_until

pytestmark = pytest.mark.e2e

NAN_LAYER = "fc2"
NAN_STEP = 30
STEPS = 40


def train(run: str, collector: str, steps: range, state: dict) -> None:
    import torch
    from torch import nn

    import gradwatch

    if "model" not in state:
        torch.manual_seed(0)
        model = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 48), act1=nn.Tanh(), fc2=nn.Linear(48, 48),
                                          act2=nn.ReLU(), head=nn.Linear(48, 10)))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        state.update(model=model, teacher=nn.Linear(16, 10),
                     watcher=gradwatch.watch(model, optimizer, run=run, collector=collector, select="full"),
                     optimizer=optimizer)
    model, optimizer, teacher, watcher = (state[k] for k in ("model", "optimizer", "teacher", "watcher"))
    loss_fn = nn.CrossEntropyLoss()
    for step in steps:
        if step == NAN_STEP:
            with torch.no_grad():
                model.fc2.weight[0, 0] = math.nan  # the poisoned weight
        x = torch.randn(32, 16)
        y = teacher(x).argmax(1)
        out = model(x)
        loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        watcher.step(loss=loss, accuracy=(out.argmax(1) == y).float().mean())
    assert watcher.flush(20)


def test_statistics_of_the_selected_layer_and_valid_ranges(stack, browser):
    cfg, _ = stack
    run = "ui-stats"
    state: dict = {}
    train(run, cfg.collector_listen, range(STEPS), state)
    wait_until(lambda: get(cfg, f"/api/v1/runs/{run}")["step"] == STEPS - 1, 20, "the run applied")

    page = Page(browser)
    p = page.page
    p.goto(f"http://{cfg.aggregator_metrics_listen}/#run={run}")
    p.wait_for_function("window.gradwatch && window.gradwatch.ready", timeout=20_000)
    p.fill("#find", NAN_LAYER)
    p.press("#find", "Enter")
    assert p.evaluate("gradwatch.view.layer") == NAN_LAYER

    # 1. The distribution over steps: the selected tensor's histogram matrix, drawn as an ECharts heatmap.
    kinds = p.eval_on_selector_all("#dist-kind option", "os => os.map(o => o.value)")
    assert {"parameter", "gradient"} <= set(kinds), kinds
    p.select_option("#dist-kind", "parameter")
    matrix_of = "gradwatch.stats.matrix?.kind === '{}' && gradwatch.stats.cells().length > 0"
    p.wait_for_function(matrix_of.format("parameter"), timeout=10_000)
    assert p.evaluate("gradwatch.stats.matrix.tensor") == f"{NAN_LAYER}.weight"
    drawn = p.evaluate("gradwatch.charts.distribution.getOption().series[0].data.length")
    assert drawn == p.evaluate("gradwatch.stats.cells().length") > 10
    # The columns after the poisoning: a red NaN/Inf row above the buckets.
    special = p.evaluate("gradwatch.charts.distribution.getOption().series[1].data.map(d => d.itemStyle.color)")
    assert "#ff1744" in special
    columns = p.evaluate("gradwatch.stats.matrix.values.length")
    assert columns >= 10
    if "update" in kinds:  # updates from select="full": the effective step size, drawn the same way
        p.select_option("#dist-kind", "update")
        p.wait_for_function(matrix_of.format("update"), timeout=10_000)
        p.select_option("#dist-kind", "parameter")
        p.wait_for_function("gradwatch.stats.matrix?.kind === 'parameter'", timeout=10_000)

    # 2. The tensors' table: the poisoned weight's mean, std and norm read NaN (in red), never 0.
    row = f"#tensor-stats tr[data-tensor='{NAN_LAYER}.weight'][data-kind='parameter']"
    p.wait_for_selector(row, timeout=10_000)
    cells = p.eval_on_selector_all(f"{row} td", "ts => ts.map(t => [t.textContent, t.className])")
    name, kind, mean, std, mn, mx, norm, nan, inf = cells
    assert mean == ["NaN", "nonfinite"] and std == ["NaN", "nonfinite"] and norm[0] == "NaN", cells
    assert nan[0] != "0" and nan[1] == "nonfinite", cells
    # min and max are the finite elements' (after Adam spread the NaN there are none: "–"), never 0
    assert mn[0] not in ("NaN", "0") and mx[0] not in ("NaN", "0"), cells
    api_nan = [t for t in get(cfg, f"/api/v1/runs/{run}/tensors?layer={NAN_LAYER}")["tensors"]
               if t["name"] == f"{NAN_LAYER}.weight" and t["kind"] == "parameter"][0]["nan"]
    assert nan[0] == str(api_nan)

    # 3. The optimizer panel: Adam's moments and the update for the layer's parameters.
    p.wait_for_selector(f"#optimizer-table tr[data-parameter='{NAN_LAYER}.weight']", timeout=10_000)
    opt = get(cfg, f"/api/v1/runs/{run}/optimizer?layer={NAN_LAYER}")
    rows = p.eval_on_selector_all("#optimizer-table tbody tr", "rs => rs.map(r => r.dataset.parameter)")
    assert rows == [q["parameter"] for q in opt["parameters"]]
    if not opt["updates"]:
        assert "needs updates:on or full" in p.inner_text("#optimizer-note")

    # 4. A valid range for the loss, through the form: listed, and the out-of-range steps red on the curve.
    p.fill("#range-metric", "loss")
    p.fill("#range-min", "0")
    p.fill("#range-max", "2.25")
    p.click("#range-set")
    p.wait_for_selector("#ranges li[data-metric='loss']", timeout=10_000)
    assert "2.25" in p.inner_text("#ranges li[data-metric='loss']")
    assert get(cfg, f"/api/v1/runs/{run}/ranges")["ranges"][0]["metric"] == "loss"
    steps = get(cfg, f"/api/v1/runs/{run}/steps?layers=0")["steps"]
    outside = sorted(s["step"] for s in steps if "loss" in (s.get("out_of_range") or []))
    assert outside and len(outside) < len(steps), "some losses above 2.25, not all"
    p.wait_for_function(
        "(gradwatch.charts.curves.getOption().series.find(s => s && s.name === 'out of range')?.data.length || 0) > 0",
        timeout=10_000)
    marked = p.evaluate("gradwatch.charts.curves.getOption().series.find(s => s && s.name === 'out of range')"
                        ".data.map(d => d[0])")
    assert sorted(marked) == outside
    spans = p.evaluate("gradwatch.curves.outOfRangeSpans()")  # shaded (markArea), NaN losses included
    assert spans and all(any(a <= s <= b for a, b in spans) for s in outside), (spans, outside)
    shaded = p.evaluate("gradwatch.charts.curves.getOption().series"
                        ".find(s => s && s.name === 'out-of-range steps').markArea.data.length")
    assert shaded == len(spans)
    p.evaluate("document.getElementById('stats-section').scrollIntoView()")
    p.wait_for_timeout(300)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "statistics.png"), full_page=True)

    # A range of a user scalar, typed in: marked on the metric axis.
    p.fill("#range-metric", "accuracy")
    p.fill("#range-min", "0.05")
    p.fill("#range-max", "")
    p.click("#range-set")
    p.wait_for_selector("#ranges li[data-metric='accuracy']", timeout=10_000)
    p.wait_for_function("gradwatch.charts.curves.getOption().series.some(s => s && s.name === 'out of range (metric)')",
                        timeout=10_000)

    # Live: new steps through the event stream refresh the tables and are marked out of range as they come.
    train(run, cfg.collector_listen, range(STEPS, STEPS + 10), state)
    state["watcher"].close()
    p.wait_for_function(f"gradwatch.view.lastStep >= {STEPS + 9}", timeout=20_000)
    p.wait_for_function(f"document.getElementById('tensor-stats-info').textContent === 'step {STEPS + 9}'",
                        timeout=10_000)
    p.wait_for_function("gradwatch.charts.curves.getOption().series.find(s => s && s.name === 'out of range')"
                        f".data.some(d => d[0] === {STEPS + 9})", timeout=10_000)

    # Removing the loss range: gone from the list and from the curve.
    p.click("#ranges li[data-metric='loss'] button.delete")
    p.wait_for_function("!document.querySelector(\"#ranges li[data-metric='loss']\")", timeout=10_000)
    p.wait_for_function("!gradwatch.charts.curves.getOption().series.some(s => s && s.name === 'out of range')",
                        timeout=10_000)
    assert [r["metric"] for r in get(cfg, f"/api/v1/runs/{run}/ranges")["ranges"]] == ["accuracy"]
    p.evaluate("window.scrollTo(0, 0)")
    page.screenshot("statistics-top.png")
    assert page.errors == [], page.errors
    p.close()
