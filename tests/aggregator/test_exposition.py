"""The custom collector: families built at scrape time, registration in a dedicated registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gradwatch.aggregator.alert import Alert
from gradwatch.aggregator.exposition import AggregatorCollector, Snapshot
from gradwatch.aggregator.state import RunSnapshot

RUN = RunSnapshot("demo", 12, 0.5, None, 1e-3, 2.0, 3.5, 1_700_000_000.0,
                  (("fc1", 1.5, 10.0, (("gradient", 0), ("parameter", 2))), ("fc2", None, 3.0, ())))
FIRING = Alert("NonFinite", "firing", "demo", 12, 0, "fc1", "fc1.weight", 2.0, 0.0, "critical", "s", "t")


def registry_with(snapshot: Snapshot) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(lambda: snapshot))
    return registry


def test_families_from_a_snapshot():
    r = registry_with(Snapshot([RUN], [FIRING], {"reports": 7}, {"NonFinite": 1, "ExplodingGradient": 0}, 2))
    assert r.get_sample_value("gradwatch_run_step", {"run": "demo"}) == 12
    assert r.get_sample_value("gradwatch_run_eval_loss", {"run": "demo"}) is None
    assert r.get_sample_value("gradwatch_run_steps_per_second", {"run": "demo"}) == 3.5
    assert r.get_sample_value("gradwatch_layer_grad_norm", {"run": "demo", "layer": "fc2"}) is None
    assert r.get_sample_value("gradwatch_layer_param_norm", {"run": "demo", "layer": "fc2"}) == 3.0
    assert r.get_sample_value("gradwatch_layer_nonfinite_values",
                              {"run": "demo", "layer": "fc1", "kind": "parameter"}) == 2
    assert r.get_sample_value("gradwatch_alert_firing", {"run": "demo", "rule": "NonFinite", "layer": "fc1"}) == 1
    assert r.get_sample_value("gradwatch_aggregator_reports_total") == 7
    assert r.get_sample_value("gradwatch_aggregator_redis_errors_total") == 0
    assert r.get_sample_value("gradwatch_aggregator_alerts_total", {"rule": "ExplodingGradient"}) == 0
    assert r.get_sample_value("gradwatch_aggregator_layer_series") == 2
    assert b"# TYPE gradwatch_aggregator_series_dropped_total counter" in generate_latest(r)


def test_empty_state_exposes_only_self_metrics():
    r = registry_with(Snapshot())
    text = generate_latest(r).decode()
    assert "gradwatch_run_step{" not in text and "gradwatch_aggregator_duplicates_total 0.0" in text


def test_registering_twice_is_refused():
    collector = AggregatorCollector(Snapshot)
    registry = CollectorRegistry()
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(AggregatorCollector(Snapshot))
