"""Fixtures of the integration tests: `stack`, a whole stack (collector, aggregator, redis-server as processes) that
finds new runs quickly, for the tuner tests (test_optuna.py, test_ray_tune.py)."""

from __future__ import annotations

import pytest

from gradwatch.cli.redis_server import free_port
from gradwatch.cli.stack import Stack, StackConfig


@pytest.fixture
def stack(redis_url, monkeypatch):
    # A trial's run is new to the aggregator: look for new runs five times a second (default: once).
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_DISCOVER_INTERVAL_S", "0.2")
    cfg = StackConfig(redis_url=redis_url, collector_listen=f"127.0.0.1:{free_port()}",
                      collector_metrics_listen=f"127.0.0.1:{free_port()}",
                      aggregator_metrics_listen=f"127.0.0.1:{free_port()}", log_level="ERROR")
    with Stack(cfg):
        yield cfg
