"""Valid ranges users mark on a run's metrics: what a metric name means, the range itself, where ranges live in
Redis, and which of a step's values lie outside. The OutOfRange rule (aggregator/rules/ranges.py) alerts on them,
the query API marks them in /steps (aggregator/http/stats_routes.py); both judge a step through `values`, so the
view highlights exactly the steps the rule fires on.

Metric names (one per curve of the run's history, /steps):

  loss                 the training loss               eval_loss            the evaluation loss
  grad_norm            the global gradient norm        grad_norm/<layer>    a layer's gradient norm
  param_norm/<layer>   a layer's parameter norm        <name>               a user scalar (accuracy), any phase

A range is [min, max], both ends included, either end open (None). NaN is outside every range; a step without
the metric is no evidence either way.

Key (under the run's hash tag, gradwatch.streams; the run's other keys' retention and deletion apply):

  gradwatch:{<run>}:history-ranges  HASH  metric -> JSON {"min": number|null, "max": number|null, "set_at": unix s}

Writes come from the HTTP port (the API token); readers cache them: `RangeCache` asks Redis at most once per
`refresh_s` per run, so a range set on any replica reaches the rule of the replica that follows the run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gradwatch.aggregator.ingest.client import REDIS_ERRORS
from gradwatch.names import LOSS, NOT_USER_PREFIXES
from gradwatch.streams import ranges_key

MAX_RANGES = 256          # per run: each costs a lookup per report in the rule
MAX_METRIC_CHARS = 512    # a layer's module path can be long
DEFAULT_REFRESH_S = 5.0

EVAL_LOSS = "eval_loss"
GRAD_NORM = "grad_norm"
GRAD_NORM_PREFIX = "grad_norm/"
PARAM_NORM_PREFIX = "param_norm/"


@dataclass(frozen=True, slots=True)
class Metric:
    """Where a metric's value sits in a history row (aggregator/http/views.rows_of): `field` of the row, `key`
    inside it for a mapping (layers, param_norms, scalars), `phase` when only one phase counts."""

    name: str
    field: str
    key: str | None = None
    phase: str | None = None


def parse_metric(name: str) -> Metric:
    """The metric a name means; ValueError saying what names are accepted."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_CHARS or name != name.strip():
        raise ValueError(f"metric: a name of 1-{MAX_METRIC_CHARS} characters without surrounding blanks")
    if name == LOSS:
        return Metric(name, "loss", phase="train")
    if name == EVAL_LOSS:
        return Metric(name, "loss", phase="eval")
    if name == GRAD_NORM:
        return Metric(name, "grad_norm")
    for prefix, field in ((GRAD_NORM_PREFIX, "layers"), (PARAM_NORM_PREFIX, "param_norms")):
        if name.startswith(prefix):
            if len(name) == len(prefix):
                raise ValueError(f"metric: {prefix}<layer> needs the layer's module path")
            return Metric(name, field, name[len(prefix):])
    if name.startswith(NOT_USER_PREFIXES):
        raise ValueError(f"metric: {name!r} is not a user scalar (learning rates and label counts have no range); "
                         f"use loss, eval_loss, grad_norm, grad_norm/<layer>, param_norm/<layer> or a scalar's name")
    return Metric(name, "scalars", name)


@dataclass(frozen=True, slots=True)
class Range:
    metric: Metric
    min: float | None
    max: float | None
    set_at: float = 0.0

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "+inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"

    def to_dict(self) -> dict:
        return {"metric": self.metric.name, "min": self.min, "max": self.max, "set_at": self.set_at}


def make_range(metric: object, lo: object, hi: object, set_at: float | None = None) -> Range:
    """A range from what a client sent; ValueError naming what is wrong."""
    m = parse_metric(metric)  # type: ignore[arg-type]
    bounds = []
    for name, v in (("min", lo), ("max", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{name}: a finite number or null (open), not {v!r}")
        bounds.append(None if v is None else float(v))
    if bounds[0] is None and bounds[1] is None:
        raise ValueError("min, max: give at least one bound")
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise ValueError(f"min, max: min {bounds[0]:g} is above max {bounds[1]:g}")
    return Range(m, bounds[0], bounds[1], time.time() if set_at is None else set_at)


def decode(metric: bytes | str, raw: bytes | str) -> Range | None:
    """A stored range; None for one that no longer parses (written by a newer aggregator, or by hand)."""
    try:
        name = metric.decode() if isinstance(metric, bytes) else metric
        doc = json.loads(raw)
        return make_range(name, doc.get("min"), doc.get("max"), float(doc.get("set_at", 0.0)))
    except (ValueError, TypeError, AttributeError):
        return None


class RangeStore:
    """The ranges of runs in Redis, on the aggregator's client (each call names one run's key: cluster-safe)."""

    def __init__(self, client):
        self.client = client

    def all(self, run: str) -> dict[str, Range]:
        out = {}
        for metric, raw in self.client.hgetall(ranges_key(run)).items():
            r = decode(metric, raw)
            if r is not None:
                out[r.metric.name] = r
        return dict(sorted(out.items()))

    def set(self, run: str, r: Range) -> bool:
        """Stores `r` (replacing the metric's range); False when the run holds MAX_RANGES others already."""
        key = ranges_key(run)
        held = self.client.hgetall(key)
        name = r.metric.name
        if len(held) >= MAX_RANGES and name.encode() not in held and name not in held:
            return False
        self.client.hset(key, name, json.dumps({"min": r.min, "max": r.max, "set_at": r.set_at}))
        return True

    def delete(self, run: str, metric: str) -> bool:
        return bool(self.client.hdel(ranges_key(run), metric))


class RangeCache:
    """Each run's ranges as Redis held them at most `refresh_s` ago. A failed read keeps what was known and is
    tried again after `refresh_s` (counted in `on_error`); runs are dropped with `forget`."""

    def __init__(self, store: RangeStore, refresh_s: float = DEFAULT_REFRESH_S,
                 on_error: Callable[[Exception], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.refresh_s = refresh_s
        self.on_error = on_error
        self.clock = clock
        self._runs: dict[str, tuple[float, dict[str, Range]]] = {}

    def get(self, run: str) -> dict[str, Range]:
        now = self.clock()
        cached = self._runs.get(run)
        if cached is not None and now < cached[0]:
            return cached[1]
        try:
            ranges = self.store.all(run)
        except REDIS_ERRORS as e:
            if self.on_error is not None:
                self.on_error(e)
            ranges = cached[1] if cached is not None else {}
        self._runs[run] = (now + self.refresh_s, ranges)
        return ranges

    def forget(self, run: str) -> None:
        self._runs.pop(run, None)


def value(metric: Metric, row: dict) -> float | None:
    """The metric's value in a history row (or a row built from a report, as OutOfRange builds it); None when
    the row does not hold it."""
    if metric.phase is not None and row.get("phase") != metric.phase:
        return None
    v = row.get(metric.field)
    if metric.key is not None:
        v = v.get(metric.key) if isinstance(v, dict) else None
    return None if v is None else float(v)


def outside(ranges: dict[str, Range], row: dict) -> list[tuple[Range, float]]:
    """The ranges the row's values leave, with the value, in metric order."""
    out = []
    for r in ranges.values():
        v = value(r.metric, row)
        if v is not None and not r.contains(v):
            out.append((r, v))
    return out


def mark(rows: list[dict], ranges: dict[str, Range]) -> None:
    """Adds `out_of_range` (the metrics outside their range, [] when none) to each row, when the run has ranges.
    Rows read back from a history tier carry a bucket's means: a mean judged, not each step."""
    if not ranges:
        return
    for row in rows:
        row["out_of_range"] = [r.metric.name for r, _ in outside(ranges, row)]
