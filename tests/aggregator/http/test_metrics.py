"""The custom collector: families built at scrape time, registration in a dedicated registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.counters import COUNTERS, Counters
from gradwatch.aggregator.http.metrics import (
    MAX_HYPERPARAMETER_TEXT,
    MAX_HYPERPARAMETERS,
    AggregatorCollector,
    AggregatorView,
)
from gradwatch.aggregator.runstate import RunView

RUN = RunView("demo", 12, 0.5, None, 1e-3, 2.0, 3.5, 1_700_000_000.0,
                  (("fc1", 1.5, 10.0, (("gradient", 0), ("parameter", 2))), ("fc2", None, 3.0, ())))
FIRING = Alert("NonFinite", "firing", "demo", 12, 0, "fc1", "fc1.weight", 2.0, 0.0, "critical", "s", "t")


def registry_with(snapshot: AggregatorView) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(lambda: snapshot))
    return registry


def test_families_from_a_snapshot():
    r = registry_with(AggregatorView([RUN], [FIRING], {"reports": 7}, {"NonFinite": 1, "ExplodingGradient": 0}, 2))
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
    r = registry_with(AggregatorView())
    text = generate_latest(r).decode()
    assert "gradwatch_run_step{" not in text and "gradwatch_aggregator_duplicates_total 0.0" in text


def test_every_counter_is_exported_with_its_help_text():
    counts = {name: i for i, name in enumerate(Counters.NAMES)}
    text = generate_latest(registry_with(AggregatorView(counters=counts))).decode()
    for name, help_text in COUNTERS.items():
        assert f"# HELP gradwatch_aggregator_{name}_total {help_text}\n" in text
        assert f"gradwatch_aggregator_{name}_total {float(counts[name])}\n" in text


def test_registering_twice_is_refused():
    collector = AggregatorCollector(AggregatorView)
    registry = CollectorRegistry()
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(AggregatorCollector(AggregatorView))


def test_hyperparameters_of_a_registration(build, publish, make_aggregator, run_all):
    """Numbers and booleans as gauges, text as bounded info series, at most MAX_HYPERPARAMETERS per run."""
    reg = build.registration(run="sweep-1")
    reg.hyperparameters["lr"].number = 0.1
    reg.hyperparameters["batch_size"].integer = 64
    reg.hyperparameters["amp"].flag = True
    reg.hyperparameters["optimizer"].text = "adamw-" + "x" * 100
    reg.hyperparameters["unset"].SetInParent()
    for i in range(MAX_HYPERPARAMETERS + 8):
        reg.hyperparameters[f"z{i:02d}"].integer = i
    publish.registration(reg)
    publish.report(build.report(0, run="sweep-1"))
    agg = make_aggregator()
    run_all(agg)
    get = agg.registry.get_sample_value
    assert get("gradwatch_run_hyperparameter", {"run": "sweep-1", "name": "lr"}) == 0.1
    assert get("gradwatch_run_hyperparameter", {"run": "sweep-1", "name": "batch_size"}) == 64
    assert get("gradwatch_run_hyperparameter", {"run": "sweep-1", "name": "amp"}) == 1
    assert get("gradwatch_run_hyperparameter", {"run": "sweep-1", "name": "optimizer"}) is None
    assert get("gradwatch_run_hyperparameter_info", {"run": "sweep-1", "name": "optimizer",
                                                     "value": ("adamw-" + "x" * 100)[:MAX_HYPERPARAMETER_TEXT]}) == 1
    families = {f.name: f for f in agg.registry.collect()}
    samples = families["gradwatch_run_hyperparameter"].samples + families["gradwatch_run_hyperparameter_info"].samples
    assert len(samples) == MAX_HYPERPARAMETERS - 1  # "unset" counts towards the cap but has no series
    assert {s.labels["name"] for s in samples} >= {"lr", "batch_size", "amp", "optimizer", "z00"}
