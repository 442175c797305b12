"""The collector process's parts in start order: the security checks (tokens, who can reach the ports), then
Redis, then /metrics, then the gRPC listener."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from wsgiref.simple_server import WSGIServer

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from gradwatch.collector.auth import Tokens
from gradwatch.collector.config import CollectorConfig, parse_host_port, redact_url
from gradwatch.collector.metrics_http import serve_metrics
from gradwatch.collector.service import SERVICE_NAME, ExportService
from gradwatch.collector.telemetry import CollectorMetrics
from gradwatch.settings import ConfigError
from gradwatch.streams import quiet_handshake

log = logging.getLogger("gradwatch.collector")


class CollectorStartError(RuntimeError):
    """The collector cannot start (a port beyond loopback without a token, Redis unreachable, port taken); the
    message says what to do."""


class CollectorServer:
    """One collector: `await start()`, serve until `await stop()`. Not restartable once stopped."""

    def __init__(self, config: CollectorConfig, registry: CollectorRegistry | None = None):
        self.config = config
        # A registry of our own, never prometheus_client's global one: two servers in one process (tests,
        # `gradwatch up`) must not collide, and /metrics shows only the collector's series.
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = CollectorMetrics(self.registry)
        self._redis: aioredis.Redis | RedisCluster | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics_http: WSGIServer | None = None
        self._bound_port: int | None = None
        self._tokens: Tokens | None = None
        self._stopped = False

    @property
    def bound_port(self) -> int:
        """The gRPC port actually bound (the chosen one when listen ends in :0)."""
        if self._bound_port is None:
            raise RuntimeError("collector not started")
        return self._bound_port

    @property
    def metrics_port(self) -> int | None:
        """The /metrics port actually bound, None when disabled or not started."""
        return None if self._metrics_http is None else self._metrics_http.server_address[1]

    @property
    def address(self) -> str:
        """host:port agents can dial (the listen host with the bound port)."""
        host, _ = parse_host_port(self.config.listen)
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.bound_port}"

    async def start(self) -> None:
        if self._stopped or self._grpc is not None:
            raise RuntimeError("a CollectorServer starts once")
        self._check_access()
        try:
            await self._connect_redis()
            self._start_metrics()
            await self._start_grpc()
        except BaseException:
            await self._close_downstream()
            raise
        log.info("gradwatch collector listening on %s -> redis %s%s%s", self.address,
                 redact_url(self.config.redis_url),
                 f" (metrics on {self.config.metrics_listen.rpartition(':')[0]}:{self.metrics_port})"
                 if self.metrics_port is not None else "",
                 ("; TLS, client certificates required" if self.config.tls_client_ca_file else "; TLS")
                 if self.config.tls else "")
        if self._tokens.scoped:  # how many, never which
            log.info("%d scoped agent tokens from %s", self._tokens.scoped, self.config.tokens_file)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, let in-flight ones finish within `grace` seconds, then close Redis."""
        if self._stopped:
            return
        self._stopped = True
        if self._health is not None:
            # Health watchers (load balancers) see NOT_SERVING while in-flight calls drain.
            await self._health.enter_graceful_shutdown()
        # Upstream first: every call that was answered OK is in Redis before the connection closes.
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self._close_downstream()

    async def wait_for_termination(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()

    def _check_access(self) -> None:
        """Before any port opens: the tokens read (the file may have changed since validate()), and no port
        reachable beyond loopback without authentication unless the config opts out."""
        try:
            self._tokens = Tokens.from_config(self.config.token, self.config.tokens_file)
        except ConfigError as err:
            raise CollectorStartError(str(err)) from None
        problem = self.config.exposure_problem()
        if problem is not None:
            raise CollectorStartError(problem)

    async def _connect_redis(self) -> None:
        timeout = self.config.redis_timeout_s
        url = redact_url(self.config.redis_url)
        try:
            # A cluster client follows the slots itself (MOVED, topology refresh): the pipeline in service.py
            # then sends each node the commands for its slots.
            client_class = RedisCluster if self.config.redis_cluster else aioredis.Redis
            self._redis = client_class.from_url(
                self.config.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                # One quick retry covers a connection Redis closed while idle; longer outages are the agent's
                # to retry (its backoff, its deadline), not ours to hide behind a slow answer. (A cluster client
                # takes only the count from it, and refreshes its view of the slots before that retry.)
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
                **quiet_handshake(),
            )
            await self._redis.ping()
        # TypeError: redis-py hands unknown URL query options to the connection as keyword arguments.
        except (RedisError, RedisClusterException, OSError, ValueError, TypeError) as err:
            hint = ("give a node of a running Redis Cluster with --redis-url, or drop --redis-cluster for a single "
                    "Redis" if self.config.redis_cluster else
                    "start one, e.g. `gradwatch up`, or choose one with --redis-url")
            raise CollectorStartError(f"cannot reach redis at {url}: {err} ({hint})") from None

    def _start_metrics(self) -> None:
        if not self.config.metrics_listen:
            return
        host, port = parse_host_port(self.config.metrics_listen, "metrics listen")
        try:
            refused = self.metrics.refused.labels(reason="metrics_unauthenticated")
            self._metrics_http = serve_metrics(host, port, self.registry, self.config.read_token, refused.inc)
        except OSError as err:
            raise CollectorStartError(
                f"cannot serve metrics on {self.config.metrics_listen}: {err.strerror or err} (choose another "
                "with --metrics-listen, or disable it with --metrics-listen '')") from None

    async def _start_grpc(self) -> None:
        credentials = self._server_credentials()
        service = ExportService(self.config, self._redis, self.metrics, tokens=self._tokens)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default: a second collector would then share the port silently and
            # take half the traffic. Refuse instead.
            ("grpc.so_reuseport", 0),
            # Agents ping every 30 s to notice a dead collector (agent/export/exporter.py); the default policy (at
            # most one ping per 5 min without calls) would answer those pings with GOAWAY too_many_pings.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        server.add_generic_rpc_handlers((service.rpc_handler(),))
        # Also as registered methods: the generated client stub calls registered methods (the faster path).
        server.add_registered_method_handlers(SERVICE_NAME, service.method_handlers())
        # The standard health service (grpc.health.v1.Health), for load balancers and probes. It sits outside
        # ExportService, so it needs no bearer token. Redis answered in _connect_redis: both names are SERVING.
        # Server reflection is deliberately not enabled: it would describe the service to anyone who asks.
        self._health = health.aio.HealthServicer()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        failure = _bind_failure(self.config.listen)
        port = 0
        if failure is None:
            try:
                if credentials is None:
                    port = server.add_insecure_port(self.config.listen)
                else:
                    port = server.add_secure_port(self.config.listen, credentials)
            except RuntimeError:
                # Lost a race with another process since the probe, or (TLS) gRPC refused the certificate or key.
                failure = ("address in use or not available" if credentials is None else
                           "TLS certificate or key refused (does the key match the certificate?), or address in use")
        if not port:
            await server.stop(None)
            raise CollectorStartError(f"cannot listen on {self.config.listen}: {failure or 'address not available'} "
                                      "(another collector running? choose one with --listen)")
        await server.start()
        self._grpc = server
        self._bound_port = port

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the configured files (validate() checked them), None for plaintext."""
        config = self.config
        if not config.tls:
            return None
        try:
            with open(config.tls_key_file, "rb") as key, open(config.tls_cert_file, "rb") as cert:
                pair = (key.read(), cert.read())
            client_ca = None
            if config.tls_client_ca_file is not None:
                with open(config.tls_client_ca_file, "rb") as ca:
                    client_ca = ca.read()
        except OSError as err:
            raise CollectorStartError(f"cannot read TLS file {err.filename}: {err.strerror or err}") from None
        # A client CA means mTLS: the handshake fails for clients without a certificate it signed.
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    async def _close_downstream(self) -> None:
        if self._metrics_http is not None:
            # Shut down in a thread: shutdown() waits for serve_forever's poll loop to notice.
            await asyncio.to_thread(self._metrics_http.shutdown)
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def _bind_failure(listen: str) -> str | None:
    """Why `listen` cannot be bound, in words, or None if it can.

    Probed before gRPC tries: gRPC's own failure is a bare RuntimeError plus a C-core log line on stderr.
    """
    host, port = parse_host_port(listen)
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:
        return f"cannot resolve {host!r}: {err.strerror or err}"
    reason = "address not available"
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                # As gRPC binds: SO_REUSEADDR, so a port in TIME_WAIT is not mistaken for a taken one.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as err:
            reason = "address in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err))
            continue
        return None  # gRPC binds what it can of the resolved addresses: one is enough
    return reason
