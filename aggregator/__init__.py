"""gradwatch.aggregator: reads report streams from Redis, keeps per-run state, evaluates alert rules,
serves Prometheus metrics and pushes alerts to Alertmanager. Run it with `python -m gradwatch.aggregator`.
"""

from __future__ import annotations

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.service import Aggregator

__all__ = ["Aggregator", "AggregatorConfig"]
