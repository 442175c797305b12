"""Per-rank pace: seconds per step from capture times, over a real State, and its two families on /metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.http.metrics import AggregatorCollector, AggregatorView
from gradwatch.aggregator.pace import RankPace, rank_paces, seconds_per_step
from gradwatch.aggregator.state import State
from gradwatch.v1 import report_pb2
from tests.fixtures.aggregator import T0

PACES = [
    pytest.param([], None, id="no report"),
    pytest.param([(T0, 3)], None, id="one report"),
    pytest.param([(T0, 0), (T0 + 0.5, 1), (T0 + 1.0, 2)], 0.5, id="every step"),
    pytest.param([(T0, 0), (T0 + 2.0, 10), (T0 + 4.0, 20)], 0.2, id="every 10th step: time over steps"),
    pytest.param([(T0 + 1.0, 0), (T0, 5)], None, id="capture times going backwards (an agent's clock jumped)"),
]


@pytest.mark.parametrize(("recent", "expected"), PACES)
def test_seconds_per_step(recent, expected):
    assert seconds_per_step(recent) == (pytest.approx(expected) if expected is not None else None)


def report(rank: int, step: int, t: float, phase: int = report_pb2.PHASE_TRAIN) -> report_pb2.StepReport:
    r = report_pb2.StepReport(run_id="demo", rank=rank, step=step, sequence=step + 1, phase=phase)
    r.capture_time.FromNanoseconds(int(t * 1e9))
    return r


def test_rank_paces_over_the_state_last_training_reports_only():
    state = State(AggregatorConfig(), Counters())
    for step in range(30):  # rank 0: 0.1 s a step; rank 1: 0.3 s a step
        state.apply("demo", report(0, step, T0 + 0.1 * step))
        state.apply("demo", report(1, step, T0 + 0.3 * step))
    state.apply("demo", report(1, 29, T0 + 100, phase=report_pb2.PHASE_EVAL))  # an evaluation: no pace
    state.apply("demo", report(2, 0, T0 + 5))
    (paces,) = rank_paces(state).values()
    assert [(p.rank, p.last_capture) for p in paces] == [(0, pytest.approx(T0 + 2.9)), (1, pytest.approx(T0 + 8.7)),
                                                         (2, T0 + 5)]
    assert [p.seconds_per_step for p in paces] == [pytest.approx(0.1), pytest.approx(0.3), None]


def test_rank_families_on_metrics():
    paces = {"demo": (RankPace(0, 0.1, T0 + 9.0), RankPace(1, 0.25, T0 + 4.0), RankPace(2, None, T0 + 12.0))}
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(lambda: AggregatorView(ranks=paces, now=T0 + 10.0)))
    value = registry.get_sample_value
    assert value("gradwatch_rank_step_seconds", {"run": "demo", "rank": "1"}) == 0.25
    assert value("gradwatch_rank_step_seconds", {"run": "demo", "rank": "2"}) is None  # no pace yet
    assert value("gradwatch_rank_report_lag_seconds", {"run": "demo", "rank": "0"}) == 1.0
    assert value("gradwatch_rank_report_lag_seconds", {"run": "demo", "rank": "1"}) == 6.0
    assert value("gradwatch_rank_report_lag_seconds", {"run": "demo", "rank": "2"}) == 0.0  # its clock is ahead
