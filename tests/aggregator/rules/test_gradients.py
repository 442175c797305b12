"""Rule tables for the gradient-norm rules: sequences of reports in, alert transitions out (no Redis: rules are
pure). NonFinite's are in test_nonfinite.py."""

from __future__ import annotations

import math
import random

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.state import State

LAYERS = ("embed", "fc1", "fc2", "head")
F, R = "firing", "resolved"
XG = "ExplodingGradient"


def steady(step: int, layer: str) -> float:
    """Healthy training: each layer's norm wobbles ±20 % around its own level."""
    return (1.0 + LAYERS.index(layer) * 0.5) * (1 + 0.2 * math.sin(step * 0.7 + LAYERS.index(layer)))


def flat(step: int, layer: str) -> float:
    return 1.0


def warmup(step: int, layer: str) -> float:
    """The first steps of training: erratic norms over four orders of magnitude, then steady."""
    early = [40.0, 0.05, 300.0, 2.0, 0.2, 90.0, 6.0, 0.6]
    return early[step] * (1 + LAYERS.index(layer)) if step < len(early) else steady(step, layer)


def drift(step: int, layer: str) -> float:
    """Norms that grow fivefold over 200 steps: slow change is not an explosion."""
    return steady(step, layer) * (1 + 4 * step / 200)


def spikes(base, at: dict[int, dict[str, float]]):
    """`base` with the norms of some layers multiplied at some steps."""
    return lambda step, layer: base(step, layer) * at.get(step, {}).get(layer, 1.0)


def run_rules(build, steps: int, grad=steady, nonfinite=None, loss=None, config=None):
    # Reports are 0.1 s apart here: keep_firing_s is tested on its own below.
    config = config or AggregatorConfig(keep_firing_s=0)
    counters = Counters()
    state, engine = State(config, counters), RuleEngine(config, counters)
    state.register("demo", build.registration())
    alerts = []
    for step in range(steps):
        report = build.report(step, grad={layer: grad(step, layer) for layer in LAYERS},
                              nonfinite=(nonfinite or {}).get(step), loss=(loss or {}).get(step, 0.5))
        view = state.apply("demo", report)
        alerts.extend(engine.evaluate(view))
    return alerts, engine, counters


EXPLODING = [
    pytest.param(200, steady, [], id="steady training"),
    pytest.param(120, warmup, [], id="warm-up noise in the first steps"),
    pytest.param(200, drift, [], id="slow fivefold drift"),
    pytest.param(60, spikes(steady, {3: {"fc2": 100}}), [], id="100x during warm-up, under the absolute limit"),
    pytest.param(60, spikes(steady, {30: {"fc2": 100}}), [(30, F, XG, "fc2"), (35, R, XG, "fc2")], id="100x spike"),
    pytest.param(60, spikes(steady, {30: {"fc1": 50, "fc2": 200}}), [(30, F, XG, "fc2"), (35, R, XG, "fc2")],
                 id="two layers: the larger ratio is named"),
    pytest.param(60, spikes(flat, {30: {"fc1": 100, "fc2": 100}}), [(30, F, XG, "fc2"), (35, R, XG, "fc2")],
                 id="tie: the first in backward order is named"),
    pytest.param(20, spikes(steady, {0: {"fc1": 1e4}}), [(0, F, XG, "fc1"), (5, R, XG, "fc1")],
                 id="absolute limit from the first step"),
    pytest.param(20, spikes(flat, {s: dict.fromkeys(LAYERS, 6e3) for s in range(3)}),
                 [(0, F, XG, "(global)"), (7, R, XG, "(global)")], id="global norm over the limit, no layer over it"),
    pytest.param(120, spikes(steady, {30: {"fc2": 100}, 32: {"fc2": 100}, 34: {"fc2": 100}, 50: {"fc2": 100},
                                      90: {"fc2": 100}}),
                 [(30, F, XG, "fc2"), (39, R, XG, "fc2"), (90, F, XG, "fc2"), (95, R, XG, "fc2")],
                 id="hysteresis and cooldown: flapping is one incident"),
    pytest.param(80, spikes(steady, {s: {"fc2": 100} for s in range(30, 45)}), [(30, F, XG, "fc2"), (49, R, XG, "fc2")],
                 id="sustained explosion: one alert until it ends"),
]


@pytest.mark.parametrize(("steps", "grad", "expected"), EXPLODING)
def test_exploding_gradient(build, steps, grad, expected):
    alerts, _, _ = run_rules(build, steps, grad=grad)
    assert [(a.step, a.status, a.rule, a.layer) for a in alerts] == expected


def test_exploding_alert_fields(build):
    alerts, _, _ = run_rules(build, 60, grad=spikes(flat, {30: {"fc2": 540}}))
    firing = alerts[0]
    assert firing.severity == "warning" and firing.value == pytest.approx(540) and firing.threshold == pytest.approx(10)
    assert firing.summary == ("Gradient norm of layer fc2 is 5.4e+02 at step 30, 540x its median of 1 over the "
                              "last 30 steps (run demo, rank 0)")


def test_exploding_over_1000x_is_critical(build):
    alerts, _, _ = run_rules(build, 40, grad=spikes(flat, {30: {"fc1": 5000}}))
    assert alerts[0].severity == "critical" and "5000x" in alerts[0].summary


def test_nan_norm_and_eval_steps_do_not_break_exploding(build):
    config = AggregatorConfig()
    state, engine = State(config, Counters()), RuleEngine(config)
    state.register("demo", build.registration())
    for step in range(30):
        engine.evaluate(state.apply("demo", build.report(step, grad=math.nan if step == 15 else 1.0)))
        eval_report = build.report(step, seq=1000 + step, phase=2)
        del eval_report.tensors[:]
        assert engine.evaluate(state.apply("demo", eval_report)) == []
    assert engine.firing() == []


def test_a_short_incident_keeps_firing_for_keep_firing_s(build):
    """A blow-up over within a second must still reach Alertmanager's next notification."""
    config = AggregatorConfig(keep_firing_s=300)
    state, engine = State(config, Counters()), RuleEngine(config)
    state.register("demo", build.registration())
    alerts = []
    for step in range(40):  # 0.1 s apart: the whole run lasts 4 s
        nan = {("fc1", "gradient"): 1} if step == 20 else None
        alerts.extend(engine.evaluate(state.apply("demo", build.report(step, nonfinite=nan))))
    assert [(a.step, a.status) for a in alerts] == [(20, F)]
    late = engine.evaluate(state.apply("demo", build.report(40, t=1_700_000_000.0 + 2 + 300)))
    assert [(a.step, a.status) for a in late] == [(40, R)]


@pytest.mark.parametrize("size", [1, 2, 5, 50])
def test_exploding_window_minimum_matches_the_window(size):
    """The running minimum that spares ExplodingGradient a median per norm, on ties and constants too."""
    from gradwatch.aggregator.rules.gradients import _Window

    rng = random.Random(size)
    window, seen = _Window(size), []
    for i in range(3000):
        value = rng.choice([rng.random(), 1.0, 0.5, float(i % 7), math.inf])
        window.append(value)
        seen.append(value)
        assert window.low == min(seen[-size:])
