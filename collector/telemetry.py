"""The collector's own Prometheus metrics, in a registry the caller owns (tests get a fresh one each)."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Fixed label values, created up front so every series exists (at 0) from the first scrape: a rate()
# over a series that appears only on the first failure misses that failure.
REFUSAL_REASONS = (
    "unauthenticated",     # missing or wrong bearer token
    "permission_denied",   # a valid token, but a run id outside its prefix (scoped tokens, collector/auth.py)
    "metrics_unauthenticated",  # a /metrics scrape without the read token
    "too_large",           # more items in one request than max_reports_per_request
    "over_limit",          # in-flight byte limit reached: retryable push-back
    "malformed",           # the ExportRequest framing is broken
    "invalid_report",      # one report refused (partial success)
    "invalid_registration",  # one registration refused (partial success)
    "invalid_snapshot",    # one snapshot refused (partial success)
    "redis_error",         # Redis did not accept the write: the agent retries
)
STATUS_CODES = tuple(code.name for code in (
    grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
))

# Export calls take from well under a millisecond (small batch) to tens of milliseconds (a 4 MiB batch).
_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CollectorMetrics:
    """Counters, gauge and histogram of one collector, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            "gradwatch_collector_requests_total", "Export calls answered, by gRPC status code.",
            ["code"], registry=registry)
        self.reports = Counter(
            "gradwatch_collector_reports_total", "Step reports written to Redis.", registry=registry)
        self.summaries = Counter(
            "gradwatch_collector_summaries_total", "Tensor summaries inside the step reports written to Redis.",
            registry=registry)
        self.registrations = Counter(
            "gradwatch_collector_registrations_total", "Run registrations written to Redis.", registry=registry)
        self.received_bytes = Counter(
            "gradwatch_collector_received_bytes_total", "Bytes of Export request bodies received.",
            registry=registry)
        self.refused = Counter(
            "gradwatch_collector_refused_total",
            "Requests or items refused, by reason (items for invalid_report/invalid_registration).",
            ["reason"], registry=registry)
        self.redis_errors = Counter(
            "gradwatch_collector_redis_errors_total", "Failed Redis writes (each answered UNAVAILABLE).",
            registry=registry)
        self.inflight_bytes = Gauge(
            "gradwatch_collector_inflight_bytes", "Bytes of Export requests being processed now.",
            registry=registry)
        self.request_duration = Histogram(
            "gradwatch_collector_request_duration_seconds", "Time to answer one Export call, Redis write included.",
            buckets=_DURATION_BUCKETS, registry=registry)
        for code in STATUS_CODES:
            self.requests.labels(code=code)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)

    def value(self, name: str, **labels: str) -> float:
        """Current value of one sample (for tests and diagnostics); 0.0 when absent."""
        result = self.registry.get_sample_value(name, labels or None)
        return 0.0 if result is None else result
