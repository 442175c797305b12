"""The aggregator's HTTP port on a thread: uvicorn serving the app (app.py) from a socket bound here, before
the thread starts, so that a taken port is a ListenError at once and the port is known to the caller. A port
reachable beyond loopback without a read token is a ListenError before anything binds (access.py).

    serve(...) -> (server, thread)    server.server_port, server.shutdown(timeout), server.server_close();
                                      server.view (and the other Backend fields) may be replaced while serving
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from prometheus_client import CollectorRegistry

from gradwatch.aggregator.http.access import exposure_problem
from gradwatch.aggregator.http.app import Backend, build_app
from gradwatch.aggregator.http.live import DEFAULT_TICK_S, FrameStore, LiveHub
from gradwatch.aggregator.http.live_routes import STATIC
from gradwatch.aggregator.http.metrics import AggregatorView, RefusalCollector
from gradwatch.aggregator.http.snapshots import SnapshotStore
from gradwatch.settings import loopback_only

SERVER_NAME = "gradwatch-aggregator"
START_TIMEOUT_S = 10.0
# At shutdown, answers in flight get this long before they are cancelled (event streams end at once).
SHUTDOWN_GRACE_S = 2


class ListenError(OSError):
    """The metrics port cannot (or must not) be opened; the message is meant for the command line."""


class HttpServer(Backend):
    """The Backend the endpoints read, and the uvicorn server that runs them on a named daemon thread."""

    def __init__(self, sock: socket.socket, **sources):
        super().__init__(**sources)
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_port: int = self.server_address[1]
        config = uvicorn.Config(
            build_app(self), http="h11", ws="none", loop="asyncio", lifespan="off", interface="asgi3",
            log_config=None,  # the process's logging stays as the process set it up
            log_level="warning",  # uvicorn's start and stop lines are not news
            access_log=False,  # Prometheus scrapes every few seconds
            proxy_headers=False, server_header=False, headers=[("Server", SERVER_NAME)],
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        self._uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="gradwatch-http",
                                       daemon=True)
        self._closed = False
        self._refusal_metrics = None
        if self.registry is not None:  # the port's refusals, on its own /metrics
            self._refusal_metrics = RefusalCollector(self.refusals.read)
            self.registry.register(self._refusal_metrics)

    def start(self, timeout: float = START_TIMEOUT_S) -> threading.Thread:
        """Starts the thread and waits until uvicorn serves; ListenError if it does not within `timeout`."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server_close()
                host, port = self.server_address[:2]
                raise ListenError(f"cannot listen on {host}:{port}: the HTTP server did not start; see the log")
            time.sleep(0.01)
        return self.thread

    def shutdown(self, timeout: float = SHUTDOWN_GRACE_S + 3.0) -> None:
        """Ends the event streams, stops accepting, lets answers in flight finish (SHUTDOWN_GRACE_S) and waits
        for the thread at most `timeout`. Idempotent."""
        if self.live is not None:
            self.live.stop()  # ends the event streams, which would otherwise hold the shutdown for its grace
        self._uvicorn.should_exit = True  # uvicorn's loop looks every 0.1 s
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def server_close(self) -> None:
        """Stops the server if it runs, and closes the listening socket. Idempotent."""
        self.shutdown()
        if not self._closed:
            self._closed = True
            self.socket.close()
            if self._refusal_metrics is not None:
                self.registry.unregister(self._refusal_metrics)


def serve(host: str, port: int, registry: CollectorRegistry | None, view: Callable[[], AggregatorView], *,
          history: Callable[[str, int | None, int | None, int], list[dict] | None] | None = None,
          topology: Callable[[str], dict | None] | None = None,
          alert_log: Callable[[str], list[dict]] | None = None,
          frames: FrameStore | None = None,
          snapshots: SnapshotStore | None = None, api_token: str | None = None,
          read_token: str | None = None, allow_unauthenticated: bool = False,
          live_tick_s: float | None = DEFAULT_TICK_S,
          poll_s: float = 0.5) -> tuple[HttpServer, threading.Thread]:
    """Starts /metrics, the query API and the live view on a daemon thread; returns (server, thread).
    Raises ListenError with a message for the command line when the port cannot be opened, or must not: beyond
    loopback without a read token, unless allow_unauthenticated (the tokens: access.py). live_tick_s None:
    no live hub; frames: the consumer's histogram frames (else the hub samples one per tick). poll_s is
    accepted for callers of the former server and unused: uvicorn checks for shutdown every 0.1 s."""
    loopback = loopback_only(host)
    if (problem := exposure_problem(host, port, read_token, allow_unauthenticated, loopback)) is not None:
        raise ListenError(problem)
    sock = _bind(host, port)
    live = LiveHub(view, history, live_tick_s, frames=frames) if live_tick_s else None
    try:
        server = HttpServer(sock, registry=registry, view=view, history=history, topology=topology,
                            alert_log=alert_log, live=live, snapshots=snapshots, api_token=api_token,
                            read_token=read_token, loopback=loopback)
    except BaseException:
        sock.close()
        raise
    thread = server.start()
    if live is not None:
        live.start()
        threading.Thread(target=STATIC.warm, name="gradwatch-ui-warm", daemon=True).start()
    return server, thread


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket for host:port, of the family the host resolves to first (IPv6 hosts work)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
            sock.bind(address)
            sock.listen()  # connections queue from now on, before uvicorn's loop runs
        except OSError:
            sock.close()
            raise
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why = "address in use (another aggregator running? choose one with --metrics-listen)"
        else:
            why = e.strerror or str(e)
        raise ListenError(f"cannot listen on {host}:{port}: {why}") from e
    sock.setblocking(False)
    return sock
