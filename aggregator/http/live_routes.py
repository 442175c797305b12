"""The live view's endpoints: the page and its files under /ui/, server-sent events at /api/v1/events, and the
run shapes the page and Grafana read.

    GET /, /ui                     redirect to /ui/
    GET /ui/[file]                 the page (aggregator/http/ui), ETag and gzip
    GET /api/v1/events[?run=]      text/event-stream: `runs` (the run list when it changes), `update`
                                   (the run's new step, loss, changed per-layer stats, new steps, firing
                                   alerts when they change), `resync` (events were lost: fetch again)
    GET /api/v1/runs/{run}/heatmap[?limit=&from=&to=&q=&layer_limit=&layer_offset=]  per-layer gradient norms
                                   of recent steps as a matrix, for a window of the layers (`next`: the
                                   following window)
    GET /api/v1/runs/{run}/histograms?tensor=&kind=[&from=&limit=]  a tensor's log2 histograms over time
                                   (&matrix=1[&columns=]: as one steps x buckets matrix, stats_routes.py)
    GET /api/v1/runs/{run}/nodegraph[?limit=&offset=]  the topology in Grafana node-graph field names
    GET /api/v1/runs/{run}/alerts                the run's alert transitions, oldest first
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from gradwatch.aggregator.http import stats_routes
from gradwatch.aggregator.http.api import NODES_MAX, NODES_PAGE, graph_page
from gradwatch.aggregator.http.events import EventStream, sse
from gradwatch.aggregator.http.live import LiveHub
from gradwatch.aggregator.http.paging import matching, next_link, pages
from gradwatch.aggregator.http.responses import backend, error, int_arg, ok, query, raw_path, run_of, unknown
from gradwatch.aggregator.http.static import StaticFiles
from gradwatch.aggregator.http.views import heatmap as heatmap_of
from gradwatch.aggregator.http.views import heatmap_layers, layer_order
from gradwatch.aggregator.http.views import nodegraph as nodegraph_of
from gradwatch.names import TRAIN

HEATMAP_CELLS = 60_000  # layers x steps of one heatmap answer, at most
HEATMAP_LAYERS, HEATMAP_LAYERS_MAX = 1000, 5000  # a heatmap answer's layer window (?layer_limit=): default, maximum
FRAMES_PAGE, FRAMES_MAX = 300, 1000  # histogram frames of one answer (?limit=): default, maximum
CLIENT_CHECK_S = 1.0  # how often an idle event stream looks whether its client hung up
HEARTBEAT_S = 15.0  # an SSE comment keeps idle proxies from closing the stream
EVENT_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                 "X-Accel-Buffering": "no"}  # nginx: pass events on at once
STATIC = StaticFiles()


def to_page(request: Request) -> Response:
    return RedirectResponse("/ui/", 302, {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"})


def page_file(request: Request) -> Response:
    item = STATIC.get(request.path_params["file"])  # as sent: StaticFiles refuses escapes and dot segments
    if item is None:
        return error(404, "not_found", f"no such file: {raw_path(request)}")
    headers = {"ETag": item.etag, "Cache-Control": item.cache_control, "Vary": "Accept-Encoding",
               "X-Content-Type-Options": "nosniff"}
    if item.etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    body = item.body
    if item.gzipped is not None and "gzip" in request.headers.get("Accept-Encoding", ""):
        body, headers["Content-Encoding"] = item.gzipped, "gzip"
    return Response(body, 200, headers, media_type=item.content_type)


async def events(request: Request) -> Response:
    hub = backend(request).live
    run = query(request).get("run", [None])[-1] or None
    stream = hub.open(run) if hub is not None else None
    if stream is None:
        return error(503, "unavailable", "too many live-view streams are open; try again later", {"Retry-After": "5"})
    if request.method == "HEAD":  # a stream's headers, none of its events
        hub.close(stream)
        return StreamingResponse(iter(()), headers=EVENT_HEADERS)
    return StreamingResponse(_event_source(request, hub, stream), headers=EVENT_HEADERS)


async def _event_source(request: Request, hub: LiveHub, stream: EventStream) -> AsyncIterator[bytes]:
    try:
        yield b"retry: 3000\n\n" + sse("hello", {"run": stream.run, "tick_s": hub.tick_s})
        quiet_since = time.monotonic()
        while True:
            events = await stream.take(CLIENT_CHECK_S)
            if events is None:  # the server is stopping
                return
            if events:
                yield b"".join(events)
                quiet_since = time.monotonic()
            elif await request.is_disconnected():
                # Starlette watches for hang-ups only under ASGI < 2.4; a closed page must free its slot
                # now, not at the next write, whatever the server speaks.
                return
            elif time.monotonic() - quiet_since >= HEARTBEAT_S:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
    finally:  # also when the answer is cancelled because the client went away
        hub.close(stream)


def heatmap(request: Request) -> Response:
    sources, run, args = backend(request), run_of(request), query(request)
    found = next((r for r in sources.view().runs if r.run == run), None)
    if found is None:
        return unknown(run)
    try:
        limit, first, last = int_arg(args, "limit"), int_arg(args, "from"), int_arg(args, "to")
        window = pages(args, HEATMAP_LAYERS, HEATMAP_LAYERS_MAX, "layer_limit", "layer_offset")
    except ValueError as e:
        return error(400, "bad_data", str(e))
    order = layer_order(found)  # the latest report's dictionary entries: cheap; else the whole dictionary's
    if any(name not in order for name, grad, *_ in found.layers if grad is not None):
        graph = sources.topology(run) if sources.topology else None
        order = {n["id"]: n["order"] for n in graph["nodes"] if n.get("order") is not None} if graph else {}
    names = matching(heatmap_layers(found, order), args.get("q", [""])[-1])
    shown, following = window.cut(names)
    cap = max(1, HEATMAP_CELLS // max(1, len(shown)))
    limit = cap if limit is None else max(0, min(limit, cap))
    # Twice as many rows as steps wanted: evaluation rows, which the heatmap leaves out, take some.
    rows = sources.history(run, first, last, 2 * limit) if sources.history else []
    rows = [r for r in rows or () if r["phase"] == TRAIN]
    data = heatmap_of(found, rows[max(0, len(rows) - limit):] if limit else [], order, shown)
    return ok({**data, "total": len(names), "layer_offset": window.offset, "layer_limit": window.limit,
               "next": next_link(request, layer_offset=following)})


def histograms(request: Request) -> Response:
    sources, run, args = backend(request), run_of(request), query(request)
    if not any(r.run == run for r in sources.view().runs):
        return unknown(run)
    tensor, kind = args.get("tensor", [""])[-1], args.get("kind", ["gradient"])[-1]
    if not tensor:
        return error(400, "bad_data", "tensor: the name of a tensor of the run is required")
    try:
        first, limit = int_arg(args, "from"), pages(args, FRAMES_PAGE, FRAMES_MAX).limit
    except ValueError as e:
        return error(400, "bad_data", str(e))
    if args.get("matrix", ["0"])[-1] not in ("0", "false"):  # one picture: steps x log2 buckets (stats_routes.py)
        return stats_routes.histogram_matrix(request, run, tensor, kind, first)
    frames = (sources.live.frames(run, tensor, kind, first) if sources.live else None) or []
    more = len(frames) > limit  # oldest first: the next page starts after the last step of this one
    frames = frames[:limit]
    return ok({"tensor": tensor, "kind": kind, "frames": frames, "limit": limit,
               "next": next_link(request, **{"from": frames[-1]["step"] + 1 if more else None})})


def nodegraph(request: Request) -> Response:
    sources, run = backend(request), run_of(request)
    try:
        page = pages(query(request), NODES_PAGE, NODES_MAX)
    except ValueError as e:
        return error(400, "bad_data", str(e))
    found = next((r for r in sources.view().runs if r.run == run), None)
    graph = sources.topology(run) if found is not None and sources.topology else None
    if graph is None:
        return unknown(run)
    part = graph_page(request, graph, page)  # nodes and edges of the page; what Grafana reads, then the page
    return ok({**nodegraph_of(part, found), **{k: part[k] for k in ("total", "offset", "limit", "next")}})


def run_alerts(request: Request) -> Response:
    sources, run = backend(request), run_of(request)
    alerts = None
    if sources.alert_log is not None:
        try:
            alerts = sources.alert_log(run)
        except Exception as e:  # Redis away: what is firing now is still worth showing
            sources.errors.log(logging.WARNING, "alert-log", "cannot read the alert stream: %s", e)
    if alerts is None:
        alerts = [a.to_dict() for a in sources.view().firing if a.run == run]
    return ok({"alerts": alerts})
