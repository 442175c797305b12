"""What every answer of the HTTP port passes through, outermost first (app.py puts them in this order):

    Guard       an endpoint's bug answers 500 and is logged once a minute per path; a client that hangs up
                mid-answer is no error
    RoutePath   routes match the path as sent, trailing slash ignored
    ReadAccess  the read token (access.py)
    Compress    gzip for JSON answers over GZIP_MIN_BYTES

and, on the one route that writes, access.WriteAccess: the API token.
"""

from __future__ import annotations

import logging

from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradwatch.aggregator.http.responses import error

GZIP_MIN_BYTES = 16 << 10


class Guard:
    """Catches what escapes an endpoint, so that no request can take the port down or flood the log."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        errors = scope["app"].state.backend.errors
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except (OSError, ClientDisconnect):
            # The client went away mid-answer: not worth a traceback.
            client = (scope.get("client") or ("?",))[0]
            errors.log(logging.DEBUG, "connection", "HTTP connection from %s failed", client, exc_info=True)
        except Exception:
            path = scope.get("raw_path", b"").decode("latin-1")
            errors.log(logging.ERROR, f"api:{path}", "cannot answer %s %s", scope["method"], path, exc_info=True)
            if not started:  # else the half-sent answer is cut off, which the client sees
                await error(500, "internal", "internal error; see the aggregator's log")(scope, receive, send)


class RoutePath:
    """Routes match the path as the client sent it, percent-escapes and all (endpoints unquote their
    parameters), so that an escaped slash inside a run id never moves a request to another route. A trailing
    slash is ignored, without a redirect; under /ui/ it names a folder, which is never served."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
            scope["path"] = path if path.startswith("/ui/") else path.rstrip("/") or "/"
        await self.app(scope, receive, send)


class Compress(GZipMiddleware):
    """Starlette's gzip (level 4) for JSON answers over GZIP_MIN_BYTES to clients that take it: a 1,000-layer
    model's answers run to megabytes, and numbers and names compress about 5x. Every other answer encodes
    itself (/metrics, the page's files) or is never encoded (event streams)."""

    def __init__(self, app: ASGIApp):
        super().__init__(app, minimum_size=GZIP_MIN_BYTES + 1, compresslevel=4,
                         exclude_content_types=(*DEFAULT_EXCLUDED_CONTENT_TYPES, "text/*", "image/*",
                                                "application/openmetrics-text"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.minimum_size = GZIP_MIN_BYTES + 1  # the module's value at every answer, so it can be tuned live
        await super().__call__(scope, receive, send)

