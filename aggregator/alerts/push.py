"""The machinery shared by the Alertmanager and webhook pushers: a named daemon thread that POSTs JSON
from a bounded queue (drop oldest, counted), one timeout per POST, a few jittered retries of listed
codes that honour Retry-After and that shutdown interrupts, and errors counted and logged de-duplicated.

Counters are `<prefix>_sent`, `<prefix>_errors` and `<prefix>_dropped` (see counters.Counters).
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

from gradwatch.aggregator.counters import Counters
from gradwatch.logs import DedupLog

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 5.0
USER_AGENT = "gradwatch-aggregator"


class JsonPusher:
    """Subclasses set `max_batch`, implement `encode(batch)` and may override `tick()`, which the
    thread calls every `tick_s` seconds (None: never)."""

    max_batch = 64

    def __init__(self, endpoint: str, counters: Counters, prefix: str, logger: logging.Logger, *,
                 thread_name: str, timeout_s: float = 5.0, retries: int = 3, queue_size: int = 1_000,
                 headers: dict[str, str] | None = None, shown_as: str | None = None,
                 tick_s: float | None = None):
        self.endpoint = endpoint
        self.counters = counters
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retries = retries
        self.queue_size = queue_size
        self.headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
        self.shown_as = shown_as or endpoint  # for log lines: a webhook's path may hold a secret
        self.tick_s = tick_s
        self._errors = DedupLog(logger)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: deque[dict] = deque()
        self._inflight = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def encode(self, batch: list[dict]) -> bytes:
        raise NotImplementedError

    def tick(self) -> None:
        """Periodic work on the pusher's thread (Alertmanager re-sends its firing alerts)."""

    def put(self, body: dict) -> None:
        """Queues one body; never blocks. Call with self._lock held."""
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self.counters.add(f"{self.prefix}_dropped")
        self._queue.append(body)

    def force_flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued body was posted (or given up); False on timeout."""
        self._wake.set()
        with self._idle:
            return self._idle.wait_for(lambda: not self._queue and not self._inflight, timeout)

    def begin_shutdown(self) -> None:
        """Ends retries and backoffs now; the thread posts what is queued once more, then exits."""
        self._stop.set()
        self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Posts what is queued (no retries), then stops the thread. Idempotent."""
        self.begin_shutdown()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s if self.tick_s is not None else None
        while True:
            self._wake.wait(None if next_tick is None else max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            stopping = self._stop.is_set()
            self._drain(retry=not stopping)
            if stopping:
                return
            if next_tick is not None and time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + self.tick_s

    def _drain(self, retry: bool) -> None:
        while True:
            with self._lock:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
                self._inflight = len(batch)
            if batch:
                self.post(batch, retry)
            with self._idle:
                self._inflight = 0
                self._idle.notify_all()
            if not batch:
                return

    def post(self, batch: list[dict], retry: bool) -> bool:
        data = self.encode(batch)
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            retry_after = 0.0
            try:
                request = urllib.request.Request(self.endpoint, data=data, method="POST", headers=self.headers)
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                self.counters.add(f"{self.prefix}_sent", len(batch))
                return True
            except urllib.error.HTTPError as e:
                retryable = e.code in (408, 429) or e.code >= 500
                reason = f"HTTP {e.code} {e.reason}"
                retry_after = _retry_after(e)
            except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
                retryable = True
                reason = str(getattr(e, "reason", e))
            self.counters.add(f"{self.prefix}_errors")
            self._errors.log(logging.WARNING, reason, "cannot push alerts to %s: %s", self.shown_as, reason)
            if not retryable or attempt + 1 >= attempts:
                break
            delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt) * random.uniform(0.5, 1.5)
            if self._stop.wait(min(max(delay, retry_after), BACKOFF_CAP_S * 2)):
                break  # shutting down: give this batch up (counted) rather than delay the exit
        self.counters.add(f"{self.prefix}_dropped", len(batch))
        return False


def _retry_after(e: urllib.error.HTTPError) -> float:
    """Honour the server's push-back (Retry-After in seconds), within our own cap."""
    try:
        return max(0.0, float(e.headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


def dumps(value: object) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
