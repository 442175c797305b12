"""Pushes alert transitions to Alertmanager's v2 API (POST /api/v2/alerts) from a background thread.

The consumer never waits on Alertmanager: a bounded queue (drop oldest, counted) sits between them.
Each POST has a timeout and a few jittered retries that shutdown interrupts. Alertmanager ends an
alert without endsAt after its resolve_timeout (5 min by default), so firing alerts are re-sent
periodically, as Prometheus does.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections import deque

from gradwatch.aggregator.alert import FIRING, Alert
from gradwatch.aggregator.counters import Counters, DedupLog

log = logging.getLogger("gradwatch.aggregator.alertmanager")
MAX_BATCH = 64
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 5.0


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


class AlertmanagerPusher:
    def __init__(self, url: str, counters: Counters, *, generator_url: str = "", timeout_s: float = 5.0,
                 retries: int = 3, queue_size: int = 1_000, resend_s: float = 60.0):
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.counters = counters
        self.generator_url = generator_url
        self.timeout_s = timeout_s
        self.retries = retries
        self.queue_size = queue_size
        self.resend_s = resend_s
        self._errors = DedupLog(log)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: deque[dict] = deque()
        self._inflight = 0
        self._firing: dict[tuple, tuple[str, dict]] = {}  # labels -> (run, payload), for re-sending
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-alertmanager", daemon=True)
        self._thread.start()

    def enqueue(self, alert: Alert) -> None:
        body = payload(alert, self.generator_url)
        key = tuple(sorted(body["labels"].items()))
        with self._lock:
            if alert.status == FIRING:
                self._firing[key] = (alert.run, body)
            else:
                self._firing.pop(key, None)
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.counters.add("alertmanager_dropped")
            self._queue.append(body)
        self._wake.set()

    def forget(self, run: str) -> None:
        """Stops re-sending the firing alerts of an expired run: Alertmanager then ends them itself."""
        with self._lock:
            for key in [k for k, (r, _) in self._firing.items() if r == run]:
                del self._firing[key]

    def force_flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued alert was posted (or given up); False on timeout."""
        self._wake.set()
        with self._idle:
            return self._idle.wait_for(lambda: not self._queue and not self._inflight, timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Posts what is queued (no retries), then stops the thread. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        next_resend = time.monotonic() + self.resend_s
        while True:
            self._wake.wait(max(0.0, next_resend - time.monotonic()))
            self._wake.clear()
            stopping = self._stop.is_set()
            self._drain(retry=not stopping)
            if stopping:
                return
            if time.monotonic() >= next_resend:
                with self._lock:
                    firing = [body for _, body in self._firing.values()]
                for i in range(0, len(firing), MAX_BATCH):
                    self._post(firing[i:i + MAX_BATCH], retry=True)
                next_resend = time.monotonic() + self.resend_s

    def _drain(self, retry: bool) -> None:
        while True:
            with self._lock:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
                self._inflight = len(batch)
            if batch:
                self._post(batch, retry)
            with self._idle:
                self._inflight = 0
                self._idle.notify_all()
            if not batch:
                return

    def _post(self, batch: list[dict], retry: bool) -> bool:
        data = json.dumps(batch).encode()
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            retry_after = 0.0
            try:
                request = urllib.request.Request(self.endpoint, data=data, method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                self.counters.add("alertmanager_sent", len(batch))
                return True
            except urllib.error.HTTPError as e:
                retryable = e.code == 429 or e.code >= 500
                reason = f"HTTP {e.code} {e.reason}"
                retry_after = _retry_after(e)
            except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
                retryable = True
                reason = str(getattr(e, "reason", e))
            self.counters.add("alertmanager_errors")
            self._errors.log(logging.WARNING, reason, "cannot push alerts to %s: %s", self.endpoint, reason)
            if not retryable or attempt + 1 >= attempts:
                break
            delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt) * random.uniform(0.5, 1.5)
            if self._stop.wait(min(max(delay, retry_after), BACKOFF_CAP_S * 2)):
                break  # shutting down: give this batch up (counted) rather than delay the exit
        self.counters.add("alertmanager_dropped", len(batch))
        return False


def _retry_after(e: urllib.error.HTTPError) -> float:
    """Honour the server's push-back (Retry-After in seconds), within our own cap."""
    try:
        return max(0.0, float(e.headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0
