"""Per-layer health and histograms on /metrics, derived at scrape time from the latest report: update
ratios, dead and saturated fractions, log2-magnitude histograms within a budget, user scalars."""

from __future__ import annotations

import math

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.health import BOUNDS, layer_health, layer_histograms, merge_histograms
from gradwatch.aggregator.report import UNITS, TensorMeta
from gradwatch.aggregator.state import State
from gradwatch.v1 import report_pb2, run_pb2
from tests.aggregator.rules.test_tensors import rounded_constant

RUN = "health"
UPDATE_ID = 4


def registration(build):
    reg = build.registration(run=RUN)
    for order, layer in enumerate(build.layers):
        reg.tensors.add(id=build.tensor_id(layer, "parameter") + 3, name=f"{layer}.weight",
                        kind=run_pb2.TENSOR_KIND_UPDATE, shape=[16, 16], module_path=layer, order=order)
    return reg


def report(build, step: int, **kw) -> report_pb2.StepReport:
    r = build.report(step, run=RUN, param=10.0, **kw)
    for layer in build.layers:
        act = next(t for t in r.tensors if t.tensor_id == build.tensor_id(layer, "activation"))
        if layer == "fc1":    # ReLU-like: min 0, 3/4 zeros
            act.min, act.max, act.zero_count = 0.0, 2.0, 192
        elif layer == "fc2":  # tanh-like: bounded by [-1, 1], 200 of 256 in the top bucket [0.5, 1)
            act.min, act.max, act.zero_count = -0.99, 0.99, 0
            act.histogram_offset = 38
            act.histogram.extend([56, 200])  # buckets 38 ([0.25, 0.5)) and 39 ([0.5, 1))
        r.tensors.add(tensor_id=build.tensor_id(layer, "parameter") + 3, count=256, sum_squares=1e-4)  # ||u|| 0.01
    return r


def test_layer_health_series(make_aggregator, build, publish, run_all):
    publish.registration(registration(build))
    r = report(build, 0)
    r.scalars["accuracy"] = 0.75
    r.scalars["labels/3"] = 12  # label counts have no series of their own here
    publish.report(r)
    ev = build.report(0, run=RUN, seq=100, phase=report_pb2.PHASE_EVAL, loss=0.9)
    del ev.tensors[:]
    ev.scalars["accuracy"] = 0.7
    publish.report(ev)
    agg = make_aggregator()
    run_all(agg)
    get = agg.registry.get_sample_value
    assert get("gradwatch_layer_update_ratio", {"run": RUN, "layer": "fc1"}) == pytest.approx(0.01 / 10)
    assert get("gradwatch_layer_dead_fraction", {"run": RUN, "layer": "fc1"}) == pytest.approx(0.75)
    assert get("gradwatch_layer_dead_fraction", {"run": RUN, "layer": "fc2"}) is None  # goes negative: not ReLU
    assert get("gradwatch_layer_saturated_fraction", {"run": RUN, "layer": "fc2"}) == pytest.approx(200 / 256)
    assert get("gradwatch_run_scalar", {"run": RUN, "name": "accuracy"}) == 0.75
    assert get("gradwatch_run_scalar", {"run": RUN, "name": "labels/3"}) is None
    assert get("gradwatch_run_eval_scalar", {"run": RUN, "name": "accuracy"}) == 0.7
    assert get("gradwatch_run_world_size", {"run": RUN}) == 1
    # the tanh layer's activation histogram: 56 values below 0.5, 256 below 1, cumulative
    le = {"run": RUN, "layer": "fc2", "kind": "activation"}
    assert get("gradwatch_layer_magnitude_bucket", {**le, "le": "0.0625"}) == 0
    assert get("gradwatch_layer_magnitude_bucket", {**le, "le": "1"}) == 256
    assert get("gradwatch_layer_magnitude_bucket", {**le, "le": "+Inf"}) == 256
    assert get("gradwatch_layer_magnitude_gcount", le) == 256


def test_histograms_merge_per_layer_and_respect_the_budget():
    def summary(offset, counts, total=0.0):
        s = report_pb2.TensorSummary(count=sum(counts), histogram_offset=offset, sum=total)
        s.histogram.extend(counts)
        return s

    grad = run_pb2.TENSOR_KIND_GRADIENT
    a = TensorMeta.of("l0.weight.grad", grad, "l0", 0)
    b = TensorMeta.of("l0.bias.grad", grad, "l0", 0)
    c = TensorMeta.of("l1.weight.grad", grad, "l1", 1)
    tensors = {grad: [(a, summary(0, [1, 2])), (b, summary(1, [3, 4, 5], 2.0)), (c, summary(63, [7]))]}
    (l0,) = layer_histograms(tensors, {"l0", "l1"}, budget=1)
    assert l0[:2] == ("l0", "gradient") and l0[2][0] == 1 + 2 + 3 + 4 + 5 and l0[2][-1] == 15 and l0[3] == 2.0
    l0, l1 = layer_histograms(tensors, {"l0", "l1"}, budget=10)
    assert l1[2] == [0] * 15 + [7]  # the last bucket holds everything from 2^23 up: le=+Inf only
    assert len(BOUNDS) == 16 and BOUNDS[0] == 2.0 ** -36 and math.isinf(BOUNDS[-1])


def test_histogram_budget_on_metrics(make_aggregator, build, publish, run_all):
    publish.registration(registration(build))
    publish.report(report(build, 0))
    agg = make_aggregator(max_histogram_layers=1)
    run_all(agg)
    text = [m for m in agg.registry.collect() if m.name == "gradwatch_layer_magnitude"][0]
    assert {s.labels["layer"] for s in text.samples} == {"fc2"}  # the only histogram in the report


def test_dead_fraction_prefers_the_unit_counts(build):
    """fc1 sends unit counts (16 of 64 units never fired) and outputs 90 % zero: its dead fraction is
    the units'; fc2 sends outputs only: the zero fraction. The counts are no module output: not in the
    layer's activation moments, histograms or non-finite series."""
    state = State(AggregatorConfig(), Counters())
    reg = build.registration(run=RUN, units=True)
    state.register(RUN, reg)
    r = build.report(0, run=RUN)
    for layer, zeros in (("fc1", 230), ("fc2", 250)):
        act = next(t for t in r.tensors if t.tensor_id == build.tensor_id(layer, "activation"))
        act.min, act.zero_count = 0.0, zeros
    units = r.tensors.add(tensor_id=build.tensor_id("fc1", "units"), count=64, zero_count=16, sum=200.0,
                          sum_squares=900.0, min=0.0, max=5.0)
    units.histogram_offset = 40
    units.histogram.extend([10, 20, 18])
    view = state.apply(RUN, r)
    (snap,) = state.views()
    assert [m.name for m, _ in view.of_kind(UNITS)] == ["fc1:units"]
    assert all(not m.name.endswith(":units") for m, _ in view.of_kind(run_pb2.TENSOR_KIND_ACTIVATION))
    health = layer_health(snap.tensors, set(build.layers))
    assert health["fc1"].dead_fraction == pytest.approx(16 / 64)
    assert health["fc2"].dead_fraction == pytest.approx(250 / 256)
    assert health["fc1"].activation_mean == pytest.approx(0.0)  # the outputs' sum only, not the counts'
    assert [kind for layer, kind, *_ in merge_histograms(snap.tensors, {"fc1"}, 100)] == []
    assert {k for _, _, _, kinds in snap.layers for k, _ in kinds} == {"parameter", "gradient", "activation"}


def test_a_constant_layer_has_activation_variance_zero(build):
    """The float64 sums of 1e6 equal outputs round ("variance" 6.5e-8 here); min == max says constant."""
    state = State(AggregatorConfig(), Counters())
    state.register(RUN, build.registration(run=RUN))
    r = build.report(0, run=RUN)
    act = next(t for t in r.tensors if t.tensor_id == build.tensor_id("fc1", "activation"))
    fields = rounded_constant(123.456)
    del act.histogram[:]
    for key, value in fields.items():
        setattr(act, key, value)
    state.apply(RUN, r)
    (snap,) = state.views()
    health = layer_health(snap.tensors, set(build.layers))
    assert health["fc1"].activation_var == 0.0 and health["fc1"].activation_mean == pytest.approx(fields["min"])


@pytest.mark.parametrize(("field", "expected"), [("update_nan", math.nan), ("update_inf", math.inf),
                                                 ("weight_nan", math.nan)])
def test_an_update_ratio_over_nan_or_inf_is_nan_or_inf_never_a_number(build, field, expected):
    """The agent sums the squares of finite values only: a ratio read from those sums alone would be finite."""
    state = State(AggregatorConfig(), Counters())
    state.register(RUN, registration(build))
    r = report(build, 0)
    tid = build.tensor_id("fc1", "parameter") + (3 if field.startswith("update") else 0)
    s = next(t for t in r.tensors if t.tensor_id == tid)
    if field.endswith("nan"):
        s.nan_count = 1
    else:
        s.inf_count = 1
    state.apply(RUN, r)
    (snap,) = state.views()
    ratio = layer_health(snap.tensors, set(build.layers))["fc1"].update_ratio
    assert math.isnan(ratio) if math.isnan(expected) else ratio == expected
    assert layer_health(snap.tensors, set(build.layers))["fc2"].update_ratio == pytest.approx(0.01 / 10)
