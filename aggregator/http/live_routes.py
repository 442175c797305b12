"""The live view's HTTP routes, mixed into the query API's handler (api.py): the page and its files
under /ui/, server-sent events at /api/v1/events, and the run shapes the page and Grafana read.

    GET /                          redirects to /ui/
    GET /ui/[file]                 the page (aggregator/http/ui), ETag and gzip
    GET /api/v1/events[?run=]      text/event-stream: `runs` (the run list when it changes), `update`
                                   (the run's new step, loss, changed per-layer stats, new steps, firing
                                   alerts when they change), `resync` (events were lost: fetch again)
    GET /api/v1/runs/{run}/heatmap[?limit=]      per-layer gradient norms of recent steps, as a matrix
    GET /api/v1/runs/{run}/histograms?tensor=&kind=[&from=]  a tensor's log2 histograms over time
    GET /api/v1/runs/{run}/nodegraph             the topology in Grafana node-graph field names
    GET /api/v1/runs/{run}/alerts                the run's alert transitions, oldest first
"""

from __future__ import annotations

import logging
import select
import socket
import time

from gradwatch.aggregator.http.live import HEARTBEAT_S, sse
from gradwatch.aggregator.http.static import StaticFiles
from gradwatch.aggregator.http.views import heatmap, nodegraph

log = logging.getLogger("gradwatch.aggregator.http.api")
LIVE_RUN_PATHS = ("/heatmap", "/histograms", "/nodegraph", "/alerts")
HEATMAP_CELLS = 60_000  # layers x steps of one heatmap answer, at most
CLIENT_CHECK_S = 1.0  # how often an idle event stream looks whether its client hung up
STATIC = StaticFiles()


class LiveRoutes:
    """Methods of the API handler; `self` also has the handler's _send, _ok, _error, _unknown, server."""

    def _redirect(self, location: str) -> None:
        self._send(302, b"", "text/plain; charset=utf-8", {"Location": location, "Cache-Control": "no-store"})

    def _ui(self, raw_path: str) -> None:
        if raw_path in ("/", "/ui"):
            self._redirect("/ui/")
            return
        item = STATIC.get(raw_path[len("/ui/"):])
        if item is None:
            self._error(404, "not_found", f"no such file: {raw_path}")
            return
        headers = {"ETag": item.etag, "Cache-Control": item.cache_control, "Vary": "Accept-Encoding",
                   "X-Content-Type-Options": "nosniff"}
        if item.etag in [t.strip() for t in self.headers.get("If-None-Match", "").split(",")]:
            self.send_response(304)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            return
        body = item.body
        if item.gzipped is not None and "gzip" in self.headers.get("Accept-Encoding", ""):
            body, headers["Content-Encoding"] = item.gzipped, "gzip"
        self._send(200, body, item.content_type, headers)

    def _events(self, query: dict[str, list[str]]) -> None:
        hub = self.server.live
        run = query.get("run", [None])[-1] or None
        stream = hub.open(run) if hub is not None else None
        if stream is None:
            self._error(503, "unavailable", "too many live-view streams are open; try again later",
                        {"Retry-After": "5"})
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")  # nginx: pass events on at once
            self.end_headers()
            if self._head:
                return
            self.wfile.write(b"retry: 3000\n\n" + sse("hello", {"run": run, "tick_s": hub.tick_s}))
            self.wfile.flush()
            quiet_since = time.monotonic()
            while True:
                events = stream.take(CLIENT_CHECK_S)
                if events is None:  # the server is stopping
                    return
                if not events and _hung_up(self.connection):
                    return  # a closed page frees its slot now, not at the next write
                if events or time.monotonic() - quiet_since >= HEARTBEAT_S:
                    self.wfile.write(b"".join(events) if events else b": keep-alive\n\n")
                    self.wfile.flush()
                    quiet_since = time.monotonic()
        except OSError:
            pass  # the page went away: its stream goes with it
        finally:
            hub.close(stream)
            self.close_connection = True

    def _live_run(self, run: str, what: str, query: dict[str, list[str]]) -> None:
        if what == "alerts":
            self._run_alerts(run)
            return
        snap = self.server.view()
        found = next((r for r in snap.runs if r.run == run), None)
        if found is None:
            self._unknown(run)
        elif what == "heatmap":
            self._heatmap(found, query)
        elif what == "histograms":
            tensor, kind = query.get("tensor", [""])[-1], query.get("kind", ["gradient"])[-1]
            if not tensor:
                self._error(400, "bad_data", "tensor: the name of a tensor of the run is required")
                return
            try:
                first = int_arg(query, "from")
            except ValueError as e:
                self._error(400, "bad_data", str(e))
                return
            frames = self.server.live.frames(run, tensor, kind, first) if self.server.live else None
            self._ok({"tensor": tensor, "kind": kind, "frames": frames or []})
        else:
            graph = self.server.topology(run) if self.server.topology else None
            if graph is None:
                self._unknown(run)
            else:
                self._ok(nodegraph(graph, found))

    def _heatmap(self, run, query: dict[str, list[str]]) -> None:
        try:
            limit, first = int_arg(query, "limit"), int_arg(query, "from")
        except ValueError as e:
            self._error(400, "bad_data", str(e))
            return
        layers = max(1, len(run.layers))
        cap = max(1, HEATMAP_CELLS // layers)
        limit = cap if limit is None else max(0, min(limit, cap))
        rows = self.server.history(run.run, first, None, limit) if self.server.history else []
        graph = self.server.topology(run.run) if self.server.topology else None
        order = {n["id"]: n["order"] for n in graph["nodes"] if n.get("order") is not None} if graph else {}
        self._ok(heatmap(run, [r for r in rows or () if r["phase"] == "train"], order))

    def _run_alerts(self, run: str) -> None:
        alerts = None
        if self.server.alert_log is not None:
            try:
                alerts = self.server.alert_log(run)
            except Exception as e:  # Redis away: what is firing now is still worth showing
                self.server.errors.log(logging.WARNING, "alert-log", "cannot read the alert stream: %s", e)
        if alerts is None:
            alerts = [a.to_dict() for a in self.server.view().firing if a.run == run]
        self._ok({"alerts": alerts})


def _hung_up(sock: socket.socket) -> bool:
    """An event-stream client sends nothing after its request: a readable socket means it closed."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and not sock.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):
        return True


def int_arg(query: dict[str, list[str]], name: str) -> int | None:
    """The last value of a query parameter as an integer; None when absent, ValueError naming it when not one."""
    values = query.get(name)
    if not values:
        return None
    try:
        return int(values[-1])
    except ValueError:
        raise ValueError(f"{name}: expected an integer, not {values[-1]!r}") from None
