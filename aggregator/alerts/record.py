"""The alert record shared by rules, the alert stream and Alertmanager, and the hysteresis that makes
one incident one alert."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.aggregator.report import ReportView

FIRING = "firing"
RESOLVED = "resolved"


def iso(t: float) -> str:
    """RFC 3339 / ISO-8601 in UTC, as Alertmanager parses it."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fmt(x: float) -> str:
    """Two significant digits: enough for a person, short in a sentence."""
    return f"{x:.2g}" if math.isfinite(x) else str(x)


def times(x: float) -> str:
    """A ratio for a sentence: 5.0, 540, 1.2e+10 (never fifteen digits)."""
    if not math.isfinite(x) or x >= 1e6:
        return fmt(x)
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def json_number(x: float) -> float | str:
    """JSON has no NaN/Inf: they are spelled the way Prometheus does, as strings."""
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("+Inf" if x > 0 else "-Inf")


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    status: str
    run: str
    step: int
    rank: int
    layer: str
    tensor: str
    value: float
    threshold: float
    severity: str
    summary: str
    starts_at: str
    ends_at: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value"] = json_number(float(self.value))
        d["threshold"] = json_number(float(self.threshold))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    def resolve(self, step: int, t: float, value: float, summary: str) -> Alert:
        """The resolved transition of this (firing) alert: same identity, so Alertmanager matches it."""
        return replace(self, status=RESOLVED, step=step, value=value, summary=summary, ends_at=iso(t))


class _Incident:
    __slots__ = ("alert", "started", "clear")

    def __init__(self, alert: Alert, rank: int, started: float):
        self.alert = alert
        self.started = started
        # Consecutive clear reports of each rank that saw the condition; the incident ends when every
        # such rank has been clear for resolve_after reports.
        self.clear = {rank: 0}


class Hysteresis:
    """Turns a per-report condition into transitions: one firing alert per incident, resolved only
    after `resolve_after` consecutive clear reports and `keep_firing_s` seconds (report time) after it
    fired, and no new alert for the same key within `cooldown_steps` steps of the previous one (a
    flapping condition is one incident)."""

    def __init__(self, resolve_after: int, cooldown_steps: int, keep_firing_s: float = 0.0,
                 on_suppressed: Callable[[], None] | None = None):
        self.resolve_after = resolve_after
        self.cooldown_steps = cooldown_steps
        self.keep_firing_s = keep_firing_s
        self.on_suppressed = on_suppressed
        self.open: dict[tuple, _Incident] = {}
        self._last_fired: dict[tuple, int] = {}
        self._quiet: set[tuple] = set()

    def bad(self, key: tuple, view: ReportView, make: Callable[[], Alert]) -> Alert | None:
        incident = self.open.get(key)
        if incident is not None:
            incident.clear[view.rank] = 0
            return None
        last = self._last_fired.get(key)
        # A step before the last alert means the run restarted from a checkpoint: a new incident.
        if last is not None and 0 <= view.step - last < self.cooldown_steps:
            if key not in self._quiet and self.on_suppressed is not None:
                self.on_suppressed()
            self._quiet.add(key)
            return None
        self._quiet.discard(key)
        alert = make()
        self.open[key] = _Incident(alert, view.rank, view.time)
        self._last_fired[key] = view.step
        return alert

    def clear(self, key: tuple, view: ReportView, make: Callable[[Alert], Alert]) -> Alert | None:
        self._quiet.discard(key)
        incident = self.open.get(key)
        if incident is None:
            return None
        if view.rank in incident.clear:
            incident.clear[view.rank] += 1
            if incident.clear[view.rank] >= self.resolve_after:
                del incident.clear[view.rank]
        if incident.clear or view.time - incident.started < self.keep_firing_s:
            return None
        del self.open[key]
        return make(incident.alert)

    def firing(self) -> list[Alert]:
        return [i.alert for i in self.open.values()]

    def forget(self, run: str) -> None:
        for d in (self.open, self._last_fired):
            for key in [k for k in d if k[0] == run]:
                del d[key]
        self._quiet = {k for k in self._quiet if k[0] != run}
