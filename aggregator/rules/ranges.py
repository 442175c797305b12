"""OutOfRange: a metric outside the valid range a user marked for it (POST /api/v1/runs/{run}/ranges). The
ranges live in Redis (aggregator/ranges.py); the rule reads them itself, at most once per `refresh_s` per run,
so a range set through any replica's HTTP port reaches the replica that follows the run within that time."""

from __future__ import annotations

import math

from gradwatch.aggregator.alerts.record import Alert, fmt
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.merge import root
from gradwatch.aggregator.ranges import EVAL_LOSS, GRAD_NORM, Range, RangeCache, RangeStore, outside, value
from gradwatch.aggregator.report import GRADIENT, PARAMETER, ReportView, sum_squares
from gradwatch.aggregator.rules.base import GLOBAL_LAYER, LOSS_LAYER, RUN_LAYER, WARNING, Rule
from gradwatch.names import EVAL, LOSS, TRAIN


class OutOfRange(Rule):
    """A step's value of a metric outside the range a user marked for it: `loss`, `eval_loss`, `grad_norm`,
    `grad_norm/<layer>`, `param_norm/<layer>` or a user scalar such as `accuracy` (aggregator/ranges.py), both
    ends included, NaN always outside. Judged on every report of a single-rank run and every joined step of a
    multi-rank run (merged over its ranks), as /steps shows them; a report without any ranged metric is no
    evidence. One alert per run names the metric farthest outside (relative to the bound it crossed); it
    resolves once every ranged metric is back within its range (resolve_after_steps, default 1) or the ranges
    are removed. Ranges are read from Redis at most every `refresh_s` seconds per run. Default: refresh_s 5."""

    name = "OutOfRange"
    DEFAULTS = {"refresh_s": 5.0}
    LAYERS = False
    RESOLVE_AFTER = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranges: RangeCache | None = None  # none until the engine hands it a Redis client (read_from)

    def read_from(self, store: RangeStore, counters: Counters | None = None) -> None:
        on_error = (lambda e: counters.add("redis_errors")) if counters is not None else None
        self.ranges = RangeCache(store, float(self.p["refresh_s"]), on_error)

    def evaluate(self, view: ReportView) -> list[Alert]:
        if self.ranges is None:
            return []
        ranges = self.ranges.get(view.run)
        if not ranges:
            if (view.run, self.name) not in self.incidents.open:
                return []
            return self.transition(view, False, None, lambda a: self.resolved_after(
                view, a, "No range left to judge (removed)", math.nan))
        row = report_row(view, ranges)
        if not any(value(r.metric, row) is not None for r in ranges.values()):
            return []  # none of the ranged metrics in this report: no evidence either way
        bad = outside(ranges, row)
        if bad:
            r, v = max(bad, key=lambda rv: _excess(*rv))
            return self.transition(view, True, lambda: self._fire(view, r, v, len(bad)), None)

        def resolved(a: Alert) -> Alert:
            now = ranges.get(a.tensor)
            v = value(now.metric, row) if now is not None else None
            return self.resolved_after(view, a, f"{a.tensor} back within its valid range"
                                       + (f" {now.describe()} (now {fmt(v)})" if now and v is not None else ""),
                                       math.nan if v is None else v)
        return self.transition(view, False, None, resolved)

    def _fire(self, view: ReportView, r: Range, v: float, n: int) -> Alert:
        above = r.max is not None and (math.isnan(v) or v > r.max)
        bound = r.max if above else r.min
        side = "NaN, outside" if math.isnan(v) else ("above" if above else "below")
        summary = (f"{r.metric.name} is {fmt(v)} at step {view.step}, {side} its valid range {r.describe()}"
                   + (f"; {n - 1} more metric{'s' if n > 2 else ''} out of range too" if n > 1 else ""))
        return self.alert(view, _layer(r), r.metric.name, v, bound if bound is not None else math.nan, summary,
                          WARNING)

    def forget(self, run: str) -> None:
        super().forget(run)
        if self.ranges is not None:
            self.ranges.forget(run)

    @classmethod
    def check(cls, p):
        if not 0 < p["refresh_s"] <= 3600:
            raise ValueError("refresh_s: expected seconds in (0, 3600]")


def report_row(view: ReportView, ranges: dict[str, Range]) -> dict:
    """The report as a history row holds it (views.rows_of), with the layer norms only of the ranged layers."""
    row = {"phase": TRAIN if view.train else EVAL, "loss": view.loss, "grad_norm": view.global_grad_norm,
           "scalars": view.scalars}
    for field, kind in (("layers", GRADIENT), ("param_norms", PARAMETER)):
        wanted = {r.metric.key for r in ranges.values() if r.metric.field == field}
        if wanted:
            sq: dict[str, float] = {}
            for meta, s in view.of_kind(kind):
                if meta.layer in wanted:
                    sq[meta.layer] = sq.get(meta.layer, 0.0) + sum_squares(s)
            row[field] = {layer: root(v) for layer, v in sq.items()}
    return row


def _excess(r: Range, v: float) -> float:
    """How far outside, relative to the bound crossed: NaN the farthest."""
    if math.isnan(v):
        return math.inf
    bound = r.max if r.max is not None and v > r.max else r.min
    return abs(v - bound) / max(abs(bound), 1e-12)


def _layer(r: Range) -> str:
    m = r.metric
    if m.name in (LOSS, EVAL_LOSS):
        return LOSS_LAYER
    if m.name == GRAD_NORM:
        return GLOBAL_LAYER
    return m.key if m.field in ("layers", "param_norms") else RUN_LAYER
