"""The JSON envelope of every API answer (Prometheus' HTTP API shape: {"status": "success", "data": ...} or
{"status": "error", "errorType": ..., "error": ...}) and what endpoints read off a request: the Backend, the
run in the path, the query arguments."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

from starlette.requests import HTTPConnection
from starlette.responses import Response

if TYPE_CHECKING:
    from gradwatch.aggregator.http.app import Backend


def backend(request: HTTPConnection) -> Backend:
    return request.app.state.backend


def run_of(request: HTTPConnection) -> str:
    # Routes match the path as sent (middleware.RoutePath): parameters are still percent-encoded.
    return unquote(request.path_params["run"])


def raw_path(request: HTTPConnection) -> str:
    """The path as the client sent it, for messages."""
    return request.scope.get("raw_path", b"").decode("latin-1") or request.scope["path"]


def query(request: HTTPConnection) -> dict[str, list[str]]:
    """name -> every value given, blank ones left out (`?from=` is no bound, not a bad one)."""
    return parse_qs(request.scope.get("query_string", b"").decode("latin-1"))


def int_arg(query: dict[str, list[str]], name: str) -> int | None:
    """The last value of a query parameter as an integer; None when absent, ValueError naming it when not one."""
    values = query.get(name)
    if not values:
        return None
    try:
        return int(values[-1])
    except ValueError:
        raise ValueError(f"{name}: expected an integer, not {values[-1]!r}") from None


def flag_arg(query: dict[str, list[str]], name: str) -> bool:
    """A switch that is on unless given as 0 or false."""
    return query.get(name, ["1"])[-1] not in ("0", "false")


def ok(data: object, status: int = 200) -> Response:
    return json_response(status, {"status": "success", "data": data})


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, {"status": "error", "errorType": kind, "error": message}, headers)


def unknown(run: str) -> Response:
    return error(404, "not_found", f"no run {run!r} (runs are forgotten after run_expiry_s without a report)")


def json_response(status: int, doc: dict, headers: dict[str, str] | None = None) -> Response:
    # NaN and Inf arrive already spelled as strings (views.num); allow_nan=False catches one that slipped through.
    body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    return Response(body, status, {"Cache-Control": "no-store", **(headers or {})}, media_type="application/json")
