"""Built-in rules, evaluated on every applied report: pure classes that turn ReportViews into alert
transitions (firing / resolved). No I/O here: the consumer writes what they return."""

from __future__ import annotations

import math
import statistics
from collections import deque

from gradwatch.aggregator.alert import FIRING, Alert, Hysteresis, fmt, iso
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.state import UNKNOWN_ORDER, ReportView, TensorMeta
from gradwatch.v1 import run_pb2

CRITICAL = "critical"
WARNING = "warning"
GLOBAL_LAYER = "(global)"
LOSS_LAYER = "(loss)"
# Inputs come before every module in the forward pass; a parameter is the cause, its module's
# activation the effect, so it wins a tie within one layer.
_FORWARD = (run_pb2.TENSOR_KIND_INPUT, run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_ACTIVATION)
_BACKWARD = (run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT)
CRITICAL_FACTOR = 1000.0


def _where(view: ReportView) -> str:
    return f"(run {view.run}, rank {view.rank})"


class NonFinite:
    """NaN/Inf in any watched tensor, or a non-finite loss. Names the tensor where it started: the
    first in forward execution order among inputs, parameters and activations, else the first in
    backward order (highest forward order) among gradients."""

    name = "NonFinite"

    def __init__(self, config: AggregatorConfig, counters: Counters | None = None):
        on_suppressed = (lambda: counters.add("alerts_suppressed")) if counters else None
        self.incidents = Hysteresis(config.resolve_after_steps, config.cooldown_steps, config.keep_firing_s,
                                    on_suppressed)

    def evaluate(self, view: ReportView) -> list[Alert]:
        key = (view.run, self.name)
        loss_bad = view.loss is not None and not math.isfinite(view.loss)
        if view.nonfinite or loss_bad:
            alert = self.incidents.bad(key, view, lambda: self._fire(view, loss_bad))
        else:
            alert = self.incidents.clear(key, view, lambda a: a.resolve(
                view.step, view.time, 0.0,
                f"No NaN/Inf for at least {self.incidents.resolve_after} consecutive reports up to step {view.step}; "
                f"the incident began at step {a.step} in layer {a.layer} {_where(view)}"))
        return [alert] if alert else []

    @staticmethod
    def origin(bad: list[tuple[TensorMeta, int]]) -> tuple[TensorMeta, int, str] | None:
        forward = [b for b in bad if b[0].kind in _FORWARD]
        if forward:
            meta, n = min(forward, key=lambda b: (b[0].kind != _FORWARD[0], b[0].order, b[0].kind != _FORWARD[1]))
            return meta, n, "forward"
        backward = [b for b in bad if b[0].kind in _BACKWARD]
        if backward:
            meta, n = max(backward, key=lambda b: b[0].order)  # max() keeps the first of equals
            return meta, n, "backward"
        if bad:  # updates, optimizer state, unknown tensors: earliest module first
            meta, n = min(bad, key=lambda b: b[0].order)
            return meta, n, "forward"
        return None

    def _fire(self, view: ReportView, loss_bad: bool) -> Alert:
        found = self.origin(view.nonfinite)
        loss_note = f"; the loss is {view.loss}" if loss_bad else ""
        if found is None:
            layer, tensor, value = LOSS_LAYER, "loss", float(view.loss)
            summary = f"Loss is {view.loss} at step {view.step} while every watched tensor is finite {_where(view)}"
        else:
            meta, n, direction = found
            layer, tensor, value = meta.layer, meta.name, float(n)
            others = len(view.nonfinite) - 1
            spread = f"; {others} more tensor{'s' if others != 1 else ''} non-finite" if others else ""
            summary = (f"NaN/Inf at step {view.step} started in layer {layer}: {n} non-finite values in "
                       f"{meta.kind_name} {tensor}, the first non-finite tensor in {direction} order"
                       f"{spread}{loss_note} {_where(view)}")
        return Alert(self.name, FIRING, view.run, view.step, view.rank, layer, tensor, value, 0.0, CRITICAL,
                     summary, iso(view.time))

    def firing(self) -> list[Alert]:
        return self.incidents.firing()

    def forget(self, run: str) -> None:
        self.incidents.forget(run)


class ExplodingGradient:
    """Gradient norm of a layer (or of the whole model) above exploding_abs_limit, or above
    exploding_ratio times the rolling median of that layer's last exploding_window norms on the same
    rank. The ratio test waits for exploding_min_history norms, so the erratic first steps of
    training stay quiet. Names the layer that exceeds its threshold by the largest factor."""

    name = "ExplodingGradient"

    def __init__(self, config: AggregatorConfig, counters: Counters | None = None):
        self.abs_limit = config.exploding_abs_limit
        self.ratio = config.exploding_ratio
        self.window = config.exploding_window
        self.min_history = config.exploding_min_history
        on_suppressed = (lambda: counters.add("alerts_suppressed")) if counters else None
        self.incidents = Hysteresis(config.resolve_after_steps, config.cooldown_steps, config.keep_firing_s,
                                    on_suppressed)
        # run -> (rank, layer) -> recent norms; bounded by the state's layer budget times the window.
        self.history: dict[str, dict[tuple[int, str], deque[float]]] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        if view.global_grad_norm is None:
            return []  # no gradients in this report (an eval step): no evidence either way
        history = self.history.setdefault(view.run, {})
        worst = None  # (rank key, layer, value, threshold, median, history length)
        items = list(view.grad_norms.items())
        items.append((GLOBAL_LAYER, view.global_grad_norm))
        for layer, value in items:
            if math.isnan(value):
                continue
            h = history.get((view.rank, layer))
            if h is None:
                h = history[(view.rank, layer)] = deque(maxlen=self.window)
            threshold, median = self.abs_limit, None
            # value > ratio * median needs value > ratio * min: skip the sort for almost every norm.
            if len(h) >= self.min_history and value > self.ratio * min(h):
                median = statistics.median(h)
                if median > 0:
                    threshold = min(threshold, self.ratio * median)
            n = len(h)
            h.append(value)
            if value > threshold:
                # Any exceeding layer is named before the global norm (which is never below a layer's
                # norm); among layers the largest excess, then the first in backward order.
                rank_key = (0, 0.0, 0) if layer == GLOBAL_LAYER else (
                    1, value / threshold, view.layer_order.get(layer, UNKNOWN_ORDER))
                if worst is None or rank_key > worst[0]:
                    worst = (rank_key, layer, value, threshold, median, n)
        key = (view.run, self.name)
        if worst is None:
            last = view.grad_norms

            def resolved(a: Alert) -> Alert:
                value = view.global_grad_norm if a.layer == GLOBAL_LAYER else last.get(a.layer, math.nan)
                return a.resolve(view.step, view.time, value, (
                    f"{_subject(a.layer)} back under its threshold for at least {self.incidents.resolve_after} "
                    f"consecutive reports up to step {view.step} (now {fmt(value)}); the incident began at step "
                    f"{a.step} {_where(view)}"))

            alert = self.incidents.clear(key, view, resolved)
        else:
            alert = self.incidents.bad(key, view, lambda: self._fire(view, *worst[1:]))
        return [alert] if alert else []

    def _fire(self, view: ReportView, layer: str, value: float, threshold: float, median: float | None,
              n: int) -> Alert:
        head = f"{_subject(layer)} is {fmt(value)} at step {view.step}"
        if median is not None and median > 0 and threshold < self.abs_limit:
            factor = value / median
            summary = f"{head}, {factor:.0f}x its median of {fmt(median)} over the last {n} steps"
            if value > self.abs_limit:
                summary += f" and above the absolute limit of {fmt(self.abs_limit)}"
            critical = factor > CRITICAL_FACTOR or value > CRITICAL_FACTOR * self.abs_limit
        else:
            summary = f"{head}, above the absolute limit of {fmt(self.abs_limit)}"
            critical = value > CRITICAL_FACTOR * self.abs_limit
        summary += f" {_where(view)}"
        return Alert(self.name, FIRING, view.run, view.step, view.rank, layer, "", value, threshold,
                     CRITICAL if critical else WARNING, summary, iso(view.time))

    def firing(self) -> list[Alert]:
        return self.incidents.firing()

    def forget(self, run: str) -> None:
        self.incidents.forget(run)
        self.history.pop(run, None)


def _subject(layer: str) -> str:
    return "Global gradient norm" if layer == GLOBAL_LAYER else f"Gradient norm of layer {layer}"


class RuleEngine:
    """The rules of one aggregator, in evaluation order."""

    def __init__(self, config: AggregatorConfig, counters: Counters | None = None, rules: list | None = None):
        self.rules = rules if rules is not None else [NonFinite(config, counters), ExplodingGradient(config, counters)]

    def evaluate(self, view: ReportView) -> list[Alert]:
        out: list[Alert] = []
        for rule in self.rules:
            out.extend(rule.evaluate(view))
        return out

    def firing(self) -> list[Alert]:
        return [a for rule in self.rules for a in rule.firing()]

    def forget(self, run: str) -> None:
        for rule in self.rules:
            rule.forget(run)
