"""Every statistic the agents send, per tensor, and the valid ranges users mark on a run's metrics.

    GET    /api/v1/runs/{run}/tensors[?kind=&layer=&q=&histograms=1&limit=&offset=]  the latest step's tensors,
                                 merged over ranks: count, NaN/Inf, zero fraction, mean, std, min, max, norm
    GET    /api/v1/runs/{run}/optimizer[?layer=&q=&limit=&offset=]  per parameter: optimizer state norms, the update
                                 (the effective step size: |Δw| histogram, ‖Δw‖/‖w‖), Adam's estimate without it
    GET    /api/v1/runs/{run}/ranges  the run's valid ranges
    POST   /api/v1/runs/{run}/ranges  {"metric": "loss", "min": 0, "max": 10}: sets one (the API token)
    DELETE /api/v1/runs/{run}/ranges?metric=  removes one (the API token)

and, for the routes of others: `histogram_matrix` answers /histograms?matrix=1 (live_routes.py), `mark_steps`
adds `out_of_range` to /steps rows (api.py). The figures are aggregator/tensorstats.py's, the ranges
aggregator/ranges.py's; they live in the Redis of the snapshot keys, the aggregator's (Backend.snapshots).
"""

from __future__ import annotations

import json
import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gradwatch.aggregator import tensorstats
from gradwatch.aggregator.http.paging import matching, next_link, pages
from gradwatch.aggregator.http.responses import backend, error, int_arg, ok, query, run_of, unknown
from gradwatch.aggregator.http.views import num
from gradwatch.aggregator.ingest.client import REDIS_ERRORS
from gradwatch.aggregator.ranges import MAX_RANGES, RangeStore, make_range, mark
from gradwatch.aggregator.runstate import RunView

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_BODY_BYTES = 4096


def tensors(request: Request) -> Response:
    found, args = _run(request), query(request)
    if found is None:
        return unknown(run_of(request))
    kinds = _csv(args, "kind")
    wrong = sorted(k for k in kinds or () if k not in tensorstats.KIND_BY_NAME)
    if wrong:
        return error(400, "bad_data", f"kind: {', '.join(wrong)} unknown; one of {', '.join(tensorstats.KIND_BY_NAME)}")
    wanted = {tensorstats.KIND_BY_NAME[k] for k in kinds} if kinds else None
    with_histograms = args.get("histograms", ["0"])[-1] not in ("0", "false")  # off unless asked for
    rows = _search(tensorstats.tensor_rows(found.tensors, wanted, _csv(args, "layer"), with_histograms), "name", args)
    return _page(request, {"step": _step(found)}, "tensors", rows)


def optimizer(request: Request) -> Response:
    found, args = _run(request), query(request)
    if found is None:
        return unknown(run_of(request))
    rows = _search(tensorstats.optimizer_rows(found.tensors, found.learning_rate, _csv(args, "layer")), "parameter",
                   args)
    head = {"step": _step(found), "learning_rate": num(found.learning_rate),
            "updates": bool(found.tensors.get(tensorstats.UPDATE))}
    return _page(request, head, "parameters", rows)


def histogram_matrix(request: Request, run: str, tensor: str, kind: str, first: int | None) -> Response:
    """/histograms?tensor=&kind=&matrix=1[&columns=][&from=]: the frames as one steps x buckets matrix."""
    sources, args = backend(request), query(request)
    if kind not in tensorstats.KIND_BY_NAME:
        return error(400, "bad_data", f"kind: one of {', '.join(tensorstats.KIND_BY_NAME)}")
    try:
        columns = int_arg(args, "columns")
    except ValueError as e:
        return error(400, "bad_data", str(e))
    columns = tensorstats.MAX_COLUMNS if columns is None else max(1, min(columns, tensorstats.MAX_COLUMNS))
    frames = sources.live.frame_store.get(run) if sources.live is not None else []
    doc = tensorstats.histogram_matrix(frames, tensor, tensorstats.KIND_BY_NAME[kind], first, columns)
    doc["zero_fraction"] = [num(v) for v in doc["zero_fraction"]]
    doc["nonfinite_fraction"] = [num(v) for v in doc["nonfinite_fraction"]]
    return ok(doc)


def mark_steps(request: Request, run: str, rows: list[dict]) -> None:
    """Adds `out_of_range` to /steps rows when the run has ranges (values still floats: before num())."""
    sources, store = backend(request), _store(request)
    if store is None or not rows:
        return
    try:
        ranges = store.all(run)
    except REDIS_ERRORS as e:  # the steps are worth answering without their marks
        sources.errors.log(logging.WARNING, "ranges", "cannot read the ranges of %s: %s", run, e)
        return
    mark(rows, ranges)


# -- ranges ------------------------------------------------------------------------------------------------------


def list_ranges(request: Request) -> Response:
    run, store = run_of(request), _store(request)
    if store is None:
        return error(404, "not_found", "ranges are not served by this aggregator")
    if not _known(request, run):
        return unknown(run)
    try:
        ranges = store.all(run)
    except REDIS_ERRORS as e:
        return error(503, "unavailable", f"cannot read the ranges from Redis: {e}", {"Retry-After": "1"})
    return ok({"ranges": [r.to_dict() for r in ranges.values()]})


async def set_range(request: Request) -> Response:
    """POST: the token was checked (WriteAccess); the body is checked here, then stored (off the event loop)."""
    body = await _json_body(request)
    if isinstance(body, Response):
        return body
    if not isinstance(body, dict) or set(body) - {"metric", "min", "max"}:
        return error(400, "bad_data", 'send {"metric": name, "min": number or null, "max": number or null}')
    try:
        r = make_range(body.get("metric"), body.get("min"), body.get("max"))
    except ValueError as e:
        return error(400, "bad_data", str(e))
    return await run_in_threadpool(_store_range, request, run_of(request), r)


def _store_range(request: Request, run: str, r) -> Response:
    store = _store(request)
    if store is None:
        return error(404, "not_found", "ranges are not served by this aggregator")
    if not _known(request, run):
        return unknown(run)
    try:
        stored = store.set(run, r)
    except REDIS_ERRORS as e:
        return error(503, "unavailable", f"cannot store the range in Redis: {e}", {"Retry-After": "1"})
    if not stored:
        return error(409, "bad_data", f"run {run!r} has {MAX_RANGES} ranges already: delete one first")
    return ok({"range": r.to_dict()})


def delete_range(request: Request) -> Response:
    run, store, metric = run_of(request), _store(request), query(request).get("metric", [""])[-1]
    if store is None:
        return error(404, "not_found", "ranges are not served by this aggregator")
    if not metric:
        return error(400, "bad_data", "metric: the name of the range to remove is required (?metric=loss)")
    try:
        gone = store.delete(run, metric)
    except REDIS_ERRORS as e:
        return error(503, "unavailable", f"cannot remove the range in Redis: {e}", {"Retry-After": "1"})
    if not gone:
        return error(404, "not_found", f"run {run!r} has no range for {metric!r}")
    return ok({"metric": metric, "deleted": True})


# -- helpers -----------------------------------------------------------------------------------------------------


def _run(request: Request) -> RunView | None:
    name = run_of(request)
    return next((r for r in backend(request).view().runs if r.run == name), None)


def _step(run: RunView) -> int | None:
    """The step of the run's latest summaries: a multi-rank run's latest joined step, whose merge they are."""
    if run.world_size > 1 and run.joined is not None:
        return run.joined.step
    return run.step if run.step >= 0 else None


def _store(request: Request) -> RangeStore | None:
    snapshots = backend(request).snapshots
    return RangeStore(snapshots.client) if snapshots is not None else None


def _known(request: Request, run: str) -> bool:
    """A run this replica follows, or one whose history is in Redis (another replica's, a finished one)."""
    sources = backend(request)
    if any(r.run == run for r in sources.view().runs):
        return True
    return sources.history is not None and sources.history(run, None, None, 1) is not None


def _csv(args: dict[str, list[str]], name: str) -> set[str] | None:
    """Every value of a repeatable, comma-separable argument; None when absent."""
    values = {v.strip() for given in args.get(name, ()) for v in given.split(",") if v.strip()}
    return values or None


def _search(rows: list[dict], field: str, args: dict[str, list[str]]) -> list[dict]:
    """The rows whose `field` contains ?q= (case-insensitively, as paging.matching searches layers)."""
    wanted = set(matching([row[field] for row in rows], args.get("q", [""])[-1]))
    return rows if len(wanted) == len(rows) else [row for row in rows if row[field] in wanted]


def _page(request: Request, head: dict, name: str, rows: list[dict]) -> Response:
    """One page of `rows` as the API's other lists cut theirs (paging.py), numbers spelled for JSON."""
    try:
        page = pages(query(request), DEFAULT_LIMIT, MAX_LIMIT)
    except ValueError as e:
        return error(400, "bad_data", str(e))
    shown, following = page.cut(rows)
    for row in shown:
        _numbers(row)
    return ok({**head, name: shown, "total": len(rows), "offset": page.offset, "limit": page.limit,
               "next": next_link(request, offset=following)})


def _numbers(doc: dict) -> None:
    """Floats spelled for JSON (views.num: NaN and Inf as strings), nested figures included, in place."""
    for key, v in doc.items():
        if isinstance(v, float):
            doc[key] = num(v)
        elif isinstance(v, dict):
            _numbers(v)


async def _json_body(request: Request):
    """The request's JSON body, or the error answer (as snapshots.request_one checks it)."""
    if request.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
        return error(415, "bad_data", "send a JSON body with Content-Type: application/json")
    try:
        length = int(request.headers.get("Content-Length", ""))
    except ValueError:
        return error(411, "bad_data", "Content-Length is required")
    if not 0 <= length <= MAX_BODY_BYTES:
        return error(413, "bad_data", f"body larger than {MAX_BODY_BYTES} bytes", {"Connection": "close"})
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        return error(400, "bad_data", "body is not JSON")
