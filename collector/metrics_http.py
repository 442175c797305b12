"""The collector's own /metrics port: prometheus_client's WSGI app on a threaded server (as its
start_http_server), behind the read token when one is configured.

Without a read token the port is open, which config.exposure_problem() allows on loopback only.
"""

from __future__ import annotations

import hmac
import socket
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

REFUSAL = b"this collector's /metrics needs Authorization: Bearer <its read token>\n"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Prometheus scrapes every few seconds: no line per request."""


def serve_metrics(host: str, port: int, registry: CollectorRegistry, read_token: str | None,
                  refused: Callable[[], None]) -> WSGIServer:
    """Serves `registry` on host:port from a daemon thread; `refused()` is called for each request turned
    away. OSError when the port cannot be opened. Stop with shutdown() then server_close()."""
    family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    app = make_wsgi_app(registry)
    if read_token is not None:
        app = _guarded(app, read_token.encode(), refused)
    httpd = make_server(address[0], port, app, Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="gradwatch-collector-metrics", daemon=True).start()
    return httpd


def _guarded(app: Callable, token: bytes, refused: Callable[[], None]) -> Callable:
    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        # Constant time: the answer's timing says nothing about how much of a guess was right.
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), token):
            return app(environ, start_response)
        refused()
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("WWW-Authenticate", 'Bearer realm="gradwatch-collector"'),
                                             ("Content-Length", str(len(REFUSAL)))])
        return [REFUSAL]

    return guarded
