"""The aggregator's HTTP app: the route table, its middleware, and what the endpoints read (Backend).

    GET  /metrics, /healthz                          api.py (/healthz and the page's files open to anyone;
                                                     every other GET the read token, when one is set: access.py)
    GET  /api/v1/runs, /api/v1/alerts                api.py
    GET  /api/v1/runs/{run}[/layers|/inputs|/steps|/topology]
    GET  /, /ui, /ui/{file}, /api/v1/events          live_routes.py (the page, server-sent events)
    GET  /api/v1/runs/{run}/{heatmap|histograms|nodegraph|alerts}
    GET  /api/v1/runs/{run}/snapshots[/{id}]         snapshots.py
    POST /api/v1/runs/{run}/snapshots                the API token (access.WriteAccess)
    GET  /api/v1/runs/{run}/{tensors|optimizer|ranges}  stats_routes.py
    POST, DELETE /api/v1/runs/{run}/ranges           the API token (access.WriteAccess)

Answers are JSON in Prometheus' envelope (responses.py), errors included: an unknown path is a 404, any
method but GET and HEAD (and those writes) a 405 with "Allow: GET, HEAD". Endpoints that read the state are
plain functions, run on Starlette's threadpool: the aggregator's locks never block the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gradwatch.aggregator.counters import HTTP_REFUSALS, Tally
from gradwatch.aggregator.http import api, live_routes, snapshots, stats_routes
from gradwatch.aggregator.http.access import Policy, ReadAccess, WriteAccess
from gradwatch.aggregator.http.live import LiveHub
from gradwatch.aggregator.http.metrics import AggregatorView
from gradwatch.aggregator.http.middleware import Compress, Guard, RoutePath
from gradwatch.aggregator.http.responses import error, raw_path
from gradwatch.aggregator.http.snapshots import SnapshotStore
from gradwatch.logs import DedupLog

log = logging.getLogger("gradwatch.aggregator.http")
RUN = "/api/v1/runs/{run}"


class Backend:
    """What the endpoints read, looked up at every request: replacing `view` (or any other) takes effect at
    the next one. history(run, first, last, limit), topology(run) and alert_log(run) may be None: their
    routes answer as for an unknown run, or from the firing alerts. `loopback`: the port listens on loopback
    only, where a snapshot request needs no API token when none is configured (access.Policy)."""

    def __init__(self, registry: CollectorRegistry | None, view: Callable[[], AggregatorView],
                 history: Callable[[str, int | None, int | None, int], list[dict] | None] | None = None,
                 topology: Callable[[str], dict | None] | None = None,
                 alert_log: Callable[[str], list[dict]] | None = None, live: LiveHub | None = None,
                 snapshots: SnapshotStore | None = None, api_token: str | None = None,
                 read_token: str | None = None, loopback: bool = False):
        self.registry = registry
        self.view = view
        self.history = history
        self.topology = topology
        self.alert_log = alert_log  # the run's alert transitions (the alert stream), for the live view
        self.live = live
        self.snapshots = snapshots
        self.access = Policy(read_token, api_token, loopback)
        self.refusals = Tally(tuple(HTTP_REFUSALS))
        self.errors = DedupLog(log)


def build_app(backend: Backend) -> Starlette:
    routes = [
        Route("/metrics", api.metrics),
        Route("/healthz", api.healthz),
        Route("/", live_routes.to_page),
        Route("/ui", live_routes.to_page),
        Route("/ui/{file:path}", live_routes.page_file),
        Route("/api/v1/runs", api.runs),
        Route("/api/v1/alerts", api.alerts),
        Route("/api/v1/events", live_routes.events),
        Route(RUN, api.one_run),
        Route(f"{RUN}/layers", api.layers),
        Route(f"{RUN}/inputs", api.inputs),
        Route(f"{RUN}/steps", api.steps),
        Route(f"{RUN}/ranks", api.ranks),
        Route(f"{RUN}/topology", api.topology),
        Route(f"{RUN}/heatmap", live_routes.heatmap),
        Route(f"{RUN}/histograms", live_routes.histograms),
        Route(f"{RUN}/nodegraph", live_routes.nodegraph),
        Route(f"{RUN}/alerts", live_routes.run_alerts),
        Route(f"{RUN}/snapshots", snapshots.listing),
        Route(f"{RUN}/snapshots", snapshots.request_one, methods=["POST"], middleware=[Middleware(WriteAccess)]),
        Route(f"{RUN}/snapshots/{{id}}", snapshots.one),
        Route(f"{RUN}/tensors", stats_routes.tensors),
        Route(f"{RUN}/optimizer", stats_routes.optimizer),
        Route(f"{RUN}/ranges", stats_routes.list_ranges),
        Route(f"{RUN}/ranges", stats_routes.set_range, methods=["POST"], middleware=[Middleware(WriteAccess)]),
        Route(f"{RUN}/ranges", stats_routes.delete_range, methods=["DELETE"], middleware=[Middleware(WriteAccess)]),
    ]
    middleware = [Middleware(Guard), Middleware(RoutePath), Middleware(ReadAccess), Middleware(Compress)]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={404: _not_found, 405: _not_allowed})
    app.router.redirect_slashes = False  # RoutePath ignores trailing slashes already: never a redirect
    app.state.backend = backend
    return app


def _not_found(request: Request, exc: Exception) -> Response:
    if request.method not in ("GET", "HEAD"):
        return _not_allowed(request, exc)  # a write to no resource: refused as a method, not as a path
    return error(404, "not_found", f"no such path: {raw_path(request)}")


def _not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, "method_not_allowed", f"{request.method} is not allowed; use GET", {"Allow": "GET, HEAD"})
