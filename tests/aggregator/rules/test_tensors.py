"""Rule tables for the per-tensor rules: sequences of summaries in, alert transitions out (no Redis)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.aggregator.rules.activations import saturated_fraction
from gradwatch.v1 import report_pb2
from tests.core.test_stats import float64_sums

F, R = "firing", "resolved"


def at(steps, layer: str, kind: str, **fields):
    """Summary fields for one (layer, kind) at some steps: `steps` a range, a set or a predicate."""
    inside = steps if callable(steps) else (lambda s: s in steps)
    return lambda step, lay, k: fields if (lay, k) == (layer, kind) and inside(step) else None


def both(*fns):
    def tensors(step, layer, kind):
        out = {}
        for fn in fns:
            out.update(fn(step, layer, kind) or {})
        return out
    return tensors


def rms(x: float) -> dict:
    return dict(sum=0.0, sum_squares=256 * x * x, min=-3 * x, max=3 * x)


def zeros() -> dict:
    return dict(zero_count=256, sum=0.0, sum_squares=0.0, min=0.0, max=0.0)


def constant(x: float) -> dict:
    return dict(zero_count=0, sum=256 * x, sum_squares=256 * x * x, min=x, max=x)


def rounded_constant(x: float, n: int = 10**6) -> dict:
    """A constant float32 tensor of n elements with the float64 sums the agent accumulates: their
    E[x^2] - mean^2 is rounding, not spread (for 123.456 at 1e6 elements a "std" of 2.6e-4)."""
    v = float(np.float32(x))
    total, squares = float64_sums(v, n)
    return dict(count=n, zero_count=0, sum=total, sum_squares=squares, min=v, max=v)


def std(x: float, mean: float = 0.0) -> dict:
    return dict(zero_count=0, sum=256 * mean, sum_squares=256 * (x * x + mean * mean), min=mean - 3 * x,
                max=mean + 3 * x)


VANISHING = [
    pytest.param(at(range(20, 200), "fc1", "gradient", **rms(1e-9)), [(24, F, "fc1")], id="fc1 vanishes for good"),
    pytest.param(at(range(20, 40), "fc1", "gradient", **rms(1e-9)), [(24, F, "fc1"), (44, R, "fc1")],
                 id="vanishes, then recovers"),
    pytest.param(both(at(range(20, 80), "fc1", "gradient", **rms(1e-9)), at(range(20, 80), "fc2", "gradient",
                                                                           **rms(1e-11))),
                 [(24, F, "fc2"), (84, R, "fc2")], id="the smallest RMS is named"),
    pytest.param(at(range(0, 3), "fc1", "gradient", **rms(1e-10)), [], id="tiny gradients in the first steps"),
    pytest.param(at(range(20, 200), "fc1", "gradient", **rms(1e-6)), [], id="small but above 1e-7"),
    pytest.param(at(range(20, 200), "fc1", "gradient", **zeros()), [], id="all zero is AllZero's"),
]


@pytest.mark.parametrize(("tensors", "expected"), VANISHING)
def test_vanishing_gradient(scenario, tensors, expected):
    assert [(s, st, lay) for s, st, _, lay in scenario(100, tensors, rule="VanishingGradient")] == expected


ALL_ZERO = [
    pytest.param(at(range(20, 100), "fc2", "gradient", **zeros()), [(22, F, "fc2")],
                 id="a gradient that stays zero"),
    pytest.param(at(range(0, 100), "head", "parameter", **zeros()), [(2, F, "head")], id="a weight that never trains"),
    pytest.param(both(at({0}, "head", "parameter", **zeros()), *(at({0}, lay, "gradient", **zeros())
                                                                for lay in ("embed", "fc1", "fc2"))),
                 [], id="zero-initialised head: zero weights and gradients at step 0 only"),
    pytest.param(at(range(20, 100), "fc2", "gradient", **dict(zeros(), zero_count=254, sum_squares=1e-4)), [],
                 id="99 % zero (sparse embedding rows) is not all zero"),
    pytest.param(at(range(20, 100), "fc2", "activation", **zeros()), [], id="activations are DeadReLU's"),
    pytest.param(at(range(20, 30), "fc2", "gradient", **zeros()), [(22, F, "fc2"), (34, R, "fc2")],
                 id="resolves when the gradient comes back"),
]


@pytest.mark.parametrize(("tensors", "expected"), ALL_ZERO)
def test_all_zero(scenario, tensors, expected):
    assert [(s, st, lay) for s, st, _, lay in scenario(60, tensors, rule="AllZero")] == expected


FROZEN = dict(sum=1.25, sum_squares=16.0, min=-0.6, max=0.6)


def frozen_params(steps):
    return both(*(at(steps, lay, "parameter", **FROZEN) for lay in ("embed", "fc1", "fc2", "head")))


def nan_grads(steps):
    return at(steps, "fc1", "gradient", nan_count=3)


UNCHANGED = [
    pytest.param(at(range(20, 100), "fc1", "parameter", **FROZEN), {}, [(25, F, "fc1")], id="fc1 stops training"),
    pytest.param(at(range(20, 30), "fc1", "parameter", **FROZEN), {}, [(25, F, "fc1"), (34, R, "fc1")],
                 id="stops, then trains again"),
    pytest.param(frozen_params(range(20, 100)), {}, [(25, F, "embed")], id="everything frozen: the first layer"),
    pytest.param(frozen_params(range(0, 11)), {"lr": lambda s: 0.0 if s < 10 else 1e-3}, [],
                 id="warm-up from lr 0: no update expected"),
    pytest.param(both(frozen_params(range(0, 9)), nan_grads(range(0, 8))), {}, [],
                 id="AMP loss scaler skips the first steps"),
    pytest.param(at(range(20, 24), "fc1", "parameter", **FROZEN), {}, [], id="four unchanged reports"),
]


@pytest.mark.parametrize(("tensors", "kwargs", "expected"), UNCHANGED)
def test_unchanged_tensor(scenario, tensors, kwargs, expected):
    assert [(s, st, lay) for s, st, _, lay in scenario(60, tensors, rule="UnchangedTensor", **kwargs)] == expected


INIT = [
    pytest.param(at({0}, "fc1", "parameter", **std(3.0)), [(0, F, "fc1"), (5, R, "fc1")], id="std 3: gain 12"),
    pytest.param(at({0}, "fc1", "parameter", **std(1e-4)), [(0, F, "fc1"), (5, R, "fc1")], id="std 1e-4: gain 4e-4"),
    pytest.param(at({0}, "fc2", "parameter", **dict(std(0.29, mean=0.5), min=0.0, max=1.0)),
                 [(0, F, "fc2"), (5, R, "fc2")], id="torch.rand: uniform [0, 1)"),
    pytest.param(at({0}, "fc2", "parameter", **constant(0.1)), [(0, F, "fc2"), (5, R, "fc2")],
                 id="constant weights cannot break symmetry"),
    pytest.param(at({0}, "fc2", "parameter", **rounded_constant(123.456)), [(0, F, "fc2"), (5, R, "fc2")],
                 id="constant weights, rounded sums"),
    pytest.param(at({0}, "head", "parameter", **zeros()), [], id="zero-initialised head"),
    pytest.param(at({0}, "fc1", "parameter", **std(1 / math.sqrt(3 * 16))), [], id="PyTorch default init"),
    pytest.param(at({0}, "fc1", "parameter", **std(0.025)), [], id="scaled residual init: gain 0.1"),
    pytest.param(at({0}, "embed", "parameter", **std(1.0)), [], id="embedding N(0, 1) is excluded"),
    pytest.param(at({1}, "fc1", "parameter", **std(3.0)), [], id="only the first report is judged"),
]


@pytest.mark.parametrize(("tensors", "expected"), INIT)
def test_poor_weight_initialization(scenario, tensors, expected):
    assert [(s, st, lay) for s, st, _, lay in scenario(30, tensors, rule="PoorWeightInitialization")] == expected


def test_a_run_followed_from_the_middle_is_not_judged(scenario):
    assert scenario(30, at(lambda s: True, "fc1", "parameter", **std(3.0)), rule="PoorWeightInitialization",
                    start=500) == []


def test_poor_initialization_alert_fields(scenario):
    scenario(2, at({0}, "fc1", "parameter", **std(3.0)))
    a = scenario.alerts[0]
    assert (a.rule, a.tensor, a.value, a.threshold, a.severity) == ("PoorWeightInitialization", "fc1.weight",
                                                                     pytest.approx(12), 10.0, "warning")
    assert "shape [16, 16]" in a.summary and "fan_in 16" in a.summary and "(run demo, rank 0)" in a.summary


VARIANCE = [
    pytest.param(at(range(10, 100), "fc2", "activation", **std(5e3)), [(12, F, "fc2")], id="blown-up activations"),
    pytest.param(at(range(10, 100), "fc1", "activation", **constant(0.7)), [(12, F, "fc1")],
                 id="collapsed: one value for every unit"),
    pytest.param(at(range(10, 100), "fc1", "activation", **rounded_constant(123.456)), [(12, F, "fc1")],
                 id="collapsed, 1e6 elements: the rounding of the sums is no spread"),
    pytest.param(both(at(range(10, 100), "fc1", "activation", **std(2e3)), at(range(10, 100), "fc2", "activation",
                                                                             **constant(0.7))),
                 [(12, F, "fc2")], id="the farthest outside is named"),
    pytest.param(at(range(10, 12), "fc2", "activation", **std(5e3)), [], id="two reports (a warm-up spike)"),
    pytest.param(at(range(10, 100), "fc2", "activation", **zeros()), [], id="all zero is DeadReLU's"),
    pytest.param(at(range(10, 100), "fc2", "activation", **dict(constant(0.7), count=1)), [],
                 id="a scalar output has no spread"),
    pytest.param(at(range(10, 100), "fc2", "parameter", **constant(1.0)), [],
                 id="LayerNorm weights: parameters unread"),
]


@pytest.mark.parametrize(("tensors", "expected"), VARIANCE)
def test_tensor_variance(scenario, tensors, expected):
    assert [(s, st, lay) for s, st, _, lay in scenario(60, tensors, rule="TensorVariance")] == expected


def relu(zero_fraction: float) -> dict:
    return dict(zero_count=round(256 * zero_fraction), min=0.0, max=2.0)


DEAD = [
    pytest.param(at(range(20, 100), "fc1", "activation", **relu(0.996)), [(29, F, "fc1")], id="fc1 dies"),
    pytest.param(at(range(20, 40), "fc1", "activation", **relu(1.0)), [(29, F, "fc1"), (44, R, "fc1")],
                 id="dies, then recovers"),
    pytest.param(at(range(0, 100), "fc1", "activation", **relu(0.5)), [], id="half zero at initialisation"),
    pytest.param(at(range(0, 100), "fc1", "activation", **relu(0.95)), [], id="sparse ReLU MLP: 95 % zero"),
    pytest.param(at(range(0, 5), "fc1", "activation", **relu(1.0)), [], id="zero-initialised branch, first steps"),
    pytest.param(at(range(20, 100), "fc1", "activation", **dict(relu(0.996), min=-0.1)), [],
                 id="not ReLU-like: negative outputs"),
]


def units(dead: float, n: int = 64) -> dict:
    """Per-unit activity counts of a layer of n units over a window: a fraction `dead` never fired."""
    return dict(count=n, zero_count=round(n * dead), sum=3.0 * n, sum_squares=9.0 * n, min=0.0, max=4.0)


DEAD_UNITS = [
    pytest.param(at(range(20, 100), "fc1", "units", **units(0.75)), [(29, F, "fc1")], id="3/4 of fc1's units die"),
    pytest.param(at(range(20, 100), "fc1", "units", **units(0.5)), [(29, F, "fc1")], id="half dead: the threshold"),
    pytest.param(at(range(20, 40), "fc1", "units", **units(1.0)), [(29, F, "fc1"), (44, R, "fc1")],
                 id="all dead, then recovers"),
    pytest.param(both(at(range(0, 100), "fc1", "units", **units(0.0)), at(range(0, 100), "fc1", "activation",
                                                                          **relu(0.9))),
                 [], id="healthy sparse ReLU: 90 % zeros, every unit fires on some inputs"),
    pytest.param(both(at(range(0, 100), "fc1", "units", **units(0.1)), at(range(0, 100), "fc1", "activation",
                                                                          **relu(0.998))),
                 [], id="99.8 % zeros but 90 % of units alive: the unit counts win"),
    pytest.param(at(range(0, 100), "fc1", "units", **units(0.4)), [], id="40 % dead: below the threshold"),
    pytest.param(at(range(20, 28), "fc1", "units", **units(0.9)), [], id="eight reports only"),
    pytest.param(both(at(range(20, 100), "fc1", "units", **units(0.25)), at(range(20, 100), "fc2", "activation",
                                                                            **relu(0.996))),
                 [(29, F, "fc2")], id="a layer without unit counts: the zero-fraction fallback"),
    pytest.param(both(at(range(20, 100), "fc1", "units", **units(0.6)), at(range(20, 100), "fc2", "units",
                                                                           **units(0.9))),
                 [(29, F, "fc2")], id="the deadest layer is named"),
]


@pytest.mark.parametrize(("tensors", "expected"), DEAD_UNITS)
def test_dead_relu_from_unit_counts(scenario, tensors, expected):
    assert [(s, st, lay) for s, st, _, lay in scenario(60, tensors, rule="DeadReLU")] == expected


@pytest.mark.parametrize("rule", ["SaturatedActivation", "TensorVariance", "AllZero", "NonFinite"])
def test_unit_counts_are_not_module_outputs(scenario, rule):
    """All units firing every pass (counts constant 1: no spread, all in [0.5, 1]) or all dead (all zero)
    would look like a saturated, constant or all-zero output to the rules that read outputs."""
    for fields in (dict(units(0.0), sum=64.0, sum_squares=64.0, min=1.0, max=1.0),
                   dict(units(1.0), sum=0.0, sum_squares=0.0, max=0.0)):
        got = scenario(60, at(range(0, 60), "fc1", "units", **fields), rule=rule)
        assert got == []


@pytest.mark.parametrize(("tensors", "expected"), DEAD)
def test_dead_relu(scenario, tensors, expected):
    assert [(s, st, lay) for s, st, _, lay in scenario(60, tensors, rule="DeadReLU")] == expected


def tanh(top: float, histogram: bool = True, mean_square: float = 0.5) -> dict:
    """Outputs in [-1, 1] with a fraction `top` in [0.5, 1] (buckets 39 and 40), the rest in [0.25, 0.5)."""
    fields = dict(zero_count=0, sum=0.0, sum_squares=256 * mean_square, min=-1.0, max=1.0)
    if histogram:
        n_top = round(256 * top)
        fields.update(histogram=[256 - n_top, n_top - 10, 10], histogram_offset=38)
    return fields


SATURATED = [
    pytest.param(at(range(20, 100), "fc2", "activation", **tanh(0.98)), [(29, F, "fc2")], id="saturated tanh"),
    pytest.param(at(range(20, 100), "fc2", "activation", **tanh(0, histogram=False, mean_square=0.99)),
                 [(29, F, "fc2")], id="no histogram: the mean-square bound"),
    pytest.param(at(range(0, 100), "fc2", "activation", **tanh(0.58)), [], id="healthy tanh, inputs N(0, 1)"),
    pytest.param(at(range(0, 100), "fc2", "activation", **tanh(0.86)), [], id="tanh with inputs N(0, 9)"),
    pytest.param(at(range(0, 100), "fc2", "activation", **tanh(0, histogram=False, mean_square=0.7)), [],
                 id="no histogram, bound below the threshold"),
    pytest.param(at(range(0, 100), "fc2", "activation", **dict(tanh(0.98), max=1.5)), [], id="unbounded output"),
    pytest.param(at(range(20, 25), "fc2", "activation", **tanh(0.98)), [], id="five saturated reports"),
]


@pytest.mark.parametrize(("tensors", "expected"), SATURATED)
def test_saturated_activation(scenario, tensors, expected):
    assert [(s, st, lay) for s, st, _, lay in scenario(60, tensors, rule="SaturatedActivation")] == expected


def test_saturated_fraction_reads_the_top_buckets():
    s = report_pb2.TensorSummary(count=100, histogram=[5, 60, 35], histogram_offset=38, min=-1, max=1)
    assert saturated_fraction(s) == pytest.approx(0.95)
    assert saturated_fraction(report_pb2.TensorSummary(count=100, sum_squares=100.0)) == pytest.approx(1.0)


def test_healthy_training_raises_nothing(scenario):
    """Every rule at its defaults over 300 healthy steps with a loss that falls fast, then slowly."""
    assert scenario(300, loss=lambda s: 2 + 8 * math.exp(-s / 20) + 0.1 * math.sin(s)) == []
