"""What the live view's browser tests share: where screenshots go, finding Chromium (skipped without it, a
failure under GRADWATCH_REQUIRE_TOOLS=1: .ci/run installs Debian's chromium and the test extra has playwright),
a page that records every console error, and small polling helpers. The fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from gradwatch.cli.stack import StackConfig

REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = Path(os.environ.get("GRADWATCH_ARTIFACTS") or REPO / "test-artifacts") / "ui"
VIEWPORT = {"width": 1600, "height": 1000}


def require(what: str) -> None:
    message = f"{what} (.ci/run installs it)"
    if os.environ.get("GRADWATCH_REQUIRE_TOOLS", "") == "1":
        pytest.fail(f"{message}, and GRADWATCH_REQUIRE_TOOLS=1")
    pytest.skip(message)


def chromium_path() -> str | None:
    for candidate in (os.environ.get("GRADWATCH_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def get(cfg: StackConfig, path: str) -> dict:
    with urllib.request.urlopen(f"http://{cfg.aggregator_metrics_listen}{path}", timeout=10) as resp:
        return json.load(resp)["data"]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Page:
    """A page with every console error and uncaught exception recorded; `context`: open it in that browser
    context (its HTTP cache shared with the context's other pages), else in a new one."""

    def __init__(self, browser, context=None, viewport: dict | None = None):
        self.page = context.new_page() if context else browser.new_page(viewport=viewport or VIEWPORT)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        self.page.on("requestfailed", lambda r: "/api/v1/events" not in r.url
                     and self.errors.append(f"request failed: {r.url} {r.failure}"))

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path))
        return path

    def overlapping_labels(self) -> tuple[int, list]:
        """(labels drawn in the topology, pairs of them whose boxes on screen overlap), from
        getBoundingClientRect of every label, frame captions included."""
        return self.page.evaluate("""(() => {
          const boxes = gradwatch.topology.labelBoxes();
          const bad = [];
          for (let i = 0; i < boxes.length; i++) {
            const [a, al, at, ar, ab] = boxes[i];
            for (let j = i + 1; j < boxes.length; j++) {
              const [b, bl, bt, br, bb] = boxes[j];
              if (al < br && bl < ar && at < bb && bt < ab) bad.push([a, b]);
            }
          }
          return [boxes.length, bad.slice(0, 20)];
        })()""")
