"""gRPC client for IngestService.Export: one deadline per export, jittered backoff on retryable codes.

Runs on the agent's exporter thread. The deadline is `timeout_s` from the call, or the caller's own when
that comes first (close() passes what is left of its budget). shutdown(), from any thread, interrupts a
backoff sleep and cancels an RPC in flight (closing the channel) at once; after it every export fails
retryable without touching the network. A server's push-back (google.rpc.RetryInfo in the trailing
metadata, as OTLP) lengthens the backoff, never past the deadline.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2

from gradwatch.agent.config import AgentConfig
from gradwatch.rpc import RETRY_INFO_KEY
from gradwatch.v1 import ingest_service_pb2, ingest_service_pb2_grpc

log = logging.getLogger("gradwatch.agent")

# As OTLP: codes after which the same request may succeed later.
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# Keepalive: notice a dead collector within ~40 s even when idle; collectors must allow 30 s pings.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.primary_user_agent", "gradwatch-agent"),
]


@dataclass
class ExportResult:
    ok: bool
    retryable: bool = False
    rejected_reports: int = 0
    rejected_registrations: int = 0
    rejected_snapshots: int = 0
    error: str = ""
    code: str = ""  # the gRPC status code's name of a failed call ("" when there was no answer to name)
    snapshot_requests: list = field(default_factory=list)  # what the live view asked this run's agents for


def channel_credentials(config: AgentConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials from the config's PEM files (read once, here), None for plaintext."""
    if not config.tls:
        return None

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(root_certificates=read(config.tls_ca_file),
                                        private_key=read(config.tls_key_file),
                                        certificate_chain=read(config.tls_cert_file))


def server_retry_delay(err: grpc.RpcError) -> float:
    """Seconds the server asked us to wait (its RetryInfo trailer), 0.0 without a usable one."""
    try:
        for key, value in err.trailing_metadata() or ():
            if key == RETRY_INFO_KEY:
                delay = error_details_pb2.RetryInfo.FromString(value).retry_delay
                return max(delay.seconds + delay.nanos / 1e9, 0.0)
    except Exception:  # noqa: BLE001 - no trailer API or a garbled trailer: fall back to our own backoff
        pass
    return 0.0


class Exporter:
    def __init__(self, target: str, token: str | None = None, timeout_s: float = 10.0,
                 credentials: grpc.ChannelCredentials | None = None):
        self.target = target
        self.timeout_s = timeout_s
        self._credentials = credentials
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._shutdown = threading.Event()
        self._lock = threading.Lock()  # the channel: made on the exporter thread, closed by shutdown() anywhere
        self._channel: grpc.Channel | None = None
        self._stub: ingest_service_pb2_grpc.IngestServiceStub | None = None

    @classmethod
    def from_config(cls, config: AgentConfig) -> Exporter:
        return cls(config.collector, config.token, config.export_timeout_s, channel_credentials(config))

    def _connect(self) -> ingest_service_pb2_grpc.IngestServiceStub:
        with self._lock:
            if self._shutdown.is_set():
                raise ValueError("exporter shut down")  # no new channel that nobody would close
            if self._stub is None:
                if self._credentials is None:
                    self._channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
                else:
                    self._channel = grpc.secure_channel(self.target, self._credentials, options=CHANNEL_OPTIONS)
                self._stub = ingest_service_pb2_grpc.IngestServiceStub(self._channel)
            return self._stub

    def _reconnect(self) -> None:
        # As the OTLP exporter: after UNAVAILABLE rebuild the channel rather than wait out its backoff.
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def export(self, request: ingest_service_pb2.ExportRequest, deadline: float | None = None) -> ExportResult:
        """Send `request`, retrying retryable codes until `timeout_s` from now or `deadline` (a
        time.monotonic() value), whichever comes first."""
        deadline = min(time.monotonic() + self.timeout_s, math.inf if deadline is None else deadline)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if self._shutdown.is_set() or remaining <= 0:
                return ExportResult(ok=False, retryable=True, error="no time left" if remaining <= 0 else
                                    "exporter shut down")
            try:
                response = self._connect().Export(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                message = f"{code.name}: {err.details() if hasattr(err, 'details') else err}"
                if self._shutdown.is_set():  # cancelled by shutdown(): no answer from the collector
                    return ExportResult(ok=False, retryable=True, error="exporter shut down")
                if code not in RETRYABLE_CODES:
                    return ExportResult(ok=False, retryable=False, error=message, code=code.name)
                if code is grpc.StatusCode.UNAVAILABLE:
                    self._reconnect()
                backoff = min(INITIAL_BACKOFF_S * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.8, 1.2)
                backoff = max(backoff, server_retry_delay(err))
                attempt += 1
                if backoff > deadline - time.monotonic() or self._shutdown.wait(backoff):
                    return ExportResult(ok=False, retryable=True, error=message, code=code.name)
                continue
            except Exception as err:  # e.g. ValueError on a channel closed by shutdown()
                if self._shutdown.is_set():
                    return ExportResult(ok=False, retryable=True, error="exporter shut down")
                return ExportResult(ok=False, retryable=False, error=f"{type(err).__name__}: {err}")
            partial = response.partial_success
            return ExportResult(ok=True, rejected_reports=partial.rejected_reports,
                                rejected_registrations=partial.rejected_registrations,
                                rejected_snapshots=partial.rejected_snapshots, error=partial.error_message,
                                snapshot_requests=list(response.snapshot_requests))

    def shutdown(self) -> None:
        """Interrupt a backoff, cancel an RPC in flight, refuse further exports. Idempotent, any thread."""
        with self._lock:
            self._shutdown.set()
            if self._channel is not None:
                self._channel.close()
