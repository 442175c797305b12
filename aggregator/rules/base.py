"""What every rule shares: its settings (thresholds, severity, layer patterns, hysteresis), the base
class that holds its incidents, and small helpers (layer filters, per-tensor streaks)."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import ClassVar

from gradwatch.aggregator.alerts.record import FIRING, Alert, Hysteresis, iso
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.report import ReportView, TensorMeta
from gradwatch.names import LOSS_MODULE
from gradwatch.v1 import run_pb2

CRITICAL = "critical"
WARNING = "warning"
INFO = "info"
SEVERITIES = (INFO, WARNING, CRITICAL)
GLOBAL_LAYER = "(global)"
LOSS_LAYER = LOSS_MODULE  # the loss, where an alert names a layer
RUN_LAYER = "(run)"
KINDS = {"parameter": run_pb2.TENSOR_KIND_PARAMETER, "gradient": run_pb2.TENSOR_KIND_GRADIENT,
         "activation": run_pb2.TENSOR_KIND_ACTIVATION, "input": run_pb2.TENSOR_KIND_INPUT,
         "activation_gradient": run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT}


@dataclass
class RuleSettings:
    """One rule's configuration: the catalogue defaults, overridden by the rules file."""

    enabled: bool = True
    severity: str | None = None          # None: the rule's own choice (warning, critical for extremes)
    include: tuple[str, ...] = ("*",)    # glob patterns on the layer (module path)
    exclude: tuple[str, ...] = ()
    resolve_after_steps: int = 5
    cooldown_steps: int = 50
    keep_firing_s: float = 300.0
    params: dict[str, object] = field(default_factory=dict)

    @classmethod
    def defaults(cls, rule: type[Rule], config: AggregatorConfig) -> RuleSettings:
        return cls(include=rule.INCLUDE, exclude=rule.EXCLUDE,
                   resolve_after_steps=rule.RESOLVE_AFTER or config.resolve_after_steps,
                   cooldown_steps=config.cooldown_steps, keep_firing_s=config.keep_firing_s,
                   params=rule.defaults(config))


class LayerFilter:
    """include/exclude globs on layer names; each layer is matched once, then remembered."""

    def __init__(self, include: tuple[str, ...], exclude: tuple[str, ...]):
        self.include, self.exclude = include, exclude
        self.everything = include == ("*",) and not exclude
        self._seen: dict[str, bool] = {}

    def __call__(self, layer: str) -> bool:
        if self.everything:
            return True
        ok = self._seen.get(layer)
        if ok is None:
            ok = (any(fnmatch.fnmatchcase(layer, p) for p in self.include)
                  and not any(fnmatch.fnmatchcase(layer, p) for p in self.exclude))
            if len(self._seen) < 100_000:  # layer names come from the runs: bound the memory
                self._seen[layer] = ok
        return ok


class Streaks:
    """Consecutive reports in which a (run, rank) tensor met a condition. Only the tensors that meet
    it now are stored, so a healthy report costs nothing here."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, int], dict[str, int]] = {}

    def update(self, run: str, rank: int, hits: list[str]) -> dict[str, int]:
        """hits: the tensors meeting the condition in this report; returns their streak lengths."""
        old = self.runs.get((run, rank))
        if not hits and not old:
            return {}
        old = old or {}
        new = {name: old.get(name, 0) + 1 for name in hits}
        self.runs[(run, rank)] = new
        return new

    def forget(self, run: str) -> None:
        for key in [k for k in self.runs if k[0] == run]:
            del self.runs[key]


class Rule:
    """Base of every rule: `evaluate(view)` returns alert transitions; one incident per (run, rule)."""

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, object]] = {}
    # Keys of DEFAULTS that are lists of tensor kinds ("parameter", "gradient", "activation", ...).
    KIND_KEYS: ClassVar[tuple[str, ...]] = ()
    LAYERS: ClassVar[bool] = True           # whether `layers` include/exclude apply
    INCLUDE: ClassVar[tuple[str, ...]] = ("*",)
    EXCLUDE: ClassVar[tuple[str, ...]] = ()
    RESOLVE_AFTER: ClassVar[int | None] = None  # None: the aggregator's resolve_after_steps

    def __init__(self, settings: RuleSettings | None = None, counters: Counters | None = None,
                 config: AggregatorConfig | None = None):
        self.settings = settings or RuleSettings.defaults(type(self), config or AggregatorConfig())
        self.p = self.settings.params
        on_suppressed = (lambda: counters.add("alerts_suppressed")) if counters else None
        self.incidents = Hysteresis(self.settings.resolve_after_steps, self.settings.cooldown_steps,
                                    self.settings.keep_firing_s, on_suppressed)
        self.layers = LayerFilter(self.settings.include, self.settings.exclude)

    @classmethod
    def defaults(cls, config: AggregatorConfig) -> dict[str, object]:
        return dict(cls.DEFAULTS)

    @classmethod
    def check(cls, params: dict[str, object]) -> None:
        """Raises ValueError naming the threshold that is out of range."""

    def kinds(self, key: str = "kinds") -> tuple[int, ...]:
        return tuple(KINDS[k] for k in self.p[key])

    def evaluate(self, view: ReportView) -> list[Alert]:
        raise NotImplementedError

    def evaluate_idle(self, now: float) -> list[Alert]:
        """Time-driven rules: called periodically with this aggregator's clock (unix seconds)."""
        return []

    def transition(self, view: ReportView, bad: bool, make_firing, make_resolved) -> list[Alert]:
        """The Hysteresis step for this rule's (run) incident."""
        key = (view.run, self.name)
        if bad:
            alert = self.incidents.bad(key, view, make_firing)
        else:
            alert = self.incidents.clear(key, view, make_resolved)
        return [alert] if alert else []

    def alert(self, view, layer: str, tensor: str, value: float, threshold: float, summary: str,
              severity: str = WARNING) -> Alert:
        return Alert(self.name, FIRING, view.run, view.step, view.rank, layer, tensor, float(value),
                     float(threshold), self.settings.severity or severity, f"{summary} {where(view)}",
                     iso(view.time))

    def resolved_after(self, view, a: Alert, what: str, value: float = 0.0) -> Alert:
        return a.resolve(view.step, view.time, value, (
            f"{what} for at least {self.incidents.resolve_after} consecutive reports up to step {view.step}; "
            f"the incident began at step {a.step} in {a.layer} {where(view)}"))

    def firing(self) -> list[Alert]:
        return self.incidents.firing()

    def forget(self, run: str) -> None:
        self.incidents.forget(run)


def where(view) -> str:
    return f"(run {view.run}, rank {view.rank})"


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


class TensorRule(Rule):
    """A per-tensor condition that must hold in `window` consecutive reports of a rank. Subclasses give
    `hits(view)`: (tensor, value) for the tensors meeting it now, or None when the report holds no
    evidence either way (none of the kinds the rule reads); `value(s)` for one summary; `describe()`
    for the sentence. The alert names the worst tensor: the largest `badness(value)`, then the
    earliest in forward order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streaks = Streaks()

    def hits(self, view: ReportView) -> list[tuple[TensorMeta, float]] | None:
        raise NotImplementedError

    def value(self, s) -> float:
        raise NotImplementedError

    def badness(self, value: float) -> float:
        return value

    def describe(self, meta: TensorMeta, value: float, reports: int, view: ReportView) -> tuple[str, float, str]:
        """(sentence, threshold, severity) of a firing alert."""
        raise NotImplementedError

    def has_kinds(self, view: ReportView, kinds: tuple[int, ...]) -> bool:
        return any(view.of_kind(k) for k in kinds)

    def evaluate(self, view: ReportView) -> list[Alert]:
        hits = self.hits(view)
        if hits is None:
            return []
        streak = self.streaks.update(view.run, view.rank, [m.name for m, _ in hits])
        window = self.p["window"]
        bad = [h for h in hits if streak[h[0].name] >= window]
        if bad:
            meta, value = max(bad, key=lambda h: (self.badness(h[1]), -h[0].order))

            def fire() -> Alert:
                sentence, threshold, severity = self.describe(meta, value, streak[meta.name], view)
                if len(bad) > 1:
                    sentence += f"; {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''} too"
                return self.alert(view, meta.layer, meta.name, value, threshold, sentence, severity)
            return self.transition(view, True, fire, None)

        def resolved(a: Alert) -> Alert:
            now = next((self.value(s) for m, s in view.tensors if m.name == a.tensor), math.nan)
            return self.resolved_after(view, a, f"{a.tensor} back within limits", now)
        return self.transition(view, False, None, resolved)

    def forget(self, run: str) -> None:
        super().forget(run)
        self.streaks.forget(run)
