"""Who may call what on the HTTP port (docs/security.md#aggregator-http-port):

    /healthz, /, /ui, /ui/{file}     anyone: liveness, and the page's own files (no data in them)
    every other GET and HEAD         with a read token configured: the read token or the API token
    POST .../snapshots (app.py)      the API token; with none configured: what a read needs, on a port that
                                     listens on loopback only, else refused (403): a snapshot request reaches
                                     training jobs and brings back weights and input feature maps

Tokens travel only as "Authorization: Bearer <token>", never in a URL (proxies log URLs); the live view
sends them from script, its event stream included (ui/util.js). Both tokens are compared with what was sent
in constant time. Every refusal is counted by reason (counters.HTTP_REFUSALS, exported as
gradwatch_aggregator_http_refused_total). Whether a port may open without a read token at all is
`exposure_problem()`, asked before it binds (server.py).
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from gradwatch.aggregator.config import env_name
from gradwatch.aggregator.http.responses import backend, error

READ, WRITE = 1, 2
READ_HEADERS = {"WWW-Authenticate": 'Bearer realm="gradwatch"'}


class Policy:
    """The tokens and where the port listens; `refusal()` judges one request's Authorization header."""

    def __init__(self, read_token: str | None, api_token: str | None, loopback: bool):
        self._read = read_token.encode() if read_token is not None else None
        self._api = api_token.encode() if api_token is not None else None
        self.loopback = loopback

    def level(self, authorization: str) -> int:
        """READ, WRITE or 0 for the token in an Authorization header."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return 0
        presented = given.strip().encode("latin-1", "replace")
        # Both compared, always: the time says nothing about which token (or how much of one) was guessed.
        api = self._api is not None and hmac.compare_digest(presented, self._api)
        read = self._read is not None and hmac.compare_digest(presented, self._read)
        return WRITE if api else READ if read else 0

    def read_refusal(self, authorization: str) -> tuple[int, str, str] | None:
        """(status, reason, message) when a read must be refused, else None."""
        if self._read is None or self.level(authorization) >= READ:
            return None
        given = "wrong bearer token: " if authorization else ""
        return 401, "unauthenticated", (f"{given}this aggregator's reads need Authorization: Bearer <its read token> "
                                        f"({env_name('read_token')}; its API token reads too)")

    def write_refusal(self, authorization: str) -> tuple[int, str, str] | None:
        if self._api is None:
            if self.loopback:
                return self.read_refusal(authorization)  # never less guarded than a read
            return 403, "writes_disabled", (
                "writes (snapshot requests, valid ranges) are refused: this aggregator listens beyond loopback and has "
                "no API token. Set "
                f"{env_name('api_token')} on it and send Authorization: Bearer <that token>")
        level = self.level(authorization)
        if level == WRITE:
            return None
        if level == READ:
            return 403, "read_only", ("the read token cannot write (snapshot requests, valid ranges): send the API "
                                      f"token ({env_name('api_token')})")
        given = "wrong bearer token: " if authorization else ""
        return 401, "unauthenticated", (f"{given}this aggregator needs Authorization: Bearer <its API token> "
                                        f"({env_name('api_token')}) to request snapshots")


def exposure_problem(host: str, port: int, read_token: str | None, allow_unauthenticated: bool,
                     loopback: bool) -> str | None:
    """Why the port must not open: reachable beyond loopback, and reads open to whoever reaches it."""
    if loopback or read_token is not None or allow_unauthenticated:
        return None
    return (f"refusing to listen on {host}:{port} without a read token: the port is reachable beyond loopback "
            f"and serves run data, snapshots of weights and input feature maps included. Set "
            f"{env_name('read_token')} (Prometheus, Grafana and the live view send it as a bearer token), listen "
            f"on 127.0.0.1 (--metrics-listen), or set {env_name('allow_unauthenticated')}=1 to serve reads to "
            f"anyone who reaches it")


def _open(path: str) -> bool:
    """Paths served to anyone: liveness and the page's files (the page asks for the token itself)."""
    return path in ("/healthz", "/", "/ui") or path.startswith("/ui/")


class ReadAccess:
    """Every GET and HEAD but the open paths passes the read rule (outermost after RoutePath, so that it judges
    the path the router will see)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and not _open(scope["path"]):
            conn = HTTPConnection(scope)
            sources = backend(conn)
            refusal = sources.access.read_refusal(conn.headers.get("Authorization", ""))
            if refusal is not None:
                await _refuse(sources, refusal, close=False)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class WriteAccess:
    """The write rule, on the routes that write (app.py: the snapshot POST)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        conn = HTTPConnection(scope)
        sources = backend(conn)
        refusal = sources.access.write_refusal(conn.headers.get("Authorization", ""))
        if refusal is not None:
            # The body is left unread: the connection is closed rather than drained.
            await _refuse(sources, refusal, close=True)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _refuse(sources, refusal: tuple[int, str, str], close: bool):
    status, reason, message = refusal
    sources.refusals.add(reason)
    headers = {**(READ_HEADERS if status == 401 else {}), **({"Connection": "close"} if close else {})}
    # errorType: "unauthorized" (send a token), else the reason, which the page tells apart (ui/snapshot.js).
    return error(status, "unauthorized" if status == 401 else reason, message, headers)
