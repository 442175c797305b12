"""De-duplicated logging of repeated errors, for every component: count always, log rarely.

A dead collector fails every export of a training job, a Redis outage every request of the collector and
every loop of the aggregator; each such error is counted in a metric where it happens, and `DedupLog`
decides which occurrences also reach the log:

  - the first occurrence of each key is logged;
  - a repeat within `interval_s` of the key's last logged line is only counted, and the next line logged
    for the key says how many were left out (`suffix`, where given); `interval_s=math.inf`: logged once;
  - at most `max_keys` keys are remembered: a new key beyond them forgets the others, so memory stays
    bounded whatever keys errors make. `max_keys=1` logs an error whenever it differs from the previous one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

SUPPRESSED = " (%d similar messages suppressed)"


class DedupLog:
    """Logs the first occurrence of each kind of error (its key), then at most once per `interval_s`,
    with the number of repeats in between. Thread-safe."""

    MAX_KEYS = 1_000

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, *, suffix: str | None = SUPPRESSED,
                 max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._interval_s = interval_s
        self._suffix = suffix  # formats the repeats left out since the key's last line; None: not said
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last logged, repeats since)

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log `msg % args` unless `key` was logged within the interval (then count it); True when logged."""
        now = self._clock()
        with self._lock:
            last, repeats = self._last.get(key, (None, 0))
            if last is not None and now - last < self._interval_s:
                self._last[key] = (last, repeats + 1)
                return False
            if len(self._last) >= self._max_keys and key not in self._last:
                self._last.clear()  # bounded: forgetting only means one more log line per key
            self._last[key] = (now, 0)
        if repeats and self._suffix is not None:
            msg += self._suffix
            args = (*args, repeats)
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True
