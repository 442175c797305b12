"""The live view at the size of a large model, in Chromium against a real stack: a synthetic 2,002-layer
transformer (200 blocks of 10 layers, tests/scenarios/ui/synthetic.py) trained on 64 FSDP ranks, every rank's
report written to Redis as the collector writes it and joined and merged over the ranks by the aggregator.

Measured (issue 19's note): the first useful render, from navigation start to the topology and the heatmap
drawn and on screen (the page's `gradwatch:first-render` mark), target 1 s; and the update time, from a live
update's event arriving to the page updated and to the heatmap's new column drawn (its rows in view fetched
and painted), target 100 ms. A 2-core machine that also runs the aggregator, Redis and the test is asserted
at MARGIN times the targets (medians); every figure, and whether the target itself was met, goes to
test-artifacts/ui/scale-timings.json. Also checked here: no two topology labels overlap (this run as first
shown and with every range open, and a 2-block GPT-2), a closed group shows its worst layer (NaN first) and
opens on click, the layer search works from the keyboard, the heatmap draws and fetches only the rows in
view, and the API's answers stay bounded at this size."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import pytest
import redis

from tests.scenarios.ui.pages import ARTIFACTS, VIEWPORT, Page, get, wait_until
from tests.scenarios.ui.synthetic import DeepTransformer, gpt2_like

pytestmark = pytest.mark.e2e

RUN, LONG, GPT2 = "scale-2k-64", "scale-2k-long", "gpt2-2-blocks"
BLOCKS, WORLD, STEPS = 200, 64, 10
LONG_STEPS = 500  # the heatmap's whole window (heatmap.js MAX_STEPS), on one rank: 64 ranks would take 25 min
NAN_STEP, NAN_LAYER = 6, "blocks.150.attn.v_proj"
FIRST_RENDER_TARGET_MS, UPDATE_TARGET_MS = 1000, 100
MARGIN = 2.0  # asserted: median within MARGIN x target on a loaded 2-core machine; the JSON says whether met
NAVIGATIONS, UPDATES = 5, 5
TIMINGS = ARTIFACTS / "scale-timings.json"


def joined(cfg, run: str, step: int, ranks: int = 1) -> bool:
    """Whether the aggregator applied the run's `step` (a multi-rank run's: joined over its ranks)."""
    data = get(cfg, f"/api/v1/runs/{run}?limit=1")
    if ranks > 1:
        return bool(data["joined"]) and data["joined"]["step"] >= step
    return data["step"] is not None and data["step"] >= step


@pytest.fixture(scope="module")
def runs(stack):
    """The 64-rank run (STEPS steps, a NaN in NAN_LAYER's weight from NAN_STEP), the same model's long
    history on one rank, and a 2-block GPT-2; yields (StackConfig, Redis client, the 64-rank model)."""
    cfg, redis_url = stack
    client = redis.Redis.from_url(redis_url)
    started = time.monotonic()
    # Step by step, as training would send them: one step of 64 ranks is 230,000 summaries for the aggregator.
    big = DeepTransformer(RUN, blocks=BLOCKS, world_size=WORLD, nan_at=(NAN_STEP, NAN_LAYER))
    big.publish_registrations(client)
    for step in range(STEPS):
        big.publish_step(client, step)
        wait_until(lambda s=step: joined(cfg, RUN, s, WORLD), 60, f"step {step} of the 64-rank run joined")
    long = DeepTransformer(LONG, blocks=BLOCKS, world_size=1)
    long.publish_registrations(client)
    for first in range(0, LONG_STEPS, 50):
        for step in range(first, first + 50):
            long.publish_step(client, step)
        wait_until(lambda s=first + 49: joined(cfg, LONG, s), 60, f"step {first + 49} of the long run")
    small = DeepTransformer(GPT2, world_size=1, graph=gpt2_like(2), nan_at=(4, "transformer.h.1.attn.c_proj"))
    small.publish_registrations(client)
    for step in range(6):
        small.publish_step(client, step)
    wait_until(lambda: joined(cfg, GPT2, 5), 30, "the GPT-2 run")
    wait_until(lambda: any(a["rule"] == "NonFinite" for a in get(cfg, f"/api/v1/alerts?run={RUN}")["alerts"]),
               30, "the 64-rank run's NonFinite alert")
    print(f"\nsynthetic runs applied in {time.monotonic() - started:.0f} s")
    yield cfg, client, big
    client.close()


def open_run(browser, cfg, run: str, context=None, viewport: dict | None = None) -> Page:
    page = Page(browser, context, viewport)
    page.page.goto(f"http://{cfg.aggregator_metrics_listen}/ui/#run={run}")
    page.page.wait_for_function("window.gradwatch && window.gradwatch.ready", timeout=30_000)
    return page


def first_renders(browser, cfg, run: str) -> list[dict]:
    """NAVIGATIONS loads of the run's page in one browser context: the first with an empty cache, the others
    as a reload finds it (the page's files revalidated)."""
    context = browser.new_context(viewport=VIEWPORT)
    out = []
    try:
        for i in range(NAVIGATIONS):
            page = Page(browser, context)
            page.page.goto(f"http://{cfg.aggregator_metrics_listen}/ui/#run={run}")
            page.page.wait_for_function("gradwatch.timings.firstRender !== null", timeout=30_000)
            t = page.page.evaluate("gradwatch.timings")
            # Where the time went: the page's own file, the answers the first render waited for (done: the
            # last of them in; wait: the slowest one's server time).
            net = page.page.evaluate("""(() => {
              const first = gradwatch.timings.drawn;
              const api = performance.getEntriesByType('resource').filter((e) => e.name.includes('/api/v1/runs/')
                && e.startTime < first);
              const doc = performance.getEntriesByType('navigation')[0];
              return {html_ms: doc.responseEnd, api_done_ms: Math.max(...api.map((e) => e.responseEnd)),
                      api_wait_ms: Math.max(...api.map((e) => e.responseStart - e.requestStart))};
            })()""")
            out.append({"cold_cache": i == 0, "first_render_ms": round(t["firstRender"], 1),
                        "topology_drawn_ms": round(t["topologyDrawn"], 1),
                        "heatmap_drawn_ms": round(t["heatmapDrawn"], 1),
                        **{k: round(v, 1) for k, v in net.items()},
                        "units_shown": page.page.evaluate("gradwatch.topology.visible().length"),
                        "heatmap_rows_drawn": page.page.evaluate("gradwatch.heatmap.drawnCells().rows")})
            page.page.wait_for_function("window.gradwatch.ready", timeout=30_000)
            assert page.errors == [], page.errors
            page.page.close()
    finally:
        context.close()
    return out


def summary(values: list[float], target: float) -> dict:
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
            "min": round(min(values), 1), "target": target, "target_met_by_median": statistics.median(values) <= target}


def test_first_render_and_live_updates_at_2000_layers_and_64_ranks(runs, browser):
    cfg, client, big = runs
    load = os.getloadavg()
    renders = first_renders(browser, cfg, RUN)
    long_renders = first_renders(browser, cfg, LONG)

    page = open_run(browser, cfg, RUN)
    page.page.wait_for_function("gradwatch.updates.length > 0", timeout=30_000)  # the catch-up after loading
    updates = []
    for step in range(STEPS, STEPS + UPDATES):
        big.publish_step(client, step)
        page.page.wait_for_function(f"gradwatch.updates.some(u => u.heatmap_last >= {step} && u.painted_ms !== null)",
                                    timeout=60_000)
        record = page.page.evaluate(f"gradwatch.updates.find(u => u.heatmap_last >= {step})")
        updates.append({k: round(v, 1) if isinstance(v, float) else v for k, v in record.items()})
    page.screenshot("live-view-2000-layers.png")
    assert page.errors == [], page.errors
    page.page.close()

    first = [r["first_render_ms"] for r in renders]
    dom = [u["dom_ms"] for u in updates]
    heat = [u["heatmap_ms"] for u in updates]
    record = {
        "machine": {"cpus": os.cpu_count(), "gpu": None, "platform": platform.platform(),
                    "chromium": browser.version, "load_average_before": [round(x, 2) for x in load],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "the aggregator, Redis and the test share this machine's cores with Chromium"},
        "run": {"layers": len(big.layers), "tensors_per_rank": 2 * len(big.weighted), "ranks": WORLD,
                "steps_at_load": STEPS, "summaries_per_step": 2 * len(big.weighted) * WORLD},
        "first_render": {"what": "navigation start -> topology and heatmap drawn and on screen "
                                 "(gradwatch:first-render)", "navigations": renders,
                         **summary(first, FIRST_RENDER_TARGET_MS)},
        "first_render_long_history": {"run": f"the same model on 1 rank, {LONG_STEPS} steps (the heatmap's whole "
                                             "window)", "navigations": long_renders,
                                      **summary([r["first_render_ms"] for r in long_renders], FIRST_RENDER_TARGET_MS)},
        "update": {"what": "update event received -> page updated (dom_ms), -> the heatmap's new step drawn "
                           "(heatmap_ms: its rows in view fetched and painted), -> the next frame (painted_ms)",
                   "updates": updates, "dom": summary(dom, UPDATE_TARGET_MS),
                   "heatmap": summary(heat, UPDATE_TARGET_MS)},
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n2,002 layers x 64 ranks: first render {record['first_render']['median']} ms median "
          f"(max {record['first_render']['max']}); long history {record['first_render_long_history']['median']} ms; "
          f"update {record['update']['dom']['median']} ms to the page, {record['update']['heatmap']['median']} ms "
          f"to the heatmap (max {record['update']['heatmap']['max']})")

    assert all(r["units_shown"] < 80 for r in renders)  # module groups: a few dozen units, not 2,002 nodes
    assert all(r["heatmap_rows_drawn"] < 80 for r in renders)  # the rows in view, not 1,802
    assert all(u["layers"] <= 2500 for u in updates)  # live.MAX_UPDATE_LAYERS
    assert record["first_render"]["median"] <= MARGIN * FIRST_RENDER_TARGET_MS, record["first_render"]
    assert record["first_render_long_history"]["median"] <= MARGIN * FIRST_RENDER_TARGET_MS
    assert record["update"]["dom"]["median"] <= MARGIN * UPDATE_TARGET_MS, record["update"]
    assert record["update"]["heatmap"]["median"] <= MARGIN * UPDATE_TARGET_MS, record["update"]


@pytest.mark.parametrize("case", ["2000-first-view", "2000-every-range-open", "gpt2-2-blocks", "gpt2-narrow"])
def test_no_two_topology_labels_overlap(runs, browser, case):
    cfg, _, _ = runs
    viewport = {"width": 1100, "height": 800} if case == "gpt2-narrow" else VIEWPORT
    page = open_run(browser, cfg, GPT2 if case.startswith("gpt2") else RUN, viewport=viewport)
    if case == "2000-every-range-open":
        page.page.evaluate("(() => { const g = gradwatch.topology; for (const u of g.tree.units.values()) "
                           "if (u.kind === 'range') u.open = true; g.draw(true); })()")
    count, overlaps = page.overlapping_labels()
    shown = page.page.evaluate("gradwatch.topology.visible().length")
    page.screenshot(f"topology-labels-{case}.png")
    expected = {"2000-every-range-open": 200, "gpt2-2-blocks": 25, "gpt2-narrow": 25}.get(case, 10)
    assert shown >= expected and count >= shown, (count, shown)
    assert overlaps == [], overlaps
    assert page.errors == [], page.errors
    page.page.close()


def test_a_closed_group_shows_its_worst_layer_and_opens_on_click(runs, browser):
    cfg, _, _ = runs
    page = open_run(browser, cfg, RUN)
    shown = [u[0] for u in page.page.evaluate("gradwatch.topology.visible()")]
    assert NAN_LAYER in shown  # the origin's groups open at load
    assert [NAN_LAYER, "nonfinite", "#ff1744"] in page.page.evaluate("gradwatch.topology.highlighted()")
    # Close the range that holds it: the closed group is red, marked, and says why in its tooltip.
    page.page.click("[data-frame='blocks[144–159]'] .frame-head")
    unit = "[data-uid='blocks[144–159]']"
    assert page.page.get_attribute(f"{unit} .sym", "fill") == "#ff1744"
    assert ["blocks[144–159]", "nonfinite", "#ff1744"] in page.page.evaluate("gradwatch.topology.highlighted()")
    page.page.hover(f"{unit} .sym")
    page.page.wait_for_selector(".topology-tip:not([hidden])")
    tip = page.page.inner_text(".topology-tip")
    assert "blocks.144–159" in tip and "160 layers" in tip and f"first: {NAN_LAYER}" in tip
    # A healthy closed group is coloured by its largest gradient norm, not red; a click opens it.
    closed = "[data-uid='blocks[16–31]']"
    assert page.page.get_attribute(f"{closed} .sym", "fill").startswith("rgb(")
    page.page.click(f"{closed} .sym")
    shown = [u[0] for u in page.page.evaluate("gradwatch.topology.visible()")]
    assert [f"blocks.{b}" for b in range(16, 32)] == [u for u in shown if u.startswith("blocks.") and "[" not in u
                                                      and 16 <= int(u.split(".")[1]) < 32]
    page.page.focus("[data-uid='blocks[32–47]']")  # units take the keyboard focus too: Enter opens a group
    page.page.keyboard.press("Enter")
    assert "blocks.40" in [u[0] for u in page.page.evaluate("gradwatch.topology.visible()")]
    count, overlaps = page.overlapping_labels()
    assert overlaps == [], overlaps
    assert page.errors == [], page.errors
    page.page.close()


def test_layer_search_from_the_keyboard_filters_topology_heatmap_and_table(runs, browser):
    cfg, _, _ = runs
    page = open_run(browser, cfg, RUN)
    p = page.page
    p.click("#heatmap")  # any focus outside a text box: '/' goes to the search
    p.keyboard.press("/")
    assert p.evaluate("document.activeElement.id") == "find"
    p.keyboard.type("v_proj")
    p.wait_for_function("gradwatch.heatmap.total === 200", timeout=10_000)  # one per block
    assert p.is_visible("#find-results")
    assert p.inner_text("#find-results th") == "200 layers"
    assert p.eval_on_selector_all("#find-results tr[data-layer]", "rs => rs.length") == 50  # the table is bounded
    assert "150 more" in p.inner_text("#find-results")
    assert p.evaluate("gradwatch.heatmap.layers.every(n => n.includes('v_proj'))")
    dimmed = p.eval_on_selector_all(".unit.dim", "us => us.length")
    ringed = p.eval_on_selector_all(".unit.match", "us => us.map(u => u.dataset.uid)")
    assert dimmed > 0 and NAN_LAYER in ringed and "embed" not in ringed
    p.keyboard.press("ArrowDown")
    p.keyboard.press("ArrowDown")
    assert p.get_attribute("#find", "aria-activedescendant") == "find-row-1"
    p.keyboard.press("Enter")
    assert p.evaluate("gradwatch.view.layer") == "blocks.1.attn.v_proj"
    assert "blocks.1.attn.v_proj" in [u[0] for u in p.evaluate("gradwatch.topology.visible()")]  # opened to it
    assert p.is_hidden("#find-results")
    p.keyboard.press("Escape")  # clears the search: everything back
    p.wait_for_function("gradwatch.heatmap.total === 1802", timeout=10_000)
    assert p.eval_on_selector_all(".unit.dim", "us => us.length") == 0
    count, overlaps = page.overlapping_labels()
    assert overlaps == [], overlaps
    assert page.errors == [], page.errors
    p.close()


def heatmap_page(browser, cfg) -> tuple[Page, list[int]]:
    """The 64-rank run's page, ready, and the first row (layer_offset) of each /heatmap request it makes."""
    page = Page(browser)
    windows: list[int] = []
    page.page.on("request", lambda r: "/heatmap?" in r.url and windows.append(int(r.url.split("layer_offset=")[1]
                                                                                       .split("&")[0])))
    page.page.goto(f"http://{cfg.aggregator_metrics_listen}/ui/#run={RUN}")
    page.page.wait_for_function("window.gradwatch && window.gradwatch.ready", timeout=30_000)
    return page, windows


def test_the_heatmap_draws_and_fetches_only_the_rows_in_view(runs, browser):
    page, windows = heatmap_page(browser, runs[0])
    drawn = page.page.evaluate("gradwatch.heatmap.drawnCells()")
    assert drawn["total"] == 1802 and 10 <= drawn["rows"] < 60 and drawn["steps"] >= STEPS
    assert set(windows) == {0}
    page.page.eval_on_selector(".hm-scroll", "s => { s.scrollTop = s.scrollHeight; }")
    page.page.wait_for_function("gradwatch.heatmap.layers.includes('head')", timeout=10_000)
    assert 1792 in windows and set(windows) <= {0, 1728, 1792}  # the last windows, nothing between
    assert page.page.evaluate("gradwatch.heatmap.drawnCells().rows") == drawn["rows"]
    page.screenshot("heatmap-2000-layers-bottom.png")
    assert page.errors == [], page.errors
    page.page.close()


def test_a_scroll_during_a_live_update_fetches_no_window_between(runs, browser):
    """A live update's fetch still out when the view scrolls far: once in, the windows in view now load, not
    every window between where the view was and where it is (a CI run fetched 27 windows so)."""
    page, windows = heatmap_page(browser, runs[0])
    windows.clear()
    page.page.evaluate("""async () => {
        const fetchNow = window.fetch;  // every answer 300 ms late: the update's is still out when the view moves
        window.fetch = (...args) => new Promise((done) => setTimeout(() => done(fetchNow(...args)), 300));
        const update = gradwatch.heatmap.refresh();
        const s = document.querySelector('.hm-scroll');
        s.scrollTop = s.scrollHeight;
        await update;
        await new Promise((done) => setTimeout(done, 1000));
    }""")
    page.page.wait_for_function("gradwatch.heatmap.layers.includes('head')", timeout=10_000)
    assert 0 in windows and 1792 in windows and set(windows) <= {0, 1728, 1792}, sorted(set(windows))
    assert page.errors == [], page.errors
    page.page.close()


def test_api_answers_stay_bounded_at_this_size(runs):
    cfg, _, _ = runs
    base = f"/api/v1/runs/{RUN}"
    layers = get(cfg, f"{base}/layers")
    assert len(layers["layers"]) == 1000 and layers["total"] == 1802 and layers["next"]  # the layers with tensors
    topology = get(cfg, f"{base}/topology")
    assert len(topology["nodes"]) == 2000 and topology["total"] == 2002 and topology["next"]
    steps = get(cfg, f"{base}/steps")  # per-layer norms: capped by cells, not by steps
    assert len(steps["steps"]) * 2 * 2002 <= 200_000 + 2 * 2 * 2002
    ranks = get(cfg, f"{base}/ranks")
    assert len(ranks["ranks"]) == 16 and ranks["total"] == WORLD and ranks["next"].endswith("offset=16")
    heatmap = get(cfg, f"{base}/heatmap")
    assert len(heatmap["layers"]) * len(heatmap["steps"]) <= 60_000 and heatmap["next"]
    one = get(cfg, base)
    assert len(one["layers"]) == 1000 and one["layers_total"] == 1802
