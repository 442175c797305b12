"""Aggregator settings: named defaults, environment overrides in one place, validation at start-up."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from gradwatch.settings import ConfigError, env

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_METRICS_LISTEN = "127.0.0.1:4772"
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
# Reports per run kept for step-range queries (/api/v1/runs/{run}/steps): per-layer gradient norms.
DEFAULT_HISTORY_REPORTS = 2_000
DEFAULT_RUN_EXPIRY_S = 3600.0
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
class AggregatorConfig:
    redis_url: str = DEFAULT_REDIS_URL
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    alertmanager_url: str | None = DEFAULT_ALERTMANAGER_URL
    consumer: str = field(default_factory=default_consumer)
    block_ms: int = DEFAULT_BLOCK_MS
    read_count: int = DEFAULT_READ_COUNT
    claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS
    claim_interval_s: float = DEFAULT_CLAIM_INTERVAL_S
    discover_interval_s: float = DEFAULT_DISCOVER_INTERVAL_S
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S
    alert_stream_maxlen: int = DEFAULT_ALERT_STREAM_MAXLEN
    dead_letter_maxlen: int = DEFAULT_DEAD_LETTER_MAXLEN
    max_layer_series: int = DEFAULT_MAX_LAYER_SERIES
    max_histogram_layers: int = DEFAULT_MAX_HISTOGRAM_LAYERS
    history_reports: int = DEFAULT_HISTORY_REPORTS
    run_expiry_s: float = DEFAULT_RUN_EXPIRY_S
    exploding_abs_limit: float = DEFAULT_EXPLODING_ABS_LIMIT
    exploding_ratio: float = DEFAULT_EXPLODING_RATIO
    exploding_window: int = DEFAULT_EXPLODING_WINDOW
    exploding_min_history: int = DEFAULT_EXPLODING_MIN_HISTORY
    cooldown_steps: int = DEFAULT_COOLDOWN_STEPS
    resolve_after_steps: int = DEFAULT_RESOLVE_AFTER_STEPS
    keep_firing_s: float = DEFAULT_KEEP_FIRING_S
    alertmanager_timeout_s: float = DEFAULT_ALERTMANAGER_TIMEOUT_S
    alertmanager_retries: int = DEFAULT_ALERTMANAGER_RETRIES
    alertmanager_queue_size: int = DEFAULT_ALERTMANAGER_QUEUE_SIZE
    alertmanager_resend_s: float = DEFAULT_ALERTMANAGER_RESEND_S
    # Generic webhook: every alert transition is POSTed as the JSON of the alert stream.
    webhook_url: str | None = DEFAULT_WEBHOOK_URL
    webhook_token: str | None = field(default=None, repr=False)  # sent as "Authorization: Bearer ..."
    webhook_timeout_s: float = DEFAULT_WEBHOOK_TIMEOUT_S
    webhook_retries: int = DEFAULT_WEBHOOK_RETRIES
    webhook_queue_size: int = DEFAULT_WEBHOOK_QUEUE_SIZE
    # Bearer token the API's one write (POST .../snapshots) requires; None: no token (bind to localhost).
    api_token: str | None = field(default=None, repr=False)
    # Link Alertmanager shows next to an alert; None: this aggregator's /metrics page.
    generator_url: str | None = None
    # TOML file of rule settings (aggregator/rules/example.toml); None: the catalogue's defaults.
    rules: str | None = None

    @classmethod
    def from_env(cls) -> AggregatorConfig:
        """Defaults overridden by GRADWATCH_* variables: the shared URLs keep their short names
        (GRADWATCH_REDIS_URL, GRADWATCH_ALERTMANAGER_URL), every other field is
        GRADWATCH_AGGREGATOR_<FIELD>, e.g. GRADWATCH_AGGREGATOR_METRICS_LISTEN."""
        cfg = cls()
        for f in fields(cls):
            default = getattr(cfg, f.name)
            parse = str if default is None else None
            setattr(cfg, f.name, env(env_name(f.name), default, parse))
        return cfg

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
        if not self.consumer or any(c.isspace() for c in self.consumer):
            raise _bad("consumer", self.consumer, "a non-empty name without spaces")
        for name in ("read_count", "max_layer_series", "alert_stream_maxlen", "dead_letter_maxlen",
                     "exploding_window", "exploding_min_history", "resolve_after_steps", "alertmanager_queue_size",
                     "webhook_queue_size"):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "an integer >= 1")
        for name in ("block_ms", "claim_idle_ms", "cooldown_steps", "max_histogram_layers", "history_reports",
                     "alertmanager_retries",
                     "webhook_retries"):
            if getattr(self, name) < 0:
                raise _bad(name, getattr(self, name), "an integer >= 0")
        for name in ("claim_interval_s", "discover_interval_s", "run_expiry_s", "alertmanager_resend_s",
                     "keep_firing_s", "join_timeout_s"):
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
        if self.exploding_min_history > self.exploding_window:
            raise _bad("exploding_min_history", self.exploding_min_history,
                       f"at most exploding_window ({self.exploding_window})")
        from gradwatch.aggregator.rules.catalogue import load_rules  # the rules import this module

        load_rules(self)
        return self


def env_name(field_name: str) -> str:
    if field_name in ("redis_url", "alertmanager_url"):
        return f"GRADWATCH_{field_name.upper()}"
    return f"GRADWATCH_AGGREGATOR_{field_name.upper()}"


def _bad(name: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"invalid aggregator setting {name} ({env_name(name)}) = {value!r}: expected {expected}")
