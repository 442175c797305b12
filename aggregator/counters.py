"""The aggregator's self-metric counters: their names with their help texts (exported by
aggregator/http/metrics.py as gradwatch_aggregator_<name>_total), and the thread-safe counts; the HTTP port's
refusals by reason (gradwatch_aggregator_http_refused_total{reason}, counted by aggregator/http/access.py)."""

from __future__ import annotations

import threading
from collections import Counter

# name -> help text on /metrics. The one list: Counters counts exactly these, but for histograms_dropped and
# layers_unexported, which /metrics' series budget counts at scrape time (aggregator/http/budget.py) and adds.
COUNTERS = {
    "reports": "Step reports applied.",
    "registrations": "Run registrations applied.",
    "duplicates": "Redelivered step reports skipped (same run, rank and sequence number).",
    "decode_errors": "Stream entries that could not be decoded or processed, moved to the run's dead-letter stream.",
    "unregistered_reports": "Step reports applied without a tensor dictionary (tensors named tensor_<id>).",
    "series_dropped": "Layer updates without a series because max_layer_series was reached.",
    "histograms_dropped": "(layer, kind) magnitude histograms left off /metrics for want of a max_histogram_layers "
                          "slot (live runs are served first, finished runs evicted first); each run counts the most "
                          "it went without at one scrape.",
    "layers_unexported": "Layers (or layer groups) of a run without per-layer series on /metrics beyond "
                         "metrics_top_layers; each run counts the most it had left out at one scrape.",
    "claimed": "Entries taken over from idle consumers with XAUTOCLAIM.",
    "lease_lost": "Commits refused because another replica had taken the run's lease (its entries go to that one).",
    "agent_lost": "Step reports agents lost before delivery (queue full, collector unreachable, host slots busy), as "
                  "their next delivered reports said; the AgentDataLost alert names the run and rank.",
    "stream_lost": "Report-stream entries that left the stream before any replica applied them (the collector's hard "
                   "cap trimmed them unread); the StreamDataLost alert names the run.",
    "steps_joined": "Steps of multi-rank runs closed by the cross-rank join.",
    "steps_incomplete": "Joined steps closed without every rank: passed by the watermark, timed out or overflowed.",
    "late_reports": "Reports for a step the cross-rank join had already closed (applied, not joined).",
    "redis_errors": "Failed Redis commands.",
    "redis_rollbacks": "Commits that found Redis without earlier commits this replica saw succeed (restarted from an "
                       "older file, a failover): the run was followed again from what Redis kept.",
    "alerts_suppressed": "Recurrences of a condition inside the cooldown of its previous alert.",
    "alertmanager_sent": "Alerts Alertmanager accepted.",
    "alertmanager_errors": "Failed POSTs to Alertmanager.",
    "alertmanager_dropped": "Alerts never delivered to Alertmanager: queue full or retries exhausted.",
    "webhook_sent": "Alert transitions the webhook accepted.",
    "webhook_errors": "Failed POSTs to the webhook.",
    "webhook_dropped": "Alert transitions never delivered to the webhook: queue full or retries exhausted.",
    "runs_expired": "Runs forgotten after run_expiry_s without a report.",
}


class Counters:
    """Monotonic counters shared by the consumer and the Alertmanager and webhook threads.

    Plain integer adds under one lock: a scrape must never see a torn read, and the hot path adds
    at most a few values per report, so contention is negligible.
    """

    NAMES = tuple(COUNTERS)

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


# reason -> what it counts: every request the HTTP port turned away for want of a token (docs/security.md).
HTTP_REFUSALS = {
    "unauthenticated": "no bearer token, or a wrong one (401)",
    "read_only": "the read token on a snapshot request, which needs the API token (403)",
    "writes_disabled": "a snapshot request to a port reachable beyond loopback with no API token configured (403)",
}


class Tally:
    """Thread-safe counts of a fixed set of label values, each present (at 0) from the start."""

    def __init__(self, labels: tuple[str, ...]):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(labels, 0)

    def add(self, label: str, n: int = 1) -> None:
        with self._lock:
            self._values[label] += n

    def read(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
