"""NonFinite rule tables: where a NaN/Inf started, from the agent's origins and the non-finite tensors and loss
of one report (single-rank runs, no Redis: rules are pure) or of a step joined over its ranks (multi-rank runs,
in State and through a real Aggregator on Redis, in both arrival orders)."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.state import State
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT
from gradwatch.v1 import run_pb2

F, R, NF = "firing", "resolved", "NonFinite"
NAN_GRADS = {("fc1", "gradient"): 5, ("fc2", "gradient"): 3, ("embed", "gradient"): 1}
NAN_FORWARD = {("fc2", "parameter"): 2, ("head", "parameter"): 4, ("head", "activation"): 9, ("embed", "gradient"): 7}
# A NaN born in fc1's forward: it flows through every later output, then back through every gradient.
BORN_IN_FC1 = {("fc1", "activation"): 6, ("fc2", "activation"): 8, ("head", "activation"): 9,
               **{(layer, "gradient"): 4 for layer in ("embed", "fc1", "fc2", "head")}}


def run(build, steps: int, bad: dict[int, dict], config: AggregatorConfig | None = None):
    """One rank's reports of steps 0..steps-1, healthy unless `bad` gives a step's report arguments; returns
    the NonFinite transitions, the engine and the counters."""
    config = config or AggregatorConfig(keep_firing_s=0)
    counters = Counters()
    state, engine = State(config, counters), RuleEngine(config, counters)
    state.register("demo", build.registration())
    alerts = []
    for step in range(steps):
        view = state.apply("demo", build.report(step, **bad.get(step, {})))
        alerts.extend(a for a in engine.evaluate(view) if a.rule == NF)
    return alerts, engine, counters


NONFINITE = [
    pytest.param({20: dict(nonfinite=NAN_GRADS)}, [(20, F, "fc2"), (25, R, "fc2")],
                 id="NaN in gradients: the first in backward order"),
    pytest.param({20: dict(nonfinite=NAN_FORWARD)}, [(20, F, "fc2"), (25, R, "fc2")],
                 id="NaN in parameters: the first in forward order"),
    pytest.param({20: dict(nonfinite={("fc1", "activation"): 1, ("head", "parameter"): 1})},
                 [(20, F, "fc1"), (25, R, "fc1")], id="an activation before a later parameter"),
    pytest.param({20: dict(loss=math.nan)}, [(20, F, "(loss)"), (25, R, "(loss)")], id="non-finite loss only"),
    pytest.param({s: dict(nonfinite=NAN_GRADS) for s in range(20, 100)}, [(20, F, "fc2")],
                 id="persisting NaN: one alert"),
    pytest.param({s: dict(nonfinite=NAN_GRADS) for s in (20, 22, 24)}, [(20, F, "fc2"), (29, R, "fc2")],
                 id="intermittent NaN: one incident"),
    pytest.param({s: dict(nonfinite=NAN_GRADS) for s in (20, 40)}, [(20, F, "fc2"), (25, R, "fc2")],
                 id="recurrence within the cooldown is suppressed"),
    pytest.param({s: dict(nonfinite=NAN_GRADS) for s in (20, 80)},
                 [(20, F, "fc2"), (25, R, "fc2"), (80, F, "fc2"), (85, R, "fc2")],
                 id="recurrence after the cooldown is a new incident"),
    pytest.param({20: dict(origins={"forward": "fc1"}, nonfinite=BORN_IN_FC1, loss=math.nan),
                  21: dict(origins={"forward": "embed"}, nonfinite={("embed", "parameter"): 3}, loss=math.nan)},
                 [(20, F, "fc1"), (26, R, "fc1")], id="poisoned weights after the blow-up: the same incident"),
    pytest.param({}, [], id="finite training"),
]


@pytest.mark.parametrize(("bad", "expected"), NONFINITE)
def test_nonfinite(build, bad, expected):
    alerts, _, _ = run(build, 100, bad)
    assert [(a.step, a.status, a.layer) for a in alerts] == expected


# The report of step 20 -> the alert's layer, tensor, and the pass its summary names.
ORIGINS = [
    pytest.param(dict(origins={"forward": "fc1"}, nonfinite=BORN_IN_FC1, loss=math.nan),
                 ("fc1", "fc1:output", "forward"), id="forward origin in a middle module beats later gradients"),
    pytest.param(dict(origins={"forward": "fc1"}, nonfinite={("head", "gradient"): 4, ("fc2", "gradient"): 4}),
                 ("fc1", "fc1:output", "forward"), id="forward origin without activations watched (the default)"),
    pytest.param(dict(origins={"forward": "fc1"}, nonfinite={("fc1", "parameter"): 2, **BORN_IN_FC1}),
                 ("fc1", "fc1.weight", "forward"), id="poisoned parameter beats the forward origin of its own module"),
    pytest.param(dict(origins={"forward": "fc2"}, nonfinite={("fc1", "parameter"): 2, ("fc2", "activation"): 1}),
                 ("fc1", "fc1.weight", "forward"), id="poisoned parameter before the forward origin"),
    pytest.param(dict(origins={"forward": "fc1"}, nonfinite={("head", "parameter"): 2, **BORN_IN_FC1}),
                 ("fc1", "fc1:output", "forward"), id="poisoned parameter after the forward origin: the origin"),
    pytest.param(dict(origins={"backward": "fc2"}, nonfinite={(layer, "gradient"): 2 for layer in ("embed", "fc1")}),
                 ("fc2", "fc1:output.grad", "backward"), id="backward origin"),
    pytest.param(dict(origins={"backward": "fc2"}, nonfinite={("head", "gradient"): 2, ("fc1", "gradient"): 2}),
                 ("fc2", "fc1:output.grad", "backward"), id="backward origin beats the first non-finite gradient"),
    pytest.param(dict(origins={"backward": "(loss)"}, nonfinite=NAN_GRADS),
                 ("(loss)", "head:output.grad", "backward"), id="backward origin at the loss"),
    pytest.param(dict(origins={"backward": "fc2"}, nonfinite={("fc1", "activation"): 1}),
                 ("fc1", "fc1:output", "forward"), id="a non-finite activation beats a backward origin"),
    pytest.param(dict(nonfinite=NAN_GRADS), ("fc2", "fc2.weight.grad", "backward"), id="gradients only"),
    pytest.param(dict(loss=math.inf), ("(loss)", "loss", "forward"), id="loss only"),
    pytest.param(dict(origins={"forward": "fc1"}, loss=math.nan, tensors=False), ("fc1", "fc1:output", "forward"),
                 id="origin-only report of a step that was not due"),
]


@pytest.mark.parametrize(("report", "expected"), ORIGINS)
def test_nonfinite_names_where_it_started(build, report, expected):
    alerts, _, _ = run(build, 30, {20: report})
    firing = alerts[0]
    layer, tensor, direction = expected
    assert (firing.step, firing.status, firing.rank, firing.layer, firing.tensor) == (20, F, 0, layer, tensor)
    assert firing.summary.startswith(f"NaN/Inf at step 20 started in layer {layer} in the {direction} pass: ")
    assert firing.summary.endswith("(run demo, rank 0)")
    assert [(a.step, a.status) for a in alerts] == [(20, F), (25, R)]


def test_nonfinite_alert_fields(build):
    alerts, engine, counters = run(build, 100, {20: dict(nonfinite=NAN_GRADS), 40: dict(nonfinite=NAN_GRADS)})
    firing, resolved = alerts
    assert (firing.tensor, firing.value, firing.threshold, firing.severity, firing.rank) == (
        "fc2.weight.grad", 3.0, 0.0, "critical", 0)
    assert firing.summary == ("NaN/Inf at step 20 started in layer fc2 in the backward pass: 3 non-finite values in "
                              "gradient fc2.weight.grad, the first non-finite tensor in backward order; 2 more tensors "
                              "non-finite (run demo, rank 0)")
    assert firing.starts_at.endswith("Z") and firing.ends_at is None
    assert resolved.starts_at == firing.starts_at and resolved.ends_at is not None
    assert counters.get("alerts_suppressed") == 1
    assert engine.firing() == []
    assert json.loads(firing.to_json())["value"] == 3.0


def test_forward_origin_summary(build):
    alerts, _, _ = run(build, 30, {20: dict(origins={"forward": "fc1"}, nonfinite=BORN_IN_FC1, loss=math.nan)})
    assert alerts[0].summary == (
        "NaN/Inf at step 20 started in layer fc1 in the forward pass: its output fc1:output is the first module "
        "output holding NaN/Inf (7 values); 6 more tensors non-finite; the loss is nan (run demo, rank 0)")
    assert alerts[0].value == 7.0


@pytest.mark.parametrize(("nonfinite", "value", "phrase"), [
    ({("fc2", "gradient"): 4}, "NaN", "the first module output holding NaN/Inf; 1 more tensor"),
    ({("fc1", "activation"): 6, ("fc2", "gradient"): 4}, 6.0, "holding NaN/Inf (6 values); 1 more tensor "),
], ids=["output not watched: not counted", "output watched: its count"])
def test_an_origin_the_agent_did_not_count(build, feed, nonfinite, value, phrase):
    """The agent's check detects without counting (nonfinite_count 0)."""
    bad = build.report(1, origins={"forward": "fc1"}, nonfinite=nonfinite)
    bad.nonfinite_origins[0].nonfinite_count = 0
    (alert,) = feed([build.report(0), bad], NF, build.registration())
    assert (alert.layer, alert.tensor, json.loads(alert.to_json())["value"]) == ("fc1", "fc1:output", value)
    assert phrase in alert.summary and "0 values" not in alert.summary


def test_layer_filter_applies_to_origins(build, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[NonFinite]\nlayers = {exclude = ["fc1"]}\n')
    config = AggregatorConfig(keep_firing_s=0, rules=str(rules))
    alerts, _, _ = run(build, 30, {20: dict(origins={"forward": "fc1"}, nonfinite=BORN_IN_FC1)}, config)
    assert (alerts[0].layer, alerts[0].tensor) == ("fc2", "fc2:output")


def test_a_rank_still_bad_keeps_the_incident_open(build):
    """Single-rank runs (world size 1 each) judge report by report; hysteresis counts clear reports per rank:
    rank 1 being fine does not resolve rank 0's NaN."""
    config = AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config)
    for rank in (0, 1):
        state.register("demo", build.registration(rank=rank))
    alerts = []
    for step in range(40):
        for rank in (0, 1):
            bad = rank == 0 and 10 <= step < 20
            view = state.apply("demo", build.report(step, rank=rank, nonfinite=NAN_GRADS if bad else None))
            alerts.extend((a.step, a.rank, a.status) for a in engine.evaluate(view))
    assert alerts == [(10, 0, F), (24, 0, R)]


# -- runs of several ranks: judged on joined steps ------------------------------------------------------------

def ddp_registration(build, rank: int, world: int = 2) -> run_pb2.RunRegistration:
    reg = build.registration(rank=rank)
    reg.world_size = world
    for t in reg.tensors:
        per_rank = t.kind == run_pb2.TENSOR_KIND_ACTIVATION
        t.partition = run_pb2.PARTITION_PER_RANK if per_rank else run_pb2.PARTITION_REPLICATED
    return reg


def ddp_step(build, step: int, nan_step: int = 20) -> list:
    """Both ranks' reports of one DDP step. At nan_step only rank 1's forward makes a NaN in fc1: rank 1 reports
    the origin and its non-finite outputs; after the all-reduce both ranks hold non-finite gradients, and rank 0,
    whose forward and backward were finite, reports them with no origin."""
    if step != nan_step:
        return [build.report(step, rank=rank) for rank in (0, 1)]
    grads = {(layer, "gradient"): 4 for layer in build.layers}
    return [build.report(step, rank=0, nonfinite=grads),
            build.report(step, rank=1, nonfinite={**BORN_IN_FC1, **grads}, origins={"forward": "fc1"},
                         loss=math.nan)]


def joined_alerts(build, reports) -> list:
    config = AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config)
    for rank in (0, 1):
        state.register("demo", ddp_registration(build, rank))
    alerts = []
    for r in reports:
        alerts += engine.evaluate(state.apply("demo", r))
        for joined in state.take_closed():
            alerts += engine.evaluate_joined(joined)
    return [a for a in alerts if a.rule == NF]


@pytest.mark.parametrize("first", [0, 1], ids=["rank 0 first", "rank 1 first"])
def test_two_ranks_name_the_rank_that_saw_the_origin_in_either_order(build, first):
    reports = []
    for step in range(30):
        pair = ddp_step(build, step)
        reports += pair if first == 0 else pair[::-1]
    alerts = joined_alerts(build, reports)
    firing = alerts[0]
    assert [(a.step, a.status, a.rank, a.layer) for a in alerts] == [(20, F, 1, "fc1"), (25, R, 1, "fc1")]
    assert firing.tensor == "fc1:output"
    assert firing.summary.startswith("NaN/Inf at step 20 started in layer fc1 in the forward pass: ")
    assert firing.summary.endswith("; rank 0 non-finite too (run demo, rank 1)")
    assert "consecutive joined steps" in alerts[1].summary


def test_two_ranks_step_that_only_one_rank_reported_closes_at_the_watermark(build):
    """Not due on rank 0: only rank 1 sends the step (an origin-only report); the alert waits until rank 0
    reports a later step."""
    alerts = joined_alerts(build, [
        *ddp_step(build, 0),
        build.report(1, rank=1, tensors=False, origins={"forward": "fc2"}, loss=math.nan),
        build.report(2, rank=1),
    ])
    assert alerts == []
    alerts = joined_alerts(build, [
        *ddp_step(build, 0),
        build.report(1, rank=1, tensors=False, origins={"forward": "fc2"}, loss=math.nan),
        build.report(2, rank=1), build.report(2, rank=0),
    ])
    assert [(a.step, a.rank, a.layer, a.tensor) for a in alerts] == [(1, 1, "fc2", "fc2:output")]


def test_two_ranks_earliest_forward_origin_then_lowest_rank(build):
    def pair(o0, o1):
        return [build.report(5, rank=0, origins={"forward": o0}), build.report(5, rank=1, origins={"forward": o1})]

    assert [(a.rank, a.layer) for a in joined_alerts(build, pair("fc2", "fc1"))] == [(1, "fc1")]
    assert [(a.rank, a.layer) for a in joined_alerts(build, pair("fc1", "fc1")[::-1])] == [(0, "fc1")]


def test_two_ranks_persisting_nan_is_one_alert(build):
    reports = [r for step in range(40) for r in ddp_step(build, step, nan_step=-1)]
    bad = {(layer, "parameter"): 1 for layer in build.layers}
    reports[20 * 2: 30 * 2] = [build.report(s, rank=rank, nonfinite=bad) for s in range(20, 30) for rank in (0, 1)]
    alerts = joined_alerts(build, reports)
    assert [(a.step, a.status, a.rank, a.layer) for a in alerts] == [(20, F, 0, "embed"), (34, R, 0, "embed")]


def test_a_late_report_is_judged_alone(build):
    config = AggregatorConfig(keep_firing_s=0, join_timeout_s=0)
    state, engine = State(config, Counters()), RuleEngine(config)
    for rank in (0, 1):
        state.register("demo", ddp_registration(build, rank))
    engine.evaluate(state.apply("demo", build.report(3, rank=0)))
    state.expire_joins()  # rank 1 is late: step 3 closes without it
    assert engine.evaluate_joined(state.take_closed()[0]) == []
    view = state.apply("demo", build.report(3, rank=1, origins={"forward": "fc2"}))
    assert view.late and not view.joined
    assert [(a.step, a.rank, a.layer) for a in engine.evaluate(view)] == [(3, 1, "fc2")]


@pytest.mark.parametrize("first", [0, 1], ids=["rank 0 first", "rank 1 first"])
def test_two_ranks_through_redis_name_rank_1_in_either_order(build, publish, make_aggregator, run_all,
                                                             redis_client, first):
    """The same DDP incident written to a real Redis stream as the collector writes it, one aggregator reading."""
    for rank in (0, 1):
        publish.registration(ddp_registration(build, rank))
    for step in range(30):
        pair = ddp_step(build, step)
        for r in pair if first == 0 else pair[::-1]:
            publish.report(r)
    agg = make_aggregator(keep_firing_s=0.0)
    run_all(agg)
    alerts = [json.loads(f[FIELD_ALERT]) for _, f in redis_client.xrange(ALERTS_KEY)]
    nonfinite = [(a["status"], a["step"], a["rank"], a["layer"], a["tensor"]) for a in alerts if a["rule"] == NF]
    assert nonfinite == [(F, 20, 1, "fc1", "fc1:output"), (R, 25, 1, "fc1", "fc1:output")]
    firing = next(a for a in alerts if a["rule"] == NF)
    assert "in the forward pass" in firing["summary"] and firing["summary"].endswith("(run demo, rank 1)")



def test_an_origin_only_report_through_redis(build, publish, make_aggregator, run_all, redis_client):
    """Single rank: the report of a step that was not due (an origin, a loss, no tensors) alerts at once."""
    publish.registration(build.registration())
    for step in range(5):
        publish.report(build.report(step))
    publish.report(build.report(5, tensors=False, loss=math.nan, origins={"forward": "fc2"}))
    agg = make_aggregator()
    run_all(agg)
    (alert,) = [json.loads(f[FIELD_ALERT]) for _, f in redis_client.xrange(ALERTS_KEY)]
    assert (alert["rule"], alert["step"], alert["rank"], alert["layer"], alert["tensor"]) == (
        NF, 5, 0, "fc2", "fc2:output")
    assert agg.state.runs["demo"].step == 5 and agg.counters.get("decode_errors") == 0
