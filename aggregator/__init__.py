"""gradwatch.aggregator: reads report streams from Redis, keeps per-run state, evaluates alert rules,
serves Prometheus metrics and pushes alerts to Alertmanager. Run it with `python -m gradwatch.aggregator`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwatch.aggregator.config import AggregatorConfig

if TYPE_CHECKING:
    from gradwatch.aggregator.service import Aggregator

__all__ = ["Aggregator", "AggregatorConfig"]


def __getattr__(name: str):
    # The service (Redis, rules, HTTP) loads on first use: `python -m gradwatch.aggregator` refuses a bad
    # setting before paying for it.
    if name == "Aggregator":
        from gradwatch.aggregator.service import Aggregator

        return Aggregator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
