"""The live view in a real headless Chromium against a real aggregator that has a read token and an API
token: the token taken once from the address (then gone from it) or asked for on the first refusal, every
request and the event stream sending it as a header, and a snapshot request asking for the API token.

Skipped where Chromium or Playwright is missing, a failure instead under GRADWATCH_REQUIRE_TOOLS=1."""

from __future__ import annotations

import os
import shutil

import pytest

from gradwatch.aggregator.http.server import serve
from gradwatch.aggregator.http.snapshots import SnapshotStore
from gradwatch.aggregator.http.views import alert_log
from gradwatch.streams import snapshot_requests_key

pytestmark = pytest.mark.e2e

READ = "read-token-0123456789"
API = "api-token-0123456789"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing") if os.environ.get("GRADWATCH_REQUIRE_TOOLS") == "1" else \
            pytest.skip("playwright is not installed (the test extra has it)")
    path = next((found for name in (os.environ.get("GRADWATCH_CHROMIUM"), "chromium", "chromium-browser",
                                    "google-chrome") if name and (found := shutil.which(name))), None)
    if path is None:
        pytest.fail("no Chromium") if os.environ.get("GRADWATCH_REQUIRE_TOOLS") == "1" else \
            pytest.skip("Chromium is not installed (Debian package chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def live(make_aggregator, build, publish, run_all, redis_client):
    """Run "demo" on an aggregator with both tokens; yields (base URL, publish-and-apply a step)."""
    publish.registration(build.registration())
    publish.report(build.report(0))
    agg = make_aggregator()
    run_all(agg)
    server, thread = serve("127.0.0.1", 0, agg.registry, agg.view, history=agg.history, topology=agg.topology,
                           alert_log=lambda run: alert_log(redis_client, run), frames=agg.frames,
                           snapshots=SnapshotStore(agg.client), read_token=READ, api_token=API, live_tick_s=0.05)

    def step(n: int) -> None:
        publish.report(build.report(n))
        run_all(agg)

    yield f"http://127.0.0.1:{server.server_port}", step
    server.shutdown()
    server.server_close()
    thread.join(5)


def open_page(browser, url: str, answers: list[str]):
    """A page that answers its prompts with `answers` in turn; returns (page, prompts seen, requests made)."""
    page = browser.new_page()
    prompts: list[str] = []
    requests: list[tuple[str, str, str | None]] = []

    def dialog(d):
        prompts.append(d.message)
        d.accept(answers.pop(0)) if answers else d.dismiss()

    page.on("dialog", dialog)
    page.on("request", lambda r: "/api/" in r.url and requests.append(
        (r.method, r.url.split("/api/", 1)[1], r.headers.get("authorization"))))
    page.goto(url)
    page.wait_for_function("window.gradwatch && window.gradwatch.ready", timeout=20_000)
    return page, prompts, requests


def test_a_token_in_the_address_is_kept_sent_as_a_header_and_removed(browser, live):
    base, step = live
    page, prompts, requests = open_page(browser, f"{base}/ui/#run=demo&token={READ}", [])
    try:
        assert prompts == []
        assert page.evaluate("location.hash") == "#run=demo"  # the token left the address (and its history)
        assert page.evaluate("sessionStorage.getItem('gradwatch.readToken')") == READ
        page.wait_for_function("document.getElementById('connection').textContent === 'live'", timeout=10_000)
        step(1)
        page.wait_for_function("window.gradwatch.view.lastStep === 1", timeout=10_000)  # an event arrived
        assert requests and all(auth == f"Bearer {READ}" for _, _, auth in requests), requests
        assert any(path.startswith("v1/events") for _, path, _ in requests)
        assert not any(READ in path for _, path, _ in requests)  # never in a URL
    finally:
        page.close()


def test_without_a_token_the_page_asks_once_then_a_snapshot_asks_for_the_api_token(browser, live, redis_client):
    base, _ = live
    page, prompts, _ = open_page(browser, f"{base}/ui/#run=demo", [READ, API])
    try:
        assert len(prompts) == 1 and "read token" in prompts[0]  # one prompt for all the refused reads
        page.fill("#find", "fc2")
        page.press("#find", "Enter")
        page.select_option("#snapshot-kind", "weight_heatmap")
        page.click("#snapshot")
        page.wait_for_function("document.querySelector('#snapshot-panel .status').textContent.includes('pending')",
                               timeout=10_000)
        assert len(prompts) == 2 and "API token" in prompts[1]  # the read token was refused for a write
        assert page.evaluate("sessionStorage.getItem('gradwatch.apiToken')") == API
        assert redis_client.llen(snapshot_requests_key("demo")) == 1
    finally:
        page.close()
