"""Collector configuration: defaults, environment overrides and start-up validation, in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from gradwatch import endpoints
from gradwatch.collector.auth import Tokens, bad_token
from gradwatch.limits import MAX_MESSAGE_BYTES, MAX_STRING_BYTES
from gradwatch.settings import (
    FILE,
    ConfigError,
    Settings,
    host_port,
    integer,
    loopback_only,
    number,
    setting,
    url,
)

DEFAULT_LISTEN = endpoints.COLLECTOR
DEFAULT_REDIS_URL = endpoints.REDIS_URL
# Hard cap on entries per run stream (XADD MAXLEN ~), a safety net: the aggregator trims what it applied,
# so a stream only grows this long while no aggregator reads the run (about 3 h of a run writing 100 reports/s).
# Entries it trims unread are counted and alerted (StreamDataLost; docs/architecture.md#stream-retention).
# Size Redis for it: entries x report size (about 50 bytes a tensor, 90 with histograms).
DEFAULT_STREAM_MAXLEN = 1_000_000
# ... and on its bytes, for big reports: 1,000,000 entries of a 300-tensor report (28 KB) would be 28 GB of one Redis
# shard. Each XADD's cap is min(stream_maxlen, stream_max_bytes / its entry's size). 4 GiB: 2.5 h of an 8-rank run at
# 2 steps/s of such reports, about a minute of a 1,024-rank one (docs/sizing.md).
DEFAULT_STREAM_MAX_BYTES = 4 << 30
# gRPC's own receive limit; bigger messages are refused with RESOURCE_EXHAUSTED before we see them.
DEFAULT_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES
# Per Export call, for reports and (separately) registrations: bounds the work one call can cause.
DEFAULT_MAX_REPORTS_PER_REQUEST = 10_000
DEFAULT_MAX_TENSORS_PER_REPORT = 100_000
# Names, module paths and label values end up in Redis, logs and dashboards: keep them bounded.
DEFAULT_MAX_STRING_BYTES = MAX_STRING_BYTES
# Request bytes being processed at once; above it the collector refuses with a retryable status
# (OTel memory_limiter) instead of growing until the OOM killer ends it.
DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
DEFAULT_TOKEN: str | None = None
DEFAULT_METRICS_LISTEN = endpoints.COLLECTOR_METRICS
DEFAULT_REDIS_TIMEOUT_S = 5.0
# Off: --redis-url names one Redis. On: it names any node of a Redis Cluster, and the client follows the slots.
DEFAULT_REDIS_CLUSTER = False
# Delay suggested to agents (google.rpc.RetryInfo, as OTLP) when refused over the in-flight limit.
DEFAULT_RETRY_AFTER_S = 1.0
# TLS is off unless a certificate and key are given; a client CA also turns on mTLS (client certificates required).
DEFAULT_TLS_CERT_FILE: str | None = None
DEFAULT_TLS_KEY_FILE: str | None = None
DEFAULT_TLS_CLIENT_CA_FILE: str | None = None
# Scoped agent tokens, one `<token> <run-id-prefix>` a line (collector/auth.py); none by default.
DEFAULT_TOKENS_FILE: str | None = None
# The collector's /metrics holds counters only (no run ids), but beyond loopback it needs a token like every port.
DEFAULT_READ_TOKEN: str | None = None
# Off: a listener beyond loopback without authentication refuses to start (docs/security.md). On: it serves
# anyone who reaches it, on purpose (a network that is itself the boundary).
DEFAULT_ALLOW_UNAUTHENTICATED = False

_PORT_RE = re.compile(r"^[0-9]{1,5}$")


@dataclass
class CollectorConfig(Settings):
    """Everything the collector process needs; `validate()` before use."""

    COMPONENT: ClassVar[str] = "collector"

    listen: str = setting(DEFAULT_LISTEN, "gRPC address agents export to", flag="--listen",
                          form=host_port(DEFAULT_LISTEN))
    redis_url: str = setting(DEFAULT_REDIS_URL, "Redis the streams are written to", flag="--redis-url",
                             form=url("redis", "rediss", "unix", example=DEFAULT_REDIS_URL))
    stream_maxlen: int = setting(DEFAULT_STREAM_MAXLEN, "hard cap on entries per run stream (`MAXLEN ~`), for an "
                                 "aggregator down for long: the aggregator trims what it applied; entries trimmed "
                                 "unread raise `StreamDataLost`", flag="--stream-maxlen", form=integer(gt=0),
                                 aliases=("GRADWATCH_STREAM_MAXLEN",))
    stream_max_bytes: int = setting(DEFAULT_STREAM_MAX_BYTES, "hard cap on the bytes of a run stream: each entry's "
                                    "`MAXLEN ~` is at most this over the entry's size (same safety net as "
                                    "stream_maxlen, for big reports)", form=integer(gt=0), shown="4 GiB")
    max_message_bytes: int = setting(DEFAULT_MAX_MESSAGE_BYTES, "largest gRPC message accepted",
                                     form=integer(gt=0), aliases=("GRADWATCH_MAX_MESSAGE_BYTES",))
    max_reports_per_request: int = setting(DEFAULT_MAX_REPORTS_PER_REQUEST, "reports (and registrations) per "
                                           "Export call at most", form=integer(gt=0))
    max_tensors_per_report: int = setting(DEFAULT_MAX_TENSORS_PER_REPORT, "tensors per report at most",
                                          form=integer(gt=0))
    max_string_bytes: int = setting(DEFAULT_MAX_STRING_BYTES, "longest name, module path or label value",
                                    form=integer(gt=0))
    max_inflight_bytes: int = setting(DEFAULT_MAX_INFLIGHT_BYTES, "request bytes processed at once; above it "
                                      "agents are refused with a retryable status (>= `max_message_bytes`)",
                                      form=integer(gt=0), aliases=("GRADWATCH_MAX_INFLIGHT_BYTES",))
    # Secret: a config printed in a log or traceback must not leak it (no repr).
    token: str | None = setting(DEFAULT_TOKEN, "bearer token agents must send (prefer the variable: flags show "
                                "in `ps`)", flag="--token", secret=True)
    metrics_listen: str = setting(DEFAULT_METRICS_LISTEN, "address of the collector's own /metrics",
                                  flag="--metrics-listen", form=host_port(DEFAULT_METRICS_LISTEN, empty="disables"),
                                  empty=True)
    redis_timeout_s: float = setting(DEFAULT_REDIS_TIMEOUT_S, "Redis connect and command timeout",
                                     form=number(gt=0, inf=True))
    redis_cluster: bool = setting(DEFAULT_REDIS_CLUSTER, "the Redis URL names any node of a Redis Cluster",
                                  flag="--redis-cluster")
    retry_after_s: float = setting(DEFAULT_RETRY_AFTER_S, "retry delay suggested to agents refused over the "
                                   "in-flight limit", form=number(ge=0, le=3600))
    tls_cert_file: str | None = setting(DEFAULT_TLS_CERT_FILE, "PEM certificate (chain) to serve TLS with (with "
                                        "`tls_key_file`)", flag="--tls-cert", form=FILE,
                                        aliases=("GRADWATCH_COLLECTOR_TLS_CERT",), shown="none (plaintext)")
    tls_key_file: str | None = setting(DEFAULT_TLS_KEY_FILE, "PEM private key of the certificate",
                                       flag="--tls-key", form=FILE, aliases=("GRADWATCH_COLLECTOR_TLS_KEY",))
    tls_client_ca_file: str | None = setting(DEFAULT_TLS_CLIENT_CA_FILE, "PEM CA bundle; when set, agents must "
                                             "present a certificate it signed (mTLS)", flag="--tls-client-ca",
                                             form=FILE, aliases=("GRADWATCH_COLLECTOR_TLS_CLIENT_CA",))
    tokens_file: str | None = setting(DEFAULT_TOKENS_FILE, "file of scoped agent tokens, one `<token> "
                                      "<run-id-prefix>` a line (`*`: any run): a token writes only the runs its "
                                      "prefix allows (docs/security.md)", flag="--tokens-file", form=FILE,
                                      shown="none: only `GRADWATCH_TOKEN`")
    # Secret, like `token`.
    read_token: str | None = setting(DEFAULT_READ_TOKEN, "bearer token the collector's /metrics requires (give "
                                     "Prometheus this one, not an agent's)", secret=True,
                                     shown="none: /metrics is open (refused beyond loopback)")
    allow_unauthenticated: bool = setting(DEFAULT_ALLOW_UNAUTHENTICATED, "listen beyond loopback without a token "
                                          "(gRPC: no token and no mTLS; /metrics: no `read_token`), on purpose",
                                          flag="--allow-unauthenticated")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def validate(self) -> CollectorConfig:
        """Raise ConfigError naming the first invalid setting; return self for chaining."""
        parse_host_port(self.listen, "listen")
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "metrics listen")
        scheme = urlsplit(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"redis url {redact_url(self.redis_url)!r} must start with redis://, rediss:// or unix://"
            )
        if scheme != "rediss" and any(key.startswith("ssl_") for key in parse_qs(urlsplit(self.redis_url).query)):
            raise ConfigError(f"redis url {redact_url(self.redis_url)!r} has ssl_* options: use rediss:// for TLS")
        if self.redis_cluster:
            self._validate_cluster_url()
        for name in ("stream_maxlen", "stream_max_bytes", "max_message_bytes", "max_reports_per_request",
                     "max_tensors_per_report", "max_string_bytes", "max_inflight_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_inflight_bytes < self.max_message_bytes:
            # Otherwise one maximal request could never be admitted and its agent would retry forever.
            raise ConfigError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least max_message_bytes "
                f"({self.max_message_bytes})"
            )
        if not self.redis_timeout_s > 0:
            raise ConfigError(f"redis_timeout_s must be positive, got {self.redis_timeout_s!r}")
        if not 0 <= self.retry_after_s <= 3600:
            raise ConfigError(f"retry_after_s must be between 0 and 3600 seconds, got {self.retry_after_s!r}")
        if self.token is not None:
            if not self.token.strip():
                raise ConfigError("token must not be empty or blank (leave it unset to disable authentication)")
            if not self.token.isascii() or any(c.isspace() for c in self.token):
                # gRPC metadata values are ASCII, and the token travels as "Bearer <token>".
                raise ConfigError("token must be printable ASCII without spaces")
        if self.read_token is not None and (why := bad_token(self.read_token)) is not None:
            raise ConfigError(f"read_token ({self.env_name('read_token')}) is {why}")
        if self.tokens_file is not None:
            Tokens.from_config(self.token, self.tokens_file)  # every line checked now, at start-up
        self._validate_tls()
        return self

    def exposure_problem(self) -> str | None:
        """Why the collector must not start listening: a port reachable beyond loopback that nobody has to
        authenticate to (unless allow_unauthenticated); None when it may. The message says what to set."""
        if self.allow_unauthenticated:
            return None
        opt_out = f"or set {self.env_name('allow_unauthenticated')}=1 (--allow-unauthenticated) to serve anyone " \
                  "who reaches it"
        host, _ = parse_host_port(self.listen, "listen")
        if not loopback_only(host) and self.token is None and self.tokens_file is None \
                and self.tls_client_ca_file is None:
            return (f"refusing to listen on {self.listen} without authentication: the port is reachable beyond "
                    f"loopback. Set an agent token ({self.env_name('token')}, or scoped tokens in "
                    f"{self.env_name('tokens_file')}) or require client certificates "
                    f"({self.env_name('tls_client_ca_file')}), listen on 127.0.0.1, {opt_out}")
        if self.metrics_listen:
            host, _ = parse_host_port(self.metrics_listen, "metrics listen")
            if not loopback_only(host) and self.read_token is None:
                return (f"refusing to serve /metrics on {self.metrics_listen} without a token: the port is "
                        f"reachable beyond loopback. Set {self.env_name('read_token')} (Prometheus sends it as "
                        f"a bearer token), listen on 127.0.0.1 (--metrics-listen), disable it with "
                        f"--metrics-listen '', {opt_out}")
        return None

    def _validate_cluster_url(self) -> None:
        # A cluster has no unix sockets and only database 0; redis-py would refuse both at connect time.
        parts = urlsplit(self.redis_url)
        if parts.scheme == "unix":
            raise ConfigError("a Redis Cluster is reached over TCP: give a redis:// or rediss:// url of a node")
        if parts.path.strip("/") not in ("", "0"):
            raise ConfigError(f"a Redis Cluster has only database 0, got {redact_url(self.redis_url)!r}")

    def _validate_tls(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("TLS needs both a certificate and its private key (--tls-cert and --tls-key, env "
                              "GRADWATCH_COLLECTOR_TLS_CERT and GRADWATCH_COLLECTOR_TLS_KEY), or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("a client CA (mTLS) needs TLS: set --tls-cert and --tls-key as well")
        for what, path, marker in (("tls_cert_file", self.tls_cert_file, "CERTIFICATE"),
                                   ("tls_key_file", self.tls_key_file, "PRIVATE KEY"),
                                   ("tls_client_ca_file", self.tls_client_ca_file, "CERTIFICATE")):
            if path is not None:
                check_pem_file(path, what, marker)


def check_pem_file(path: str, what: str, marker: str) -> None:
    """ConfigError unless `path` is a readable PEM file holding a `marker` block (CERTIFICATE, PRIVATE KEY).

    Checked here because gRPC, given a bad one, only fails to bind with a bare "Failed to bind" error.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"{what} {path!r}: {err.strerror or err}") from None
    if b"-----BEGIN " not in text or marker.encode() + b"-----" not in text:
        raise ConfigError(f"{what} {path!r} is not a PEM file with a {marker} block")


def parse_host_port(value: str, what: str = "address") -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets); ConfigError with an example if it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not _PORT_RE.match(port) or int(port) > 65535:
        raise ConfigError(f"{what} must be host:port (e.g. {endpoints.COLLECTOR} or [::]:{endpoints.COLLECTOR_PORT}), "
                          f"got {value!r}")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(f"{what} has an unbalanced IPv6 bracket: {value!r}")
    return host.strip("[]"), int(port)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))

