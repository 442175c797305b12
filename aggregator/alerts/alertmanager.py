"""Pushes alert transitions to Alertmanager's v2 API (POST /api/v2/alerts) from a background thread.

The consumer never waits on Alertmanager: the queue, timeouts and retries are push.JsonPusher's.
Alertmanager ends an alert without endsAt after its resolve_timeout (5 min by default), so firing
alerts are re-sent periodically, as Prometheus does.
"""

from __future__ import annotations

import logging

from gradwatch.aggregator.alerts.push import JsonPusher, dumps
from gradwatch.aggregator.alerts.record import FIRING, Alert
from gradwatch.aggregator.counters import Counters

log = logging.getLogger("gradwatch.aggregator.alerts.alertmanager")
MAX_BATCH = 64


def _num(x: float) -> str:
    return f"{x:.6g}"


def payload(alert: Alert, generator_url: str) -> dict:
    """One postableAlert of the v2 API. Labels identify the alert: the resolve carries the same set."""
    annotations = {"summary": alert.summary, "value": _num(alert.value), "threshold": _num(alert.threshold),
                   "step": str(alert.step)}
    if alert.tensor:
        annotations["tensor"] = alert.tensor
    body = {
        "labels": {"alertname": alert.rule, "run": alert.run, "severity": alert.severity, "layer": alert.layer,
                   "rank": str(alert.rank)},
        "annotations": annotations,
        "startsAt": alert.starts_at,
        "generatorURL": generator_url,
    }
    if alert.ends_at:
        body["endsAt"] = alert.ends_at
    return body


class AlertmanagerPusher(JsonPusher):
    max_batch = MAX_BATCH

    def __init__(self, url: str, counters: Counters, *, generator_url: str = "", timeout_s: float = 5.0,
                 retries: int = 3, queue_size: int = 1_000, resend_s: float = 60.0):
        self.generator_url = generator_url
        self.resend_s = resend_s
        self._firing: dict[tuple, tuple[str, dict]] = {}  # labels -> (run, payload), for re-sending
        super().__init__(url.rstrip("/") + "/api/v2/alerts", counters, "alertmanager", log,
                         thread_name="gradwatch-alertmanager", timeout_s=timeout_s, retries=retries,
                         queue_size=queue_size, tick_s=resend_s)

    def encode(self, batch: list[dict]) -> bytes:
        return dumps(batch)

    def enqueue(self, alert: Alert) -> None:
        body = payload(alert, self.generator_url)
        key = tuple(sorted(body["labels"].items()))
        with self._lock:
            if alert.status == FIRING:
                self._firing[key] = (alert.run, body)
            else:
                self._firing.pop(key, None)
            self.put(body)
        self._wake.set()

    def forget(self, run: str) -> None:
        """Stops re-sending the firing alerts of an expired run: Alertmanager then ends them itself."""
        with self._lock:
            for key in [k for k, (r, _) in self._firing.items() if r == run]:
                del self._firing[key]

    def tick(self) -> None:
        with self._lock:
            firing = [body for _, body in self._firing.values()]
        for i in range(0, len(firing), MAX_BATCH):
            self.post(firing[i:i + MAX_BATCH], retry=True)
