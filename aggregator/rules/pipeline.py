"""Rules on gradwatch's own pipeline rather than on the model: StreamDataLost, a run's report-stream entries
removed before any aggregator applied them. Fed by the fenced commit's retention count
(aggregator/ingest/retention.py), not by reports; resolved on this aggregator's clock."""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.aggregator.alerts.record import FIRING, Alert, iso
from gradwatch.aggregator.report import ReportView
from gradwatch.aggregator.rules.base import CRITICAL, RUN_LAYER, Rule


@dataclass(slots=True)
class _Loss:
    alert: Alert
    last: float   # when the latest loss was counted (unix seconds)
    entries: int  # lost during this incident


class StreamDataLost(Rule):
    """Entries of a run's report stream that left it before any aggregator replica applied them: the
    collector's hard cap (`stream_maxlen`, `XADD MAXLEN ~`) trimmed a backlog no replica had read (every
    replica down, or far behind), or an entry a dead replica had read was trimmed before its successor
    claimed it. The count is exact (docs/architecture.md#stream-retention). Fires when a commit finds a
    loss, naming the run and the entries lost; more losses while it fires extend the incident; resolves
    after keep_firing_s without a further loss. Always critical."""

    name = "StreamDataLost"
    LAYERS = False
    RESOLVE_AFTER = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open: dict[str, _Loss] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        return []  # no report shows what is missing: the commit counts it

    def lost(self, run: str, entries: int, total: int, step: int, now: float) -> list[Alert]:
        """`entries` of `run` newly found lost (`total` since the run began), its latest step known."""
        loss = self.open.get(run)
        if loss is not None:
            loss.last, loss.entries = now, loss.entries + entries
            return []
        alert = Alert(self.name, FIRING, run, max(step, 0), 0, RUN_LAYER, "", float(entries), 0.0,
                      self.settings.severity or CRITICAL,
                      f"Run {run} lost {entries} report-stream entries before any aggregator applied them "
                      f"({total} in all for this run): the collector's hard cap (GRADWATCH_COLLECTOR_STREAM_MAXLEN) "
                      f"trimmed a backlog no aggregator had read. Steps are missing from its metrics, history and "
                      f"rules; keep an aggregator running or raise the cap", iso(now))
        self.open[run] = _Loss(alert, now, entries)
        return [alert]

    def evaluate_idle(self, now: float) -> list[Alert]:
        out = []
        quiet = self.settings.keep_firing_s
        for run, loss in list(self.open.items()):
            if now - loss.last >= quiet:
                del self.open[run]
                out.append(loss.alert.resolve(loss.alert.step, now, float(loss.entries), (
                    f"No further loss from the report stream of run {run} for {quiet:.0f} s; {loss.entries} "
                    f"entries were lost in this incident")))
        return out

    def firing(self) -> list[Alert]:
        return [loss.alert for loss in self.open.values()]

    def forget(self, run: str) -> None:
        super().forget(run)
        self.open.pop(run, None)
