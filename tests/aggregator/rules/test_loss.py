"""Rule tables for the loss rules, and StalledTraining's time-driven path (no Redis)."""

from __future__ import annotations

import math
import time

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.state import State
from gradwatch.v1 import report_pb2

F, R = "firing", "resolved"


def noisy(level: float = 2.0, amplitude: float = 0.1):
    """Per-batch loss noise around a level (deterministic)."""
    return lambda s: level + amplitude * math.sin(s * 1.7) * math.cos(s * 0.3)


def with_spikes(base, at: dict[int, float]):
    return lambda s: base(s) * at.get(s, 1.0)


def first_steps(s: int) -> float:
    """The fast fall of the first steps: 10 -> 2 with noise."""
    return 2 + 8 * math.exp(-s / 15) + 0.1 * math.sin(s)


def warmup_bump(s: int) -> float:
    """Loss rising 1.8x while the learning rate reaches its peak, then recovering."""
    return noisy()(s) * (1.8 if 30 <= s < 40 else 1.0)


LOSS_SPIKE = [
    pytest.param(with_spikes(noisy(), {60: 5.0}), [(60, F), (65, R)], id="5x spike"),
    pytest.param(with_spikes(noisy(), {60: 5.0, 62: 5.0, 70: 5.0}), [(60, F), (67, R)],
                 id="flapping: one incident, a recurrence within the cooldown is suppressed"),
    pytest.param(with_spikes(noisy(), {10: 5.0}), [], id="spike before min_history"),
    pytest.param(first_steps, [], id="the fast fall of the first steps"),
    pytest.param(warmup_bump, [], id="learning-rate warm-up bump 1.8x"),
    pytest.param(noisy(2.0, 1.0), [], id="per-batch noise of +-50 %"),
    pytest.param(with_spikes(lambda s: -1.0, {60: -10.0}), [], id="negative loss: no ratio"),
    pytest.param(with_spikes(noisy(), {60: math.nan}), [], id="NaN loss is NonFinite's"),
]


@pytest.mark.parametrize(("loss", "expected"), LOSS_SPIKE)
def test_loss_spike(scenario, loss, expected):
    assert [(s, st) for s, st, _, _ in scenario(100, loss=loss, rule="LossSpike")] == expected


def test_loss_spike_alert_fields(scenario):
    scenario(70, loss=with_spikes(lambda s: 2.0, {60: 5.0}))
    a = next(a for a in scenario.alerts if a.rule == "LossSpike")
    assert (a.layer, a.tensor, a.value, a.threshold, a.severity) == ("(loss)", "loss", 10.0, 6.0, "warning")
    assert a.summary == ("Loss spiked to 10 at step 60, 5.0x its median of 2 over the last 50 reports "
                         "(run demo, rank 0)")


def plateau_after(step: int, level: float = 2.0):
    """Falls linearly to `level` at `step`, then stays there with noise."""
    return lambda s: max(level, level + 3 * (step - s) / step) + 0.05 * math.sin(s * 1.3)


NOT_DECREASING = [
    pytest.param(plateau_after(300), 1500, [(1308, F)], id="plateau from step 300"),
    pytest.param(lambda s: plateau_after(300)(s) - (0.5 if s >= 1400 else 0), 1500, [(1308, F), (1404, R)],
                 id="plateau, then a drop resolves it"),
    pytest.param(lambda s: 3 * (1 + s) ** -0.1 + 0.05 * math.sin(s * 1.3), 3000, [], id="slow power-law decline"),
    pytest.param(lambda s: 5.0 if s < 800 else 5 - (s - 800) / 400, 1500, [], id="flat for 800 steps of warm-up"),
    pytest.param(first_steps, 900, [], id="converging fast, shorter than the window"),
]


@pytest.mark.parametrize(("loss", "steps", "expected"), NOT_DECREASING)
def test_loss_not_decreasing(scenario, loss, steps, expected):
    config = AggregatorConfig(keep_firing_s=0)
    assert [(s, st) for s, st, _, _ in scenario(steps, loss=loss, rule="LossNotDecreasing", config=config,
                                                tensors=lambda *_: {"count": None})] == expected


def test_restart_from_a_checkpoint_starts_over(scenario):
    """Steps going backwards: the window restarts instead of counting from the old reference."""
    config = AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config)
    fired = []
    for step in list(range(0, 900)) + list(range(500, 1300)):
        r = report_pb2.StepReport(run_id="demo", rank=0, step=step, sequence=len(fired) + 1, loss=2.0,
                                  phase=report_pb2.PHASE_TRAIN)
        fired.append([a.rule for a in engine.evaluate(state.apply("demo", r))])
    assert not any("LossNotDecreasing" in f for f in fired[:1700])


def stalled_setup(**config):
    config = AggregatorConfig(keep_firing_s=0, **config)
    state, engine = State(config, Counters()), RuleEngine(config)
    return state, engine


def report(step: int, rank: int = 0, run: str = "demo") -> report_pb2.StepReport:
    return report_pb2.StepReport(run_id=run, rank=rank, step=step, sequence=step + 1, loss=1.0)


def test_stalled_training_fires_once_and_resolves_on_the_next_report(monkeypatch):
    state, engine = stalled_setup()
    for step in range(10):
        engine.evaluate(state.apply("demo", report(step)))
    now = time.time()
    assert engine.evaluate_idle(now + 60) == []  # a checkpoint save: quiet
    (a,) = engine.evaluate_idle(now + 1900)
    assert (a.rule, a.status, a.run, a.step, a.rank, a.layer, a.threshold, a.severity) == (
        "StalledTraining", F, "demo", 9, 0, "(run)", 1800.0, "warning")
    assert a.value == pytest.approx(1900, abs=5) and "no report from run demo for 19" in a.summary
    assert engine.evaluate_idle(now + 2000) == []  # one incident, one alert
    monkeypatch.setattr(time, "time", lambda: now + 2100)  # the report arrives later on this clock
    (resolved,) = [x for x in engine.evaluate(state.apply("demo", report(10, rank=1))) if x.rule == "StalledTraining"]
    assert (resolved.status, resolved.step) == (R, 10) and "reports again" in resolved.summary
    assert engine.firing() == []


def test_a_run_that_ended_cleanly_is_not_stalled():
    """The agent's end-of-run marker (StepReport.final) ends the watch; it is no evidence for other rules."""
    state, engine = stalled_setup()
    for step in range(10):
        engine.evaluate(state.apply("demo", report(step)))
    final = report_pb2.StepReport(run_id="demo", rank=0, step=9, sequence=11, final=True)
    assert engine.evaluate(state.apply("demo", final)) == []
    assert engine.evaluate_idle(time.time() + 1e5) == []
    assert state.views()[0].loss == 1.0  # the marker carries no loss and changes no gauge


def test_stalled_training_watches_each_run_and_forgets_expired_ones():
    state, engine = stalled_setup()
    engine.evaluate(state.apply("a", report(0, run="a")))
    engine.evaluate(state.apply("b", report(0, run="b")))
    now = time.time()
    engine.forget("b")
    assert [a.run for a in engine.evaluate_idle(now + 3000)] == ["a"]


def test_an_aggregator_that_saw_no_report_raises_nothing():
    _, engine = stalled_setup()
    assert engine.evaluate_idle(time.time() + 1e6) == []
