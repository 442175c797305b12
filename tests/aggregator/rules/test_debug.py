"""GradientCheckFailed: gradcheck verdicts that arrive as evaluation scalars, and the verdict kept on the
run between checks."""

from __future__ import annotations

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.debug import GradientCheckFailed
from gradwatch.aggregator.state import State
from gradwatch.v1 import report_pb2


def eval_report(build, step: int, seq: int, **scalars):
    r = build.report(step, seq=seq, phase=report_pb2.PHASE_EVAL)
    del r.tensors[:]
    for k, v in scalars.items():
        r.scalars[k] = v
    return r


FAILED = {"gradcheck/passed": 0.0, "gradcheck/max_relative_error": 0.8, "gradcheck/fc1.weight": 0.8,
          "gradcheck/fc1.bias": 0.3, "gradcheck/head.weight": 1e-8}
PASSED = {"gradcheck/passed": 1.0, "gradcheck/max_relative_error": 1e-7, "gradcheck/fc1.weight": 1e-7}


@pytest.mark.parametrize("scalars, fires", [
    (FAILED, True),
    (PASSED, False),
    ({"accuracy": 0.5}, False),             # no gradcheck in the report: no evidence
    ({"gradcheck/passed": 0.0}, True),      # a failure without per-tensor errors still fires
])
def test_gradient_check_failed(build, scalars, fires):
    state, rule = State(AggregatorConfig(), Counters()), GradientCheckFailed()
    state.register("demo", build.registration())
    alerts = rule.evaluate(state.apply("demo", eval_report(build, 3, 100, **scalars)))
    assert [a.status for a in alerts] == (["firing"] if fires else [])


def test_alert_names_the_worst_tensor_and_resolves_on_a_pass(build):
    state, rule = State(AggregatorConfig(), Counters()), GradientCheckFailed(config=AggregatorConfig(keep_firing_s=0))
    state.register("demo", build.registration())
    (alert,) = rule.evaluate(state.apply("demo", eval_report(build, 3, 100, **FAILED)))
    assert (alert.rule, alert.layer, alert.tensor, alert.value, alert.severity) == (
        "GradientCheckFailed", "fc1", "fc1.weight", 0.8, "critical")
    assert "relative error of 0.8" in alert.summary
    # a later evaluation without a check keeps the verdict on the run
    state.apply("demo", eval_report(build, 4, 101, accuracy=0.9))
    assert state.runs["demo"].eval_scalars["gradcheck/passed"] == 0.0
    assert state.runs["demo"].eval_scalars["accuracy"] == 0.9
    (resolved,) = rule.evaluate(state.apply("demo", eval_report(build, 5, 102, **PASSED)))
    assert resolved.status == "resolved" and resolved.tensor == "fc1.weight"
    assert "gradcheck/fc1.bias" not in state.runs["demo"].eval_scalars  # the new check replaced the old one
