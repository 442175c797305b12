"""Rules on the results of gradwatch's debugging tools, which arrive as evaluation-phase scalars."""

from __future__ import annotations

import math

from gradwatch.aggregator.alerts.record import FIRING, Alert, fmt, iso
from gradwatch.aggregator.report import ReportView
from gradwatch.aggregator.rules.base import CRITICAL, Rule
from gradwatch.names import GRADCHECK_MAX_RELATIVE_ERROR, GRADCHECK_PASSED, GRADCHECK_PREFIX, GRADCHECK_SUMMARY


class GradientCheckFailed(Rule):
    """`gradwatch.agent.gradcheck.gradcheck(..., watcher=w)` found an analytic gradient that disagrees with central
    differences: the report's scalar `gradcheck/passed` is 0. Names the parameter with the largest
    relative error (`gradcheck/<tensor>`); a wrong backward (a custom autograd Function, a detached
    path) makes every later gradient statistic meaningless, hence critical. Resolves on the next
    gradcheck that passes. No thresholds: gradcheck applied its own tolerance."""

    name = "GradientCheckFailed"
    LAYERS = False
    RESOLVE_AFTER = 1

    def evaluate(self, view: ReportView) -> list[Alert]:
        passed = view.scalars.get(GRADCHECK_PASSED)
        if passed is None:
            return []  # no gradcheck in this report: no evidence either way
        if passed >= 1:
            return self.transition(view, False, None, lambda a: a.resolve(
                view.step, view.time, 0.0,
                f"A gradient check passed at step {view.step}; it had failed at step {a.step} on {a.tensor} "
                f"(run {view.run}, rank {view.rank})"))
        errors = {k[len(GRADCHECK_PREFIX):]: v for k, v in view.scalars.items()
                  if k.startswith(GRADCHECK_PREFIX) and k not in GRADCHECK_SUMMARY}
        tensor, worst = max(errors.items(), key=lambda kv: (math.isnan(kv[1]) or kv[1], kv[0]),
                            default=("", view.scalars.get(GRADCHECK_MAX_RELATIVE_ERROR, math.nan)))

        def fire() -> Alert:
            layer = tensor.rpartition(".")[0] or tensor or "(model)"
            return Alert(self.name, FIRING, view.run, view.step, view.rank, layer, tensor, worst, 0.0,
                         self.settings.severity or CRITICAL,
                         f"Gradient check failed at step {view.step}: the analytic gradient of {tensor or 'a tensor'} "
                         f"differs from central differences by a relative error of {fmt(worst)}; check custom "
                         f"autograd Functions and in-place or detached paths in {layer} "
                         f"(run {view.run}, rank {view.rank})", iso(view.time))
        return self.transition(view, True, fire, None)
