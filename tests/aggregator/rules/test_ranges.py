"""OutOfRange (aggregator/rules/ranges.py): ranges stored in a real Redis, read by the rule through the engine's
client; fires when a step's value leaves its range, names the metric farthest outside, resolves when back."""

from __future__ import annotations

import math

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.ranges import RangeStore, make_range
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.rules.ranges import OutOfRange
from gradwatch.aggregator.state import State
from gradwatch.v1 import report_pb2

EVAL = report_pb2.PHASE_EVAL


def run_steps(build, client, ranges: dict, steps: list[dict], config: AggregatorConfig | None = None) -> list[tuple]:
    """Stores `ranges` (metric -> (min, max)), then applies a report per entry of `steps` (loss, grad per layer,
    param per layer, accuracy, phase); returns OutOfRange's transitions as (step, status, layer, tensor)."""
    store = RangeStore(client)
    for metric, (lo, hi) in ranges.items():
        store.set("demo", make_range(metric, lo, hi))
    config = config or AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config, client=client)
    state.register("demo", build.registration())
    out = []
    for step, s in enumerate(steps):
        r = build.report(step, loss=s.get("loss", 0.5), grad=s.get("grad", 1.0), param=s.get("param", 10.0),
                         phase=s.get("phase", report_pb2.PHASE_TRAIN))
        if "accuracy" in s:
            r.scalars["accuracy"] = s["accuracy"]
        out += [(a.step, a.status, a.layer, a.tensor) for a in engine.evaluate(state.apply("demo", r))
                if a.rule == OutOfRange.name]
    return out


CASES = {
    "loss leaves and comes back": (
        {"loss": (0, 10)}, [{"loss": 1}, {"loss": 12}, {"loss": 11}, {"loss": 3}],
        [(1, "firing", "(loss)", "loss"), (3, "resolved", "(loss)", "loss")]),
    "NaN is outside every range": (
        {"loss": (None, 10)}, [{"loss": 1}, {"loss": math.nan}, {"loss": 2}],
        [(1, "firing", "(loss)", "loss"), (2, "resolved", "(loss)", "loss")]),
    "bounds are included": (
        {"loss": (0, 10)}, [{"loss": 0}, {"loss": 10}], []),
    "a layer's gradient norm": (
        {"grad_norm/fc2": (None, 5)}, [{"grad": {"fc2": 4}}, {"grad": {"fc2": 6}}, {"grad": {"fc2": 5}}],
        [(1, "firing", "fc2", "grad_norm/fc2"), (2, "resolved", "fc2", "grad_norm/fc2")]),
    "a layer's parameter norm": (
        {"param_norm/head": (5, 20)}, [{"param": 10}, {"param": {"head": 30}}],
        [(1, "firing", "head", "param_norm/head")]),
    "the global gradient norm": (
        {"grad_norm": (None, 3)}, [{"grad": 1}, {"grad": 2}], [(1, "firing", "(global)", "grad_norm")]),
    "a user scalar": (
        {"accuracy": (0.5, 1)}, [{"accuracy": 0.7}, {"accuracy": 0.2}, {}, {"accuracy": 0.9}],
        [(1, "firing", "(run)", "accuracy"), (3, "resolved", "(run)", "accuracy")]),  # step 2: no evidence
    "evaluation loss only in evaluation steps": (
        {"eval_loss": (None, 1)}, [{"loss": 5}, {"loss": 5, "phase": EVAL}, {"loss": 0.5, "phase": EVAL}],
        [(1, "firing", "(loss)", "eval_loss"), (2, "resolved", "(loss)", "eval_loss")]),
    "the farthest outside is named": (
        {"loss": (0, 10), "grad_norm/fc1": (None, 1)}, [{"loss": 11, "grad": {"fc1": 4}}],
        [(0, "firing", "fc1", "grad_norm/fc1")]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_out_of_range(case, build, redis_client):
    ranges, steps, want = CASES[case]
    assert run_steps(build, redis_client, ranges, steps) == want


def test_resolves_only_when_every_metric_is_back(build, redis_client):
    steps = [{"loss": 11, "accuracy": 0.1}, {"loss": 1, "accuracy": 0.1}, {"loss": 1, "accuracy": 0.8}]
    assert run_steps(build, redis_client, {"loss": (0, 10), "accuracy": (0.5, 1)}, steps) == [
        (0, "firing", "(run)", "accuracy"), (2, "resolved", "(run)", "accuracy")]


def test_summary_names_value_range_and_the_rest(build, redis_client):
    RangeStore(redis_client).set("demo", make_range("loss", 0, 10))
    RangeStore(redis_client).set("demo", make_range("accuracy", 0.5, None))
    config = AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config, client=redis_client)
    state.register("demo", build.registration())
    r = build.report(3, loss=40.0)
    r.scalars["accuracy"] = 0.4
    (alert,) = [a for a in engine.evaluate(state.apply("demo", r)) if a.rule == "OutOfRange"]
    assert alert.summary.startswith("loss is 40 at step 3, above its valid range [0, 10]; 1 more metric out of range")
    assert (alert.value, alert.threshold, alert.severity) == (40.0, 10.0, "warning")


def test_removed_ranges_resolve_and_new_ones_arrive_after_refresh(build, redis_client):
    store = RangeStore(redis_client)
    store.set("demo", make_range("loss", 0, 1))
    config = AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config, client=redis_client)
    (rule,) = [r for r in engine.rules if isinstance(r, OutOfRange)]
    now = [0.0]
    rule.ranges.clock = lambda: now[0]
    state.register("demo", build.registration())

    def step(n: int, loss: float) -> list[str]:
        return [a.status for a in engine.evaluate(state.apply("demo", build.report(n, loss=loss)))
                if a.rule == "OutOfRange"]

    assert step(0, 5.0) == ["firing"]
    store.delete("demo", "loss")
    assert step(1, 5.0) == []  # cached for refresh_s
    now[0] += 5.0
    assert step(2, 5.0) == ["resolved"]
    store.set("demo", make_range("loss", None, 100))
    assert step(60, 500.0) == []  # not yet read
    now[0] += 5.0
    assert step(61, 500.0) == ["firing"]


def test_without_a_client_the_rule_judges_nothing(build, redis_client):
    RangeStore(redis_client).set("demo", make_range("loss", 0, 1))
    config = AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config)
    state.register("demo", build.registration())
    assert not [a for a in engine.evaluate(state.apply("demo", build.report(0, loss=5.0))) if a.rule == "OutOfRange"]


def test_redis_errors_are_counted_not_raised(build, redis_client):
    import redis

    counters = Counters()
    config = AggregatorConfig(keep_firing_s=0)
    engine = RuleEngine(config, counters, client=redis.Redis(port=1, socket_connect_timeout=0.2))
    state = State(config, Counters())
    state.register("demo", build.registration())
    engine.evaluate(state.apply("demo", build.report(0)))
    assert counters.get("redis_errors") == 1
