"""Gradient-norm rules, evaluated on every applied report: pure classes that turn ReportViews into alert
transitions (firing / resolved). No I/O here: the consumer writes what they return. NaN/Inf is
NonFinite's (rules/nonfinite.py)."""

from __future__ import annotations

import math
import statistics
from collections import deque

from gradwatch.aggregator.alerts.record import FIRING, Alert, fmt, iso, times
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.report import UNKNOWN_ORDER, ReportView
from gradwatch.aggregator.rules.base import CRITICAL, GLOBAL_LAYER, WARNING, Rule, Streaks, where
from gradwatch.stats import summary_moments
from gradwatch.v1 import run_pb2

CRITICAL_FACTOR = 1000.0
_where = where


class _Window:
    """The last `size` norms of one (rank, layer) and their running minimum (a monotonic queue: each
    value enters and leaves it once), so the ratio test below costs O(1) per norm."""

    __slots__ = ("values", "mins")

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)
        self.mins: deque[float] = deque()  # non-decreasing: the window's minimum first

    @property
    def low(self) -> float:
        return self.mins[0] if self.mins else math.inf

    def append(self, value: float) -> None:
        values, mins = self.values, self.mins
        if len(values) == values.maxlen and mins[0] == values[0]:
            mins.popleft()  # the oldest value, leaving the window, was the minimum
        values.append(value)
        while mins and mins[-1] > value:
            mins.pop()
        mins.append(value)


class ExplodingGradient(Rule):
    """Gradient norm of a layer (or of the whole model) above exploding_abs_limit, or above
    exploding_ratio times the rolling median of that layer's last exploding_window norms on the same
    rank. The ratio test waits for exploding_min_history norms, so the erratic first steps of
    training stay quiet. Names the layer that exceeds its threshold by the largest factor. Defaults
    (SageMaker Debugger has no ratio test; its threshold is an absolute limit): abs_limit 1e4, ratio 10,
    window 50, min_history 10; the rules file's values override the GRADWATCH_AGGREGATOR_EXPLODING_*
    settings."""

    name = "ExplodingGradient"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.abs_limit = float(self.p["abs_limit"])
        self.ratio = float(self.p["ratio"])
        self.window = int(self.p["window"])
        self.min_history = int(self.p["min_history"])
        # run -> (rank, layer) -> recent norms; bounded by the state's layer budget times the window.
        self.history: dict[str, dict[tuple[int, str], _Window]] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        if view.global_grad_norm is None:
            return []  # no gradients in this report (an eval step): no evidence either way
        history = self.history.setdefault(view.run, {})
        worst = None  # (rank key, layer, value, threshold, median, history length)
        items = list(view.grad_norms.items())
        items.append((GLOBAL_LAYER, view.global_grad_norm))
        for layer, value in items:
            if math.isnan(value) or not (layer == GLOBAL_LAYER or self.layers(layer)):
                continue
            w = history.get((view.rank, layer))
            if w is None:
                w = history[(view.rank, layer)] = _Window(self.window)
            threshold, median = self.abs_limit, None
            n = len(w.values)
            # value > ratio * median needs value > ratio * min: skip the sort for almost every norm.
            if n >= self.min_history and value > self.ratio * w.low:
                median = statistics.median(w.values)
                if median > 0:
                    threshold = min(threshold, self.ratio * median)
            w.append(value)
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
            summary = f"{head}, {times(factor)}x its median of {fmt(median)} over the last {n} steps"
            if value > self.abs_limit:
                summary += f" and above the absolute limit of {fmt(self.abs_limit)}"
            critical = factor > CRITICAL_FACTOR or value > CRITICAL_FACTOR * self.abs_limit
        else:
            summary = f"{head}, above the absolute limit of {fmt(self.abs_limit)}"
            critical = value > CRITICAL_FACTOR * self.abs_limit
        summary += f" {_where(view)}"
        return Alert(self.name, FIRING, view.run, view.step, view.rank, layer, "", value, threshold,
                     self.settings.severity or (CRITICAL if critical else WARNING), summary, iso(view.time))

    @classmethod
    def defaults(cls, config: AggregatorConfig) -> dict[str, object]:
        return {"abs_limit": config.exploding_abs_limit, "ratio": config.exploding_ratio,
                "window": config.exploding_window, "min_history": config.exploding_min_history}

    @classmethod
    def check(cls, p: dict[str, object]) -> None:
        if not p["abs_limit"] > 0:
            raise ValueError("abs_limit: expected a norm > 0 (inf disables it)")
        if not (math.isfinite(p["ratio"]) and p["ratio"] > 1):
            raise ValueError("ratio: expected a factor > 1")
        if not 1 <= p["min_history"] <= p["window"]:
            raise ValueError("min_history: expected an integer from 1 to window")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.history.pop(run, None)


def _subject(layer: str) -> str:
    return "Global gradient norm" if layer == GLOBAL_LAYER else f"Gradient norm of layer {layer}"


class VanishingGradient(Rule):
    """Gradients of a layer too small to train it: the layer's gradient RMS, sqrt(sum of squares /
    element count) over its gradient tensors, below `threshold` for `window` consecutive reports of
    a rank. SageMaker Debugger tests the mean |g| against 1e-7; reports carry no sum of |g|, and the
    RMS is never below the mean |g|, so RMS < 1e-7 implies mean |g| < 1e-7 (this test fires no more
    often than SageMaker's). A layer whose gradients are all exactly zero is AllZero's, not this
    rule's; `window` keeps the first steps quiet (a zero-initialised head leaves every earlier
    gradient zero or tiny at step 0). Names the layer with the smallest RMS. Defaults: threshold 1e-7,
    window 5."""

    name = "VanishingGradient"
    DEFAULTS = {"threshold": 1e-7, "window": 5}
    # An RMS below the threshold needs norm < threshold * sqrt(elements); no layer has 1e12 elements,
    # so layers with a larger norm are skipped without reading their tensors.
    _MAX_SQRT_ELEMENTS = 1e6

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streaks = Streaks()

    def rms(self, view: ReportView, candidates: set[str] | None = None) -> dict[str, float]:
        """RMS of the candidate layers (default: under the norm bound) that are not all zero."""
        if candidates is None:
            bound = self.p["threshold"] * self._MAX_SQRT_ELEMENTS
            candidates = {layer for layer, norm in view.grad_norms.items() if norm < bound and self.layers(layer)}
        if not candidates:
            return {}
        acc: dict[str, list] = {}
        for meta, s in view.of_kind(run_pb2.TENSOR_KIND_GRADIENT):
            if meta.layer in candidates:
                a = acc.get(meta.layer)
                if a is None:
                    a = acc[meta.layer] = [0.0, 0, 0]
                a[0] += s.sum_squares
                a[1] += summary_moments(s)[0]  # finite elements
                a[2] += s.count - s.zero_count
        return {layer: math.sqrt(max(ss, 0.0) / n) for layer, (ss, n, nonzero) in acc.items() if n and nonzero}

    def evaluate(self, view: ReportView) -> list[Alert]:
        if view.global_grad_norm is None:
            return []  # no gradients in this report: no evidence either way
        rms = self.rms(view)
        threshold = self.p["threshold"]
        low = [layer for layer, r in rms.items() if r < threshold]
        streak = self.streaks.update(view.run, view.rank, low)
        bad = [layer for layer in low if streak[layer] >= self.p["window"]]
        if bad:
            layer = min(bad, key=lambda x: (rms[x], view.layer_order.get(x, UNKNOWN_ORDER)))
            value = rms[layer]

            def fire() -> Alert:
                more = f"; {len(bad) - 1} more layer{'s' if len(bad) > 2 else ''} below it" if len(bad) > 1 else ""
                return self.alert(view, layer, "", value, threshold, (
                    f"Gradients of layer {layer} vanish: RMS {fmt(value)} < {fmt(threshold)} for {streak[layer]} "
                    f"consecutive reports up to step {view.step}{more}"))
            return self.transition(view, True, fire, None)
        return self.transition(view, False, None, lambda a: self.resolved_after(
            view, a, f"Gradients of layer {a.layer} above {fmt(threshold)}",
            self.rms(view, {a.layer}).get(a.layer, 0.0)))

    def forget(self, run: str) -> None:
        super().forget(run)
        self.streaks.forget(run)
