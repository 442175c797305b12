"""Aggregator settings: named defaults, environment overrides in one place, validation at start-up."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

from gradwatch import endpoints
from gradwatch.settings import FILE, ConfigError, Settings, env_var, host_port, integer, number, setting, url
from gradwatch.streams import cluster_url_problem

DEFAULT_REDIS_URL = endpoints.REDIS_URL
# Off: redis_url names one Redis. On: it names any node of a Redis Cluster, and the client follows the slots
# (the collector's setting of the same name and variable, GRADWATCH_REDIS_CLUSTER: both sides set it alike).
DEFAULT_REDIS_CLUSTER = False
DEFAULT_METRICS_LISTEN = endpoints.AGGREGATOR
DEFAULT_ALERTMANAGER_URL: str | None = None
# XREADGROUP blocks this long when idle: short enough that stop() and new runs are noticed quickly.
DEFAULT_BLOCK_MS = 200
DEFAULT_READ_COUNT = 500
# Longer than the slowest batch, so a live consumer's pending entries are never stolen.
DEFAULT_CLAIM_IDLE_MS = 30_000
DEFAULT_CLAIM_INTERVAL_S = 5.0
DEFAULT_DISCOVER_INTERVAL_S = 1.0
# A run's lease outlives a few discovery intervals (each renews it); after it expires another replica
# takes the run over, so this bounds how long a dead replica's runs go unwatched.
DEFAULT_LEASE_TTL_MS = 10_000
# A step of a multi-rank run waits this long for its missing ranks before it closes without them.
DEFAULT_JOIN_TIMEOUT_S = 30.0
DEFAULT_ALERT_STREAM_MAXLEN = 10_000
DEFAULT_DEAD_LETTER_MAXLEN = 10_000
DEFAULT_MAX_LAYER_SERIES = 5_000
# (layer, kind) log2-magnitude histograms on /metrics, all runs together: 16 bucket series each.
DEFAULT_MAX_HISTOGRAM_LAYERS = 64
# Layers per run with per-layer series on /metrics (NaN/Inf first, then the largest gradient norms): a model up to
# this size shows every layer; a 2,000-layer one stays within the series budget of docs/architecture.md#series-budget.
DEFAULT_METRICS_TOP_LAYERS = 256
# 0: one series per layer. N > 0: layers fold into the first N components of their module path.
DEFAULT_METRICS_LAYER_GROUP_DEPTH = 0
# Reports per run kept for step-range queries (/api/v1/runs/{run}/steps): per-layer gradient norms.
DEFAULT_HISTORY_REPORTS = 2_000
# Layer-steps of history in memory over all the runs a replica holds (a step of an L-layer run is L; ~120 B each,
# docs/sizing.md#memory-bounds): ~960 MB. Two 2,000-layer runs keep their 2,000 steps (the live view's curves and
# heatmap read that many: from memory they load in ~0.4 s, from Redis in over 1 s); 64 runs of 150 layers keep 833
# each, the rest read from Redis. 0: no budget, history_reports steps per run however many runs.
DEFAULT_HISTORY_MEMORY_CELLS = 8_000_000
DEFAULT_HISTORY_FULL_STEPS = 10_000  # every step of the latest ones kept; older ones fold into tiers
DEFAULT_HISTORY_ALERT_WINDOW = 100  # steps either side of an alert kept whole
# The garbage collector walks the whole state once per this interval (aggregator/gcpolicy.py); in between, a full
# collection walks only what became long-lived since the last one. Each whole walk is one pause (~0.5 s for a
# 2,000-layer, 64-rank run) and frees the few garbage cycles that died frozen (uvicorn's closed connections).
DEFAULT_GC_FULL_SCAN_S = 3600.0
DEFAULT_RUN_EXPIRY_S = 3600.0
# A run's keys expire this long after its last report (aggregator/lifecycle.py). 90 days: a quarter's runs stay
# comparable (a sweep, its follow-ups, a paper's ablations), while Redis, which holds everything in memory, stops
# growing with every run ever made (a 100-layer run of 30,000 steps holds about 43 MB of history). 0: forever.
DEFAULT_HISTORY_RETENTION_S = 90 * 24 * 3600.0
DEFAULT_EXPLODING_ABS_LIMIT = 1e4
DEFAULT_EXPLODING_RATIO = 10.0
DEFAULT_EXPLODING_WINDOW = 50
DEFAULT_EXPLODING_MIN_HISTORY = 10
DEFAULT_COOLDOWN_STEPS = 50
DEFAULT_RESOLVE_AFTER_STEPS = 5
# A firing alert stays firing at least this long (report time), like Prometheus' keep_firing_for:
# Alertmanager never notifies an alert that resolved before its group_wait (30 s) or, in an existing
# group, its group_interval (5 min), and a blow-up on a fast loop can be over in a second.
DEFAULT_KEEP_FIRING_S = 300.0
DEFAULT_ALERTMANAGER_TIMEOUT_S = 5.0
DEFAULT_ALERTMANAGER_RETRIES = 3
DEFAULT_ALERTMANAGER_QUEUE_SIZE = 1_000
# Alertmanager resolves an alert without endsAt after its resolve_timeout (5 min by default):
# firing alerts are re-sent well within it, as Prometheus does every minute.
DEFAULT_ALERTMANAGER_RESEND_S = 60.0
DEFAULT_WEBHOOK_URL: str | None = None
DEFAULT_WEBHOOK_TIMEOUT_S = 5.0
DEFAULT_WEBHOOK_RETRIES = 3
DEFAULT_WEBHOOK_QUEUE_SIZE = 1_000


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class AggregatorConfig(Settings):
    """Everything the aggregator process needs; `from_env()` applies the GRADWATCH_AGGREGATOR_* variables."""

    COMPONENT: ClassVar[str] = "aggregator"

    redis_url: str = setting(DEFAULT_REDIS_URL, "Redis the report streams are read from", flag="--redis-url",
                             form=url("redis", "rediss", "unix", example=DEFAULT_REDIS_URL))
    redis_cluster: bool = setting(DEFAULT_REDIS_CLUSTER, "the Redis URL names any node of a Redis Cluster",
                                  flag="--redis-cluster")
    metrics_listen: str = setting(DEFAULT_METRICS_LISTEN, "/metrics, the query API and the live view",
                                  flag="--metrics-listen", form=host_port(DEFAULT_METRICS_LISTEN))
    alertmanager_url: str | None = setting(DEFAULT_ALERTMANAGER_URL, "Alertmanager alerts are pushed to",
                                           flag="--alertmanager-url",
                                           form=url("http", "https", example="http://127.0.0.1:9093"),
                                           shown="none: alerts go to Redis and /metrics only")
    consumer: str = setting(doc="consumer name in the Redis group", default_factory=default_consumer,
                            flag="--consumer", shown="`HOSTNAME-PID`")
    block_ms: int = setting(DEFAULT_BLOCK_MS, "how long a read waits when idle", form=integer(ge=0))
    read_count: int = setting(DEFAULT_READ_COUNT, "stream entries read per batch, shared out among the held "
                                 "runs' streams", form=integer(ge=1))
    claim_idle_ms: int = setting(DEFAULT_CLAIM_IDLE_MS, "pending entries idle this long are taken over from a dead "
                                 "consumer", form=integer(ge=0))
    claim_interval_s: float = setting(DEFAULT_CLAIM_INTERVAL_S, "how often pending entries are looked at",
                                      form=number(ge=0))
    discover_interval_s: float = setting(DEFAULT_DISCOVER_INTERVAL_S, "how often new runs are looked for (each "
                                         "look renews the run leases)", form=number(ge=0))
    lease_ttl_ms: int = setting(DEFAULT_LEASE_TTL_MS, "run lease TTL: the takeover delay after a replica dies "
                                "(at least two discovery intervals)", form=integer(ge=0))
    join_timeout_s: float = setting(DEFAULT_JOIN_TIMEOUT_S, "how long a step waits for its missing ranks",
                                    form=number(ge=0))
    alert_stream_maxlen: int = setting(DEFAULT_ALERT_STREAM_MAXLEN, "entries kept in the alert stream",
                                       form=integer(ge=1))
    dead_letter_maxlen: int = setting(DEFAULT_DEAD_LETTER_MAXLEN, "entries kept in the dead-letter stream",
                                      form=integer(ge=1))
    max_layer_series: int = setting(DEFAULT_MAX_LAYER_SERIES, "per-layer series on /metrics, all runs together",
                                    form=integer(ge=1))
    max_histogram_layers: int = setting(DEFAULT_MAX_HISTOGRAM_LAYERS, "magnitude histograms on /metrics ((layer, "
                                        "kind) pairs, all runs together; live runs first, finished runs evicted "
                                        "first)", form=integer(ge=0))
    metrics_top_layers: int = setting(DEFAULT_METRICS_TOP_LAYERS, "layers (or groups) per run with per-layer series "
                                      "on /metrics: NaN/Inf first, then those a firing alert names, then the largest "
                                      "gradient norms (0: all)", form=integer(ge=0))
    metrics_layer_group_depth: int = setting(DEFAULT_METRICS_LAYER_GROUP_DEPTH, "per-layer series on /metrics for "
                                             "groups of layers, by the first N components of the module path "
                                             "(`model.layers.3` for N=3; norms: root of summed squares, NaN/Inf "
                                             "kept); 0: every layer its own", form=integer(ge=0))
    history_reports: int = setting(DEFAULT_HISTORY_REPORTS, "latest steps per run kept in memory for `/steps`, "
                                   "curves and the heatmap; every step is also in Redis (aggregator/history.py), "
                                   "read for older ones",
                                   form=integer(ge=0))
    history_memory_cells: int = setting(DEFAULT_HISTORY_MEMORY_CELLS, "layer-steps of history kept in memory over "
                                        "all runs together (an L-layer run's step counts L): each run keeps "
                                        "min(history_reports, max(100, this / runs / its layers)) steps in memory, "
                                        "older ones are read from Redis (0: no budget)", form=integer(ge=0))
    history_full_steps: int = setting(DEFAULT_HISTORY_FULL_STEPS, "latest steps per run kept in Redis at full "
                                      "resolution; older training steps fold into 10- and 100-step buckets",
                                      form=integer(ge=1))
    history_alert_window: int = setting(DEFAULT_HISTORY_ALERT_WINDOW, "steps either side of an alert's step kept "
                                        "at full resolution in the history", form=integer(ge=0))
    gc_full_scan_s: float = setting(DEFAULT_GC_FULL_SCAN_S, "how often the garbage collector walks the whole state "
                                    "(one pause, ~0.5 s at 2,000 layers x 64 ranks); in between, each full "
                                    "collection walks only what became long-lived since the last one; 0: "
                                    "CPython's default, every full collection walks everything", form=number(ge=0))
    run_expiry_s: float = setting(DEFAULT_RUN_EXPIRY_S, "runs are forgotten after no report for this long",
                                  form=number(ge=0))
    history_retention_s: float = setting(DEFAULT_HISTORY_RETENTION_S, "a run's keys in Redis (history, stream, "
                                         "registrations) are deleted this long after its last report, and it "
                                         "leaves the run index; 0 keeps them forever (at least twice "
                                         "`run_expiry_s` otherwise)", form=number(ge=0),
                                         shown="7776000 s (90 days)")
    exploding_abs_limit: float = setting(DEFAULT_EXPLODING_ABS_LIMIT, "ExplodingGradient: absolute gradient-norm "
                                         "limit (inf: off)", form=number(gt=0, inf=True))
    exploding_ratio: float = setting(DEFAULT_EXPLODING_RATIO, "ExplodingGradient: ratio to the rolling median",
                                     form=number(gt=1))
    exploding_window: int = setting(DEFAULT_EXPLODING_WINDOW, "ExplodingGradient: norms in the rolling median",
                                    form=integer(ge=1))
    exploding_min_history: int = setting(DEFAULT_EXPLODING_MIN_HISTORY, "ExplodingGradient: norms known before the "
                                         "ratio applies (<= `exploding_window`)", form=integer(ge=1))
    cooldown_steps: int = setting(DEFAULT_COOLDOWN_STEPS, "no new alert for the same key within this many steps",
                                  form=integer(ge=0))
    resolve_after_steps: int = setting(DEFAULT_RESOLVE_AFTER_STEPS, "clean reports before an alert resolves",
                                       form=integer(ge=1))
    keep_firing_s: float = setting(DEFAULT_KEEP_FIRING_S, "minimum firing time before an alert resolves",
                                   form=number(ge=0))
    alertmanager_timeout_s: float = setting(DEFAULT_ALERTMANAGER_TIMEOUT_S, "Alertmanager request timeout",
                                            form=number(gt=0))
    alertmanager_retries: int = setting(DEFAULT_ALERTMANAGER_RETRIES, "retries of a failed Alertmanager push",
                                        form=integer(ge=0))
    alertmanager_queue_size: int = setting(DEFAULT_ALERTMANAGER_QUEUE_SIZE, "alerts waiting to be pushed",
                                           form=integer(ge=1))
    alertmanager_resend_s: float = setting(DEFAULT_ALERTMANAGER_RESEND_S, "firing alerts are re-sent this often",
                                           form=number(ge=0))
    # Generic webhook: every alert transition is POSTed as the JSON of the alert stream.
    webhook_url: str | None = setting(DEFAULT_WEBHOOK_URL, "every alert transition is POSTed there as JSON",
                                      flag="--webhook-url",
                                      form=url("http", "https", example="https://hooks.example/gradwatch"))
    webhook_token: str | None = setting(None, "webhook bearer token (sent as `Authorization: Bearer ...`)",
                                        secret=True)
    webhook_timeout_s: float = setting(DEFAULT_WEBHOOK_TIMEOUT_S, "webhook request timeout", form=number(gt=0))
    webhook_retries: int = setting(DEFAULT_WEBHOOK_RETRIES, "retries of a failed webhook POST", form=integer(ge=0))
    webhook_queue_size: int = setting(DEFAULT_WEBHOOK_QUEUE_SIZE, "alert transitions waiting to be POSTed",
                                      form=integer(ge=1))
    api_token: str | None = setting(None, "bearer token the API's one write (`POST .../snapshots`) requires; "
                                    "it also reads", secret=True,
                                    shown="none: snapshot requests only on a loopback-only port")
    read_token: str | None = setting(None, "bearer token every read requires (query API, event stream, "
                                     "/metrics; not /healthz or the page's files); the API token reads too",
                                     secret=True, shown="none: reads are open (refused beyond loopback)")
    allow_unauthenticated: bool = setting(False, "listen beyond loopback without `read_token`, reads open to "
                                          "anyone who reaches the port, on purpose (snapshot requests still need "
                                          "`api_token`)")
    generator_url: str | None = setting(None, "link Alertmanager shows next to an alert",
                                        shown="this aggregator's /metrics page")
    rules: str | None = setting(None, "TOML file of rule settings (aggregator/rules/example.toml)", flag="--rules",
                                form=FILE, shown="none: built-in defaults")

    def metrics_address(self) -> tuple[str, int]:
        """(host, port) of metrics_listen; IPv6 hosts may be bracketed: [::1]:4772."""
        host, sep, port = self.metrics_listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise _bad("metrics_listen", self.metrics_listen, f"host:port, e.g. {DEFAULT_METRICS_LISTEN}")
        return host.strip("[]") or "0.0.0.0", int(port)

    def metrics_url(self) -> str:
        host, port = self.metrics_address()
        host = socket.gethostname() if host in ("0.0.0.0", "::") else host
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"

    def validate(self) -> AggregatorConfig:
        """Raises ConfigError naming the setting, its environment variable and what is expected."""
        scheme = urlsplit(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise _bad("redis_url", self.redis_url, "a redis://, rediss:// or unix:// URL")
        if self.redis_cluster and (problem := cluster_url_problem(self.redis_url)):
            raise ConfigError(f"invalid aggregator setting redis_url ({env_name('redis_url')}) with redis_cluster "
                              f"({env_name('redis_cluster')}) on: {problem}")
        self.metrics_address()
        if self.alertmanager_url is not None:
            am = urlsplit(self.alertmanager_url)
            if am.scheme not in ("http", "https") or not am.netloc:
                raise _bad("alertmanager_url", self.alertmanager_url, "an http(s):// URL such as http://127.0.0.1:9093")
        if self.webhook_url is not None:
            hook = urlsplit(self.webhook_url)
            if hook.scheme not in ("http", "https") or not hook.netloc:
                raise _bad("webhook_url", self.webhook_url, "an http(s):// URL such as https://hooks.example/gradwatch")
        if self.webhook_token is not None and (not self.webhook_token.isprintable() or " " in self.webhook_token):
            # The value stays out of the message: it is a secret.
            raise _bad("webhook_token", "<hidden>", "a token of printable characters without spaces")
        if self.api_token is not None and (not self.api_token.strip() or not self.api_token.isprintable()
                                           or " " in self.api_token):
            raise _bad("api_token", "<hidden>", "a token of printable characters without spaces")
        if self.read_token is not None and (not self.read_token.strip() or not self.read_token.isprintable()
                                            or " " in self.read_token):
            raise _bad("read_token", "<hidden>", "a token of printable characters without spaces")
        if self.read_token is not None and self.read_token == self.api_token:
            # The read token is the one handed to Prometheus and browsers: it must not also request snapshots.
            raise _bad("read_token", "<hidden>", f"a token other than api_token ({env_name('api_token')})")
        if not self.consumer or any(c.isspace() for c in self.consumer):
            raise _bad("consumer", self.consumer, "a non-empty name without spaces")
        for name in ("read_count", "max_layer_series", "alert_stream_maxlen", "dead_letter_maxlen",
                     "exploding_window", "exploding_min_history", "resolve_after_steps", "alertmanager_queue_size",
                     "webhook_queue_size", "history_full_steps"):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "an integer >= 1")
        for name in ("block_ms", "claim_idle_ms", "cooldown_steps", "max_histogram_layers", "history_reports",
                     "history_memory_cells",
                     "history_alert_window", "metrics_top_layers", "metrics_layer_group_depth",
                     "alertmanager_retries",
                     "webhook_retries"):
            if getattr(self, name) < 0:
                raise _bad(name, getattr(self, name), "an integer >= 0")
        for name in ("claim_interval_s", "discover_interval_s", "run_expiry_s", "alertmanager_resend_s",
                     "keep_firing_s", "join_timeout_s", "gc_full_scan_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise _bad(name, value, "a number of seconds >= 0")
        for name in ("alertmanager_timeout_s", "webhook_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise _bad(name, value, "a number of seconds > 0")
        if not (self.exploding_abs_limit > 0):
            raise _bad("exploding_abs_limit", self.exploding_abs_limit, "a norm > 0 (inf disables it)")
        if not (math.isfinite(self.exploding_ratio) and self.exploding_ratio > 1):
            raise _bad("exploding_ratio", self.exploding_ratio, "a factor > 1")
        if self.lease_ttl_ms < 2000 * self.discover_interval_s:
            raise _bad("lease_ttl_ms", self.lease_ttl_ms,
                       f"at least two discovery intervals ({2000 * self.discover_interval_s:.0f} ms), or leases "
                       f"would expire between renewals")
        if self.history_retention_s != 0 and not (math.isfinite(self.history_retention_s)
                                                  and self.history_retention_s >= 2 * self.run_expiry_s):
            # The aggregator follows a run for run_expiry_s after its last report: its keys must outlive that.
            raise _bad("history_retention_s", self.history_retention_s,
                       f"0 (keep forever) or a number of seconds at least twice run_expiry_s "
                       f"({2 * self.run_expiry_s:g}), or a run's keys would expire while it is still followed")
        if self.exploding_min_history > self.exploding_window:
            raise _bad("exploding_min_history", self.exploding_min_history,
                       f"at most exploding_window ({self.exploding_window})")
        from gradwatch.aggregator.rules.catalogue import load_rules  # the rules import this module

        load_rules(self)
        return self


def env_name(field_name: str) -> str:
    """The variable of an aggregator setting (core/settings.py's rule), for messages."""
    return env_var(AggregatorConfig.COMPONENT, field_name)


def _bad(name: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"invalid aggregator setting {name} ({env_name(name)}) = {value!r}: expected {expected}")
