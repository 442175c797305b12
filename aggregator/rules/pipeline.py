"""Rules on gradwatch's own pipeline rather than on the model: StreamDataLost, a run's report-stream entries
removed before any aggregator applied them (fed by the fenced commit's retention count,
aggregator/ingest/retention.py); AgentDataLost, step reports an agent lost before delivery (fed by the count its
next delivered report carries). Neither is fed by a report's statistics; both resolve on this aggregator's clock."""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.aggregator.alerts.record import FIRING, Alert, iso
from gradwatch.aggregator.report import ReportView
from gradwatch.aggregator.rules.base import CRITICAL, RUN_LAYER, WARNING, Rule


@dataclass(slots=True)
class _Loss:
    alert: Alert
    last: float   # when the latest loss was counted (unix seconds)
    entries: int  # lost during this incident


class _PipelineLoss(Rule):
    """An incident per run: fires at the first loss counted, more losses while it fires extend it, resolves after
    keep_firing_s without a further loss. No report shows what is missing: the caller counts it (`lost`)."""

    LAYERS = False
    RESOLVE_AFTER = 1
    SEVERITY = CRITICAL

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open: dict[str, _Loss] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        return []

    def summary(self, run: str, entries: int, total: int, where: str) -> str:
        raise NotImplementedError

    def resolved(self, run: str, quiet: float, entries: int) -> str:
        raise NotImplementedError

    def lost(self, run: str, entries: int, total: int, step: int, now: float, where: str = "") -> list[Alert]:
        """`entries` of `run` newly found lost (`total` since the run began), its latest step known."""
        loss = self.open.get(run)
        if loss is not None:
            loss.last, loss.entries = now, loss.entries + entries
            return []
        alert = Alert(self.name, FIRING, run, max(step, 0), 0, RUN_LAYER, "", float(entries), 0.0,
                      self.settings.severity or self.SEVERITY, self.summary(run, entries, total, where), iso(now))
        self.open[run] = _Loss(alert, now, entries)
        return [alert]

    def evaluate_idle(self, now: float) -> list[Alert]:
        out = []
        quiet = self.settings.keep_firing_s
        for run, loss in list(self.open.items()):
            if now - loss.last >= quiet:
                del self.open[run]
                out.append(loss.alert.resolve(loss.alert.step, now, float(loss.entries),
                                              self.resolved(run, quiet, loss.entries)))
        return out

    def firing(self) -> list[Alert]:
        return [loss.alert for loss in self.open.values()]

    def forget(self, run: str) -> None:
        super().forget(run)
        self.open.pop(run, None)


class StreamDataLost(_PipelineLoss):
    """Entries of a run's report stream that left it before any aggregator replica applied them: the
    collector's hard cap (`stream_maxlen`, `XADD MAXLEN ~`) trimmed a backlog no replica had read (every
    replica down, or far behind), or an entry a dead replica had read was trimmed before its successor
    claimed it. The count is exact (docs/architecture.md#stream-retention). Fires when a commit finds a
    loss, naming the run and the entries lost; more losses while it fires extend the incident; resolves
    after keep_firing_s without a further loss. Critical."""

    name = "StreamDataLost"

    def summary(self, run: str, entries: int, total: int, where: str) -> str:
        return (f"Run {run} lost {entries} report-stream entries before any aggregator applied them ({total} in all "
                f"for this run): the collector's hard cap (GRADWATCH_COLLECTOR_STREAM_MAXLEN) trimmed a backlog no "
                f"aggregator had read. Steps are missing from its metrics, history and rules; keep an aggregator "
                f"running or raise the cap")

    def resolved(self, run: str, quiet: float, entries: int) -> str:
        return (f"No further loss from the report stream of run {run} for {quiet:.0f} s; {entries} entries were lost "
                f"in this incident")


class AgentDataLost(_PipelineLoss):
    """Step reports an agent lost before delivering them, as it says in its next delivered report
    (`dropped_reports`): dropped from its bounded queue (the collector unreachable or too slow for longer than
    the queue holds) or never made (every host slot still in flight: the reader thread behind the training
    loop). Those steps are missing from the run's metrics, history and rules; without this rule only the
    training process's own counters would know. Fires at the first loss, naming the run, the rank and the
    reports lost; more losses while it fires extend the incident; resolves after keep_firing_s without a
    further loss. Warning: the model is not at fault, the picture of it has holes."""

    name = "AgentDataLost"
    SEVERITY = WARNING

    def summary(self, run: str, entries: int, total: int, where: str) -> str:
        return (f"Run {run}: {where} lost {entries} step report{'s' if entries != 1 else ''} before delivering "
                f"{'them' if entries != 1 else 'it'} ({total} in all for this run, as this aggregator saw it): its "
                f"queue was full (the collector unreachable or slow; agent queue_size) or every host slot was in "
                f"flight (agent host_slots). Those steps are missing from the metrics, history and rules")

    def resolved(self, run: str, quiet: float, entries: int) -> str:
        return (f"No further report lost by the agents of run {run} for {quiet:.0f} s; {entries} were lost in this "
                f"incident")
