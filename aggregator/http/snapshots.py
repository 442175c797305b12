"""On-demand snapshots for the live view: queue a request for a run's agents, serve what they sent back.

    POST /api/v1/runs/{run}/snapshots       {"kind": "weight_heatmap", "tensor": "conv1"} -> 202 {"id": ...}
    GET  /api/v1/runs/{run}/snapshots       the latest snapshot per (kind, tensor), without values
    GET  /api/v1/runs/{run}/snapshots/{id}  one snapshot with its values (404 while the agent has not sent it)

Both sides live in Redis, not in this process: the request list the collector pops into Export answers,
and the hash the collector fills (core/streams.py), so any aggregator replica answers for any run
and nothing here grows. POST is the API's only write: it needs the API token as "Authorization: Bearer <token>"
(access.WriteAccess; without one configured, only on a loopback-only port), always a JSON body of at most
MAX_BODY_BYTES. The GETs are reads (the read token, when one is set): they serve weights and feature maps.
"""

from __future__ import annotations

import json
import secrets
from urllib.parse import unquote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gradwatch.aggregator.alerts.record import json_number
from gradwatch.aggregator.http.responses import backend, error, ok, run_of, unknown
from gradwatch.aggregator.ingest.client import REDIS_ERRORS
from gradwatch.limits import KIND_BY_NAME, KINDS
from gradwatch.streams import (
    MAX_SNAPSHOT_REQUESTS,
    SNAPSHOT_REQUEST_TTL_MS,
    snapshot_requests_key,
    snapshots_key,
)
from gradwatch.v1.snapshot_pb2 import Snapshot, SnapshotRequest

MAX_BODY_BYTES = 4096
MAX_TENSOR_CHARS = 512
MAX_LISTED = 256  # snapshots decoded per listing


def describe(snap: Snapshot, values: bool) -> dict:
    doc = {"id": snap.request_id, "run": snap.run_id, "rank": snap.rank, "step": snap.step,
           "kind": KINDS.get(snap.kind, "unspecified"), "tensor": snap.tensor, "shape": list(snap.shape),
           "maps": snap.maps, "rows": snap.rows, "cols": snap.cols, "error": snap.error or None,
           "capture_time": snap.capture_time.ToNanoseconds() / 1e9}
    if values:
        doc["values"] = [json_number(v) for v in snap.values]
        doc["labels"] = list(snap.labels)
    return doc


class SnapshotStore:
    """The Redis side; `client` is the aggregator's (thread-safe, shared with the consumer; one Redis or a
    Redis Cluster: each call names one run's keys)."""

    def __init__(self, client):
        self.client = client

    def request(self, run: str, kind: str, tensor: str) -> str:
        rid = secrets.token_hex(8)
        req = SnapshotRequest(id=rid, run_id=run, kind=KIND_BY_NAME[kind], tensor=tensor)
        req.request_time.GetCurrentTime()
        key = snapshot_requests_key(run)
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, req.SerializeToString())
        pipe.ltrim(key, -MAX_SNAPSHOT_REQUESTS, -1)  # the newest requests win
        pipe.pexpire(key, SNAPSHOT_REQUEST_TTL_MS)
        pipe.execute()
        return rid

    def all(self, run: str) -> list[Snapshot]:
        out = []
        for raw in list(self.client.hgetall(snapshots_key(run)).values())[:MAX_LISTED]:
            try:
                out.append(Snapshot.FromString(raw))
            except Exception:  # noqa: BLE001 - the collector validated it; a garbled one is skipped
                continue
        return sorted(out, key=lambda s: s.capture_time.ToNanoseconds(), reverse=True)


def listing(request: Request) -> Response:
    return _read(request, None)


def one(request: Request) -> Response:
    return _read(request, unquote(request.path_params["id"]))


def _read(request: Request, rid: str | None) -> Response:
    store = backend(request).snapshots
    if store is None:
        return error(404, "not_found", "snapshots are not served by this aggregator")
    try:
        snaps = store.all(run_of(request))
    except REDIS_ERRORS as e:
        return error(503, "unavailable", f"cannot read snapshots from Redis: {e}", {"Retry-After": "1"})
    if rid is None:
        return ok({"snapshots": [describe(s, False) for s in snaps]})
    found = next((s for s in snaps if s.request_id == rid), None)
    if found is None:
        return error(404, "not_found", f"no snapshot {rid!r} yet: the agent captures it at its next logged step")
    return ok(describe(found, True))


async def request_one(request: Request) -> Response:
    """POST: the token was checked (WriteAccess, before this reads anything); the body is checked here, in
    the order a client fixes things, then the request is queued in Redis (off the event loop)."""
    if request.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
        # A JSON content type also keeps plain HTML forms of other sites from posting here.
        return error(415, "bad_data", "send a JSON body with Content-Type: application/json")
    try:
        length = int(request.headers.get("Content-Length", ""))
    except ValueError:
        return error(411, "bad_data", "Content-Length is required")
    if not 0 <= length <= MAX_BODY_BYTES:
        # Refused before reading a byte (Starlette's own body limit answers in plain text); the unread body
        # leaves the connection unusable, so it is closed.
        return error(413, "bad_data", f"body larger than {MAX_BODY_BYTES} bytes", {"Connection": "close"})
    try:
        body = json.loads(await request.body() or b"null")  # at most `length` bytes: h11 enforces it
    except ValueError:
        return error(400, "bad_data", "body is not JSON")
    kind = body.get("kind") if isinstance(body, dict) else None
    tensor = body.get("tensor") if isinstance(body, dict) else None
    if kind not in KIND_BY_NAME:
        return error(400, "bad_data", f"kind must be one of {', '.join(KIND_BY_NAME)}")
    if not isinstance(tensor, str) or not 0 < len(tensor) <= MAX_TENSOR_CHARS:
        return error(400, "bad_data", f"tensor: a module path or parameter name of 1-{MAX_TENSOR_CHARS} characters")
    return await run_in_threadpool(_queue, request, run_of(request), kind, tensor)


def _queue(request: Request, run: str, kind: str, tensor: str) -> Response:
    sources = backend(request)
    if not any(r.run == run for r in sources.view().runs):
        return unknown(run)
    if sources.snapshots is None:
        return error(404, "not_found", "snapshots are not served by this aggregator")
    try:
        rid = sources.snapshots.request(run, kind, tensor)
    except REDIS_ERRORS as e:
        return error(503, "unavailable", f"cannot queue the request in Redis: {e}", {"Retry-After": "1"})
    return ok({"id": rid, "run": run, "kind": kind, "tensor": tensor, "status": "pending"}, 202)
