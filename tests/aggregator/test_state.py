"""State: norms per layer, gauges that never move backwards, eval losses, rates, budget."""

from __future__ import annotations

import logging
import math

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.state import State
from gradwatch.v1 import report_pb2, run_pb2


@pytest.fixture
def state(build):
    s = State(AggregatorConfig(), Counters())
    s.register("demo", build.registration())
    return s


def test_layer_norms_sum_squares_of_the_layers_tensors(state, build):
    view = state.apply("demo", build.report(0, grad={"fc1": 3.0, "fc2": 4.0}, param=2.0))
    assert view.grad_norms["fc1"] == pytest.approx(3.0)
    assert view.global_grad_norm == pytest.approx(math.sqrt(9 + 16 + 1 + 1))
    (run,) = state.views()
    layers = {name: (g, p, dict(k)) for name, g, p, k in run.layers}
    assert layers["fc2"] == (pytest.approx(4.0), pytest.approx(2.0), {"parameter": 0, "gradient": 0, "activation": 0})


def test_a_late_report_does_not_move_gauges_backwards(state, build):
    state.apply("demo", build.report(10, loss=1.0, grad=5.0))
    state.apply("demo", build.report(9, loss=9.0, grad=50.0))
    (run,) = state.views()
    assert (run.step, run.loss) == (10, 1.0)
    assert dict((n, g) for n, g, _, _ in run.layers)["fc1"] == pytest.approx(5.0)


def test_eval_loss_is_kept_apart(state, build):
    state.apply("demo", build.report(5, loss=1.0))
    state.apply("demo", build.report(5, seq=100, loss=2.5, phase=report_pb2.PHASE_EVAL))
    (run,) = state.views()
    assert (run.loss, run.eval_loss) == (1.0, 2.5)


def test_steps_per_second_from_capture_times(state, build):
    for step in range(0, 50, 10):
        state.apply("demo", build.report(step, t=1000.0 + step / 4))
    (run,) = state.views()
    assert run.steps_per_second == pytest.approx(4.0)


def test_stale_registration_is_ignored(state, build):
    state.register("demo", build.registration(start_s=1_600_000_000.0))
    assert state.runs["demo"].ranks[0].start_ns == int(1_700_000_000.0 * 1e9)


def test_failed_registration_lookup_is_retried(build):
    calls = []

    def fetch(run, rank):
        calls.append(rank)
        if len(calls) == 1:
            raise ConnectionError("redis down")
        return build.registration().SerializeToString()

    s = State(AggregatorConfig(), Counters(), fetch)
    s.apply("demo", build.report(0))
    view = s.apply("demo", build.report(1))
    assert calls == [0, 0] and "fc2" in view.grad_norms
    s.apply("demo", build.report(2))
    assert calls == [0, 0]  # once known, never asked again


def test_an_origin_only_report_moves_the_step_and_keeps_the_tensor_gauges(state, build):
    """A step that was not due, sent for its NaN/Inf origin: no tensors, a loss, one origin."""
    state.apply("demo", build.report(10, loss=1.0, grad=5.0))
    view = state.apply("demo", build.report(11, loss=math.nan, tensors=False, origins={"forward": "fc1"}))
    assert view.origins[0].direction == "forward" and view.origins[0].module == "fc1"
    assert (view.origins[0].observed, view.origins[0].count, view.nonfinite, view.by_kind) == ("fc1:output", 7, [], {})
    assert view.global_grad_norm is None and view.grad_norms == {}
    (run,) = state.views()
    assert run.step == 11 and math.isnan(run.loss)
    assert run.grad_norm == pytest.approx(10.0)  # the last gradients' norm stays: this step had none
    assert dict((n, g) for n, g, _, _ in run.layers)["fc1"] == pytest.approx(5.0)
    assert len(run.tensors[run_pb2.TENSOR_KIND_PARAMETER]) == 4  # the latest summaries: step 10's
    state.apply("demo", build.report(9, seq=50, tensors=False, origins={"backward": "fc2"}))  # late: no step back
    assert state.views()[0].step == 11


def test_an_origin_of_an_unknown_direction_is_skipped(state, build):
    report = build.report(3, tensors=False, origins={"forward": "fc1"})
    report.nonfinite_origins.add(direction=7, module="fc2", observed="fc2:output", nonfinite_count=1)
    assert [o.module for o in state.apply("demo", report).origins] == ["fc1"]


def test_layers_beyond_the_series_budget_are_counted_and_logged_once_per_run(build, caplog):
    counters = Counters()
    s = State(AggregatorConfig(max_layer_series=3), counters)
    with caplog.at_level(logging.WARNING, logger="gradwatch.aggregator"):
        for run in ("first", "second"):
            s.register(run, build.registration(run=run))
            for step in range(3):
                s.apply(run, build.report(step, run=run))
    assert counters.get("series_dropped") == 3 * 1 + 3 * 4  # first: 1 of 4 layers a report; second: all 4
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["run first", "run second"]
    assert "max_layer_series (3)" in lines[0]
