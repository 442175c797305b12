"""The aggregator's self-metric counters and its de-duplicated error log: count always, log rarely."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter


class Counters:
    """Monotonic counters shared by the consumer and the Alertmanager and webhook threads.

    Plain integer adds under one lock: a scrape must never see a torn read, and the hot path adds
    at most a few values per report, so contention is negligible.
    """

    NAMES = (
        "reports",               # step reports applied to the state
        "registrations",         # registrations applied
        "duplicates",            # redelivered reports skipped (same run, rank, sequence)
        "decode_errors",         # entries that could not be decoded or processed: dead-lettered
        "unregistered_reports",  # reports processed without a tensor dictionary
        "series_dropped",        # layer updates refused because max_layer_series was reached
        "claimed",               # entries taken over from idle consumers with XAUTOCLAIM
        "lease_lost",            # commits refused because another replica took the run's lease
        "steps_joined",          # steps of multi-rank runs closed by the cross-rank join
        "steps_incomplete",      # ... closed without every rank (watermark, timeout or overflow)
        "late_reports",          # reports for a step the join had already closed
        "redis_errors",
        "alerts_suppressed",     # recurrences inside the cooldown of the previous alert
        "alertmanager_sent",     # alerts Alertmanager accepted
        "alertmanager_errors",   # failed POST attempts
        "alertmanager_dropped",  # alerts dropped: queue full or retries exhausted
        "webhook_sent",          # alert transitions the webhook accepted (2xx)
        "webhook_errors",        # failed POST attempts
        "webhook_dropped",       # transitions dropped: queue full or retries exhausted
        "runs_expired",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)
        self._alerts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def add_alert(self, rule: str) -> None:
        with self._lock:
            self._alerts[rule] += 1

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def read(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self._values), dict(self._alerts)


class DedupLog:
    """Logs the first occurrence of each kind of error, then at most once per `interval_s`, with the
    number of repeats in between: a Redis outage must not flood the log at the loop's rate."""

    MAX_KEYS = 1_000

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0):
        self._logger = logger
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            last, repeats = self._last.get(key, (None, 0))
            if last is not None and now - last < self._interval_s:
                self._last[key] = (last, repeats + 1)
                return
            if len(self._last) >= self.MAX_KEYS and key not in self._last:
                self._last.clear()  # bounded: forgetting only means one more log line per key
            self._last[key] = (now, 0)
        if repeats:
            msg += " (%d similar messages suppressed)"
            args = (*args, repeats)
        self._logger.log(level, msg, *args, exc_info=exc_info)
