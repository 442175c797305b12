"""The aggregator's HTTP port: Prometheus exposition at /metrics and a small read-only JSON query API,
both built from the same bounded view a scrape takes (copied under the aggregator's lock, encoded
and written without it).

    GET /metrics                 the registry, text or OpenMetrics per Accept, `name[]` filters, gzip
    GET /healthz                 200 "ok" while the process serves
    GET /api/v1/runs             every run: step, losses, learning rate, grad norm, speed, firing alerts
    GET /api/v1/runs/{run}       one run, plus world size, ranks, per-layer norms and non-finite counts
    GET /api/v1/runs/{run}/layers  latest per-layer statistics: norms, update ratio, dead and saturated
                                 fractions, log2-magnitude histograms
    GET /api/v1/runs/{run}/inputs  latest per-input statistics (whole tensor and per channel): count, mean,
                                 std, skew, min, max, NaN and Inf counts
    GET /api/v1/runs/{run}/steps[?from=&to=&limit=]  recent steps: loss, grad norm, per-layer grad norms
    GET /api/v1/runs/{run}/topology  the module graph (nodes with their tensors, data-flow edges)
    GET /api/v1/alerts[?run=]    firing alerts, as the gradwatch:alerts stream holds them
    POST /api/v1/runs/{run}/snapshots, GET .../snapshots[/{id}]: on-demand snapshots
                                 (aggregator/http/snapshots.py)
    GET /, /ui/, /api/v1/events, /api/v1/runs/{run}/{heatmap,histograms,nodegraph,alerts}: the live
                                 view and its data (aggregator/http/live_routes.py)

JSON answers use Prometheus' HTTP API envelope: {"status": "success", "data": ...} or
{"status": "error", "errorType": ..., "error": ...}. Only GET and HEAD are allowed, and POST to
/api/v1/runs/{run}/snapshots (bearer token when api_token is set).
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.counters import DedupLog
from gradwatch.aggregator.health import layer_health, merge_histograms
from gradwatch.aggregator.http.live import DEFAULT_TICK_S, FrameStore, LiveHub
from gradwatch.aggregator.http.live_routes import LIVE_RUN_PATHS, STATIC, LiveRoutes, int_arg
from gradwatch.aggregator.http.metrics import AggregatorView
from gradwatch.aggregator.http.snapshots import SnapshotRoutes, SnapshotStore
from gradwatch.aggregator.http.views import input_stats, num
from gradwatch.aggregator.join import JoinedStep
from gradwatch.aggregator.state import RunView

log = logging.getLogger("gradwatch.aggregator.http.api")
RUNS_PREFIX = "/api/v1/runs/"
# A client that opens a connection and sends nothing must not hold a thread for ever.
REQUEST_TIMEOUT_S = 10.0
GZIP_MIN_BYTES = 16 << 10


class ListenError(OSError):
    """The metrics port cannot be opened; the message is meant for the command line."""


def run_summary(run: RunView, firing: int) -> dict:
    return {
        "run": run.run,
        "step": run.step if run.step >= 0 else None,
        "loss": num(run.loss),
        "eval_loss": num(run.eval_loss),
        "learning_rate": num(run.learning_rate),
        "grad_norm": num(run.grad_norm),
        "steps_per_second": num(run.steps_per_second),
        "last_report_time": run.last_report_time,  # capture time, unix seconds
        "firing_alerts": firing,
    }


def run_detail(run: RunView, alerts: list[Alert]) -> dict:
    return {
        **run_summary(run, len(alerts)),
        "world_size": run.world_size,
        "ranks": list(run.ranks),
        "layers": [{"layer": name, "grad_norm": num(grad), "param_norm": num(param), "nonfinite": dict(kinds)}
                   for name, grad, param, kinds in run.layers],
        "hyperparameters": {k: num(v) if isinstance(v, float) else v for k, v in run.hyperparameters.items()},
        "labels": run.labels,
        "scalars": {k: num(v) for k, v in sorted(run.scalars.items()) if not k.startswith("labels/")},
        "eval_scalars": {k: num(v) for k, v in sorted(run.eval_scalars.items()) if not k.startswith("labels/")},
        "joined": joined_step(run.joined),
        "alerts": [a.to_dict() for a in alerts],
    }


def joined_step(j: JoinedStep | None) -> dict | None:
    """The latest step the cross-rank join closed (runs of several ranks), with per-rank values."""
    if j is None:
        return None
    return {"step": j.step, "reason": j.reason, "missing_ranks": list(j.missing),
            "global_grad_norm": num(j.global_grad_norm),
            "ranks": [{"rank": r, "loss": num(p.loss), "grad_norm": num(p.grad_norm)}
                      for r, p in sorted(j.parts.items())]}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never delays shutdown

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, view: Callable[[], AggregatorView],
                 history: Callable[[str, int | None, int | None, int], list[dict] | None] | None = None,
                 topology: Callable[[str], dict | None] | None = None,
                 alert_log: Callable[[str], list[dict]] | None = None, live: LiveHub | None = None,
                 snapshots: SnapshotStore | None = None, api_token: str | None = None):
        self.registry = registry
        self.snapshots = snapshots
        self.api_token = api_token
        self.view = view
        self.history = history
        self.topology = topology
        self.alert_log = alert_log  # the run's alert transitions (the alert stream), for the live view
        self.live = live
        self.errors = DedupLog(log)
        super().__init__(address, _Handler)

    def shutdown(self) -> None:
        if self.live is not None:
            self.live.stop()  # ends the event streams, whose threads would otherwise outlive the server
        super().shutdown()

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-answer is not worth a traceback on stderr.
        self.errors.log(logging.DEBUG, "connection", "HTTP connection from %s failed", client_address[0],
                        exc_info=True)


class _Handler(LiveRoutes, SnapshotRoutes, BaseHTTPRequestHandler):
    server: _Server
    server_version = "gradwatch-aggregator"
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        self._error(405, "method_not_allowed", f"{self.command} is not allowed; use GET",
                    extra={"Allow": "GET, HEAD"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def do_POST(self) -> None:
        self._head = False
        path = urlsplit(self.path).path.rstrip("/")
        run, _, what = path[len(RUNS_PREFIX):].rpartition("/")
        if not (path.startswith(RUNS_PREFIX) and what == "snapshots" and run and "/" not in run):
            self._not_allowed()
            return
        try:
            self._post_snapshot(unquote(run))
        except OSError:
            raise
        except Exception:
            self.server.errors.log(logging.ERROR, "api:post", "cannot answer POST %s", path, exc_info=True)
            self._error(500, "internal", "internal error; see the aggregator's log")

    def log_message(self, format: str, *args) -> None:
        pass  # no access log: Prometheus scrapes every few seconds

    def _serve(self, head: bool) -> None:
        self._head = head
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        try:
            if path in ("/", "/ui") or url.path.startswith("/ui/"):
                self._ui(url.path)
            elif path == "/api/v1/events":
                self._events(query)
            elif path.startswith(RUNS_PREFIX) and path.endswith(LIVE_RUN_PATHS) and path.count("/") == 5:
                run, _, what = path[len(RUNS_PREFIX):].rpartition("/")
                self._live_run(unquote(run), what, query)
            elif path == "/metrics":
                self._metrics(query)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/api/v1/runs":
                snap = self.server.view()
                firing = _count_by_run(snap.firing)
                self._ok({"runs": [run_summary(r, firing.get(r.run, 0)) for r in snap.runs]})
            elif path.startswith(RUNS_PREFIX) and "/" not in path[len(RUNS_PREFIX):]:
                self._run(unquote(path[len(RUNS_PREFIX):]))
            elif path.startswith(RUNS_PREFIX) and path.endswith(("/layers", "/inputs", "/steps", "/topology")):
                run, _, what = path[len(RUNS_PREFIX):].rpartition("/")
                if "/" in run:
                    self._error(404, "not_found", f"no such path: {url.path}")
                elif what == "layers":
                    self._layers(unquote(run), query)
                elif what == "inputs":
                    self._inputs(unquote(run))
                elif what == "topology":
                    graph = self.server.topology(unquote(run)) if self.server.topology else None
                    if graph is None:
                        self._unknown(unquote(run))
                    else:
                        self._ok(graph)
                else:
                    self._steps(unquote(run), query)
            elif path.startswith(RUNS_PREFIX) and "/snapshots" in path and path.count("/") in (5, 6):
                run, _, rest = path[len(RUNS_PREFIX):].partition("/snapshots")
                if "/" in run or (rest and not rest.startswith("/")):
                    self._error(404, "not_found", f"no such path: {url.path}")
                else:
                    self._snapshots(unquote(run), unquote(rest[1:]))
            elif path == "/api/v1/alerts":
                runs = set(query.get("run", ()))
                alerts = [a.to_dict() for a in self.server.view().firing if not runs or a.run in runs]
                self._ok({"alerts": alerts})
            else:
                self._error(404, "not_found", f"no such path: {url.path}")
        except OSError:
            raise  # the client went away mid-answer: the server's handle_error notes it quietly
        except Exception:  # a bug answers 500; the server goes on
            self.server.errors.log(logging.ERROR, f"api:{path}", "cannot answer GET %s", path, exc_info=True)
            self._error(500, "internal", "internal error; see the aggregator's log")

    def _metrics(self, query: dict[str, list[str]]) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        registry = self.server.registry
        if "name[]" in query:
            registry = registry.restricted_registry(query["name[]"])
        body = encoder(registry)
        extra = {}
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body)
            extra["Content-Encoding"] = "gzip"
        self._send(200, body, content_type, extra)

    def _run(self, run: str) -> None:
        snap = self.server.view()
        found = next((r for r in snap.runs if r.run == run), None)
        if found is None:
            self._error(404, "not_found", f"no run {run!r} (runs are forgotten after run_expiry_s without a report)")
            return
        self._ok(run_detail(found, [a for a in snap.firing if a.run == run]))

    def _layers(self, run: str, query: dict[str, list[str]]) -> None:
        snap = self.server.view()
        found = next((r for r in snap.runs if r.run == run), None)
        if found is None:
            self._unknown(run)
            return
        histograms = query.get("histograms", ["1"])[-1] not in ("0", "false")
        self._ok({"step": found.step, "layers": layer_detail(found, histograms)})

    def _inputs(self, run: str) -> None:
        snap = self.server.view()
        found = next((r for r in snap.runs if r.run == run), None)
        if found is None:
            self._unknown(run)
            return
        self._ok({"step": found.step, "inputs": input_stats(found)})

    def _steps(self, run: str, query: dict[str, list[str]]) -> None:
        try:
            first = int_arg(query, "from")
            last = int_arg(query, "to")
            limit = int_arg(query, "limit")
        except ValueError as e:
            self._error(400, "bad_data", str(e))
            return
        rows = self.server.history(run, first, last, 1000 if limit is None else max(0, limit)) \
            if self.server.history else None
        if rows is None:
            self._unknown(run)
            return
        layers = query.get("layers", ["1"])[-1] not in ("0", "false")  # the live view's curves need none
        for row in rows:
            row["loss"], row["grad_norm"] = num(row["loss"]), num(row["grad_norm"])
            if layers:
                row["layers"] = {k: num(v) for k, v in row["layers"].items()}
            else:
                del row["layers"]
            if "scalars" in row:
                row["scalars"] = {k: num(v) for k, v in row["scalars"].items()}
        self._ok({"steps": rows})

    def _unknown(self, run: str) -> None:
        self._error(404, "not_found", f"no run {run!r} (runs are forgotten after run_expiry_s without a report)")

    def _ok(self, data: dict) -> None:
        self._json(200, {"status": "success", "data": data})

    def _error(self, code: int, kind: str, message: str, extra: dict[str, str] | None = None) -> None:
        self._json(code, {"status": "error", "errorType": kind, "error": message}, extra)

    def _json(self, code: int, doc: dict, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        headers = {"Cache-Control": "no-store", **(extra or {})}
        # A 1,000-layer model's answers run to megabytes; numbers and names compress ~5x.
        if len(body) > GZIP_MIN_BYTES and gzip_accepted(self.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body, 4)
            headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        self._send(code, body, "application/json", headers)

    def _send(self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not getattr(self, "_head", False):
            self.wfile.write(body)


def layer_detail(run: RunView, histograms: bool = True) -> list[dict]:
    """Per layer, in forward order where known: norms, non-finite counts, health, exact histograms."""
    layers = {name for name, *_ in run.layers}
    health = layer_health(run.tensors, layers) if run.tensors else {}
    hists: dict[str, dict] = {}
    for layer, kind, counts, _ in merge_histograms(run.tensors, layers, 1 << 30) if run.tensors and histograms else ():
        first = next((i for i, c in enumerate(counts) if c), 0)
        last = max((i for i, c in enumerate(counts) if c), default=-1)
        hists.setdefault(layer, {})[kind] = {"offset": first, "counts": counts[first:last + 1]}
    out = []
    for name, grad, param, kinds in run.layers:
        h = health.get(name)
        out.append({"layer": name, "grad_norm": num(grad), "param_norm": num(param), "nonfinite": dict(kinds),
                    "update_ratio": num(h.update_ratio) if h else None,
                    "dead_fraction": num(h.dead_fraction) if h else None,
                    "saturated_fraction": num(h.saturated_fraction) if h else None,
                    "activation_mean": num(h.activation_mean) if h else None,
                    "activation_var": num(h.activation_var) if h else None,
                    "histograms": hists.get(name, {})})
    return out


def _count_by_run(alerts: list[Alert]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in alerts:
        counts[a.run] = counts.get(a.run, 0) + 1
    return counts


def serve(host: str, port: int, registry: CollectorRegistry, view: Callable[[], AggregatorView], *,
          history: Callable[[str, int | None, int | None, int], list[dict] | None] | None = None,
          topology: Callable[[str], dict | None] | None = None,
          alert_log: Callable[[str], list[dict]] | None = None,
          frames: FrameStore | None = None,
          snapshots: SnapshotStore | None = None, api_token: str | None = None,
          live_tick_s: float | None = DEFAULT_TICK_S,
          poll_s: float = 0.5) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Starts /metrics, the query API and the live view on daemon threads; returns (server, thread).
    Raises ListenError with a message for the command line when the port cannot be opened. shutdown()
    takes up to poll_s and ends the live view's event streams. live_tick_s None: no live hub; frames: the
    consumer's histogram frames (else the hub samples one per tick)."""
    live = LiveHub(view, history, live_tick_s, frames=frames) if live_tick_s else None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("Server", (_Server,), {"address_family": family})
        server = server_class((host, port), registry, view, history, topology, alert_log, live, snapshots,
                              api_token)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why = "address in use (another aggregator running? choose one with --metrics-listen)"
        else:
            why = e.strerror or str(e)
        raise ListenError(f"cannot listen on {host}:{port}: {why}") from e
    thread = threading.Thread(target=server.serve_forever, args=(poll_s,), name="gradwatch-http", daemon=True)
    thread.start()
    if live is not None:
        live.start()
        threading.Thread(target=STATIC.warm, name="gradwatch-ui-warm", daemon=True).start()
    return server, thread
