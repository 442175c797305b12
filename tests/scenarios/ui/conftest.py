"""Fixtures of the live view's browser tests: one headless Chromium per module (Playwright), and a real stack
(an embedded-style redis-server, the collector and the aggregator as processes) per module."""

from __future__ import annotations

import pytest

from gradwatch.cli.redis_server import RedisServer, free_port
from gradwatch.cli.stack import Stack, StackConfig
from tests.scenarios.ui.pages import chromium_path, require


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("playwright is not installed (the test extra has it)")
    path = chromium_path()
    if path is None:
        require("Chromium is not installed (Debian package chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(StackConfig, Redis URL) of a stack that lives as long as the test module."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        cfg = StackConfig(redis_url=server.url, collector_listen=f"127.0.0.1:{free_port()}",
                          collector_metrics_listen=f"127.0.0.1:{free_port()}",
                          aggregator_metrics_listen=f"127.0.0.1:{free_port()}")
        with Stack(cfg):
            yield cfg, server.url
