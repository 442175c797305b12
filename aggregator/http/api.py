"""The query API's endpoints and Prometheus exposition: read-only answers built from the same bounded view a
scrape takes (copied under the aggregator's lock, encoded without it, on Starlette's threadpool).

    GET /metrics                 the registry, text or OpenMetrics per Accept, `name[]` filters, gzip
    GET /healthz                 200 "ok" while the process serves
    GET /api/v1/runs             every run: step, losses, learning rate, grad norm, speed, firing alerts
    GET /api/v1/runs/{run}[?limit=&offset=]  one run, plus world size, ranks, per-layer norms and non-finite
                                 counts (`layers` paged as /layers)
    GET /api/v1/runs/{run}/layers[?histograms=0&q=&limit=&offset=]  latest per-layer statistics: norms, update
                                 ratio, dead and saturated fractions, log2-magnitude histograms
    GET /api/v1/runs/{run}/inputs  latest per-input statistics (whole tensor and per channel): count, mean,
                                 std, skew, min, max, NaN and Inf counts
    GET /api/v1/runs/{run}/steps[?from=&to=&limit=&layers=0]  recent steps (the newest page first; `next`
                                 goes back with `to`): loss, grad norm, per-layer
                                 gradient norms ("layers") and parameter norms ("param_norms"); a multi-rank
                                 run's joined steps, merged over its ranks; "out_of_range" where the run has
                                 valid ranges (stats_routes.py)
    GET /api/v1/runs/{run}/ranks[?limit=&offset=&layers=0]  runs of several ranks: each rank's own part of the
                                 latest joined step (loss, gradient norm, per-layer norms of the shards it
                                 holds), unmerged
    GET /api/v1/runs/{run}/topology[?limit=&offset=&tensors=0]  the module graph (nodes with their tensors,
                                 data-flow edges leaving them)
    GET /api/v1/alerts[?run=]    firing alerts, as the gradwatch:alerts stream holds them

Lists that grow with a model's layers, steps or ranks come in pages (paging.py; sizes below): `limit`, a
cursor (`offset`, or `to` for steps) and `next`, the path of the following page or null.

The route table is app.py; the live view's routes are live_routes.py, snapshot requests snapshots.py.
"""

from __future__ import annotations

import gzip

from prometheus_client.exposition import choose_encoder, gzip_accepted
from starlette.requests import Request
from starlette.responses import Response

from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.health import layer_health, merge_histograms
from gradwatch.aggregator.http import stats_routes
from gradwatch.aggregator.http.paging import Page, matching, next_link, pages
from gradwatch.aggregator.http.responses import backend, error, flag_arg, int_arg, ok, query, run_of, unknown
from gradwatch.aggregator.http.views import input_stats, num
from gradwatch.aggregator.join import JoinedStep
from gradwatch.aggregator.merge import figures, root
from gradwatch.aggregator.runstate import RunView
from gradwatch.names import LABELS_PREFIX

# Page sizes (?limit=) of the lists that grow with a model's layers, steps and ranks: default, maximum.
LAYERS_PAGE, LAYERS_MAX = 1000, 5000          # layers (/layers, and a run's `layers`)
STEPS_PAGE, STEPS_MAX = 1000, 10_000           # steps (/steps)
STEP_CELLS = 200_000                           # ... and at most this many per-layer norms in one answer
RANKS_PAGE, RANKS_MAX = 16, 256                # ranks (/ranks)
RANK_CELLS = 100_000                           # ... and at most this many per-layer entries in one answer
NODES_PAGE, NODES_MAX = 2000, 10_000           # module graph nodes (/topology; /nodegraph in live_routes.py)


def metrics(request: Request) -> Response:
    # prometheus_client's own negotiation; its ASGI app would encode on the event loop, this runs on a thread.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    registry = backend(request).registry
    names = query(request).get("name[]")
    if names:
        registry = registry.restricted_registry(names)
    body = encoder(registry)
    headers = {}
    if gzip_accepted(request.headers.get("Accept-Encoding", "")):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return Response(body, 200, headers, media_type=content_type)


def healthz(request: Request) -> Response:
    return Response(b"ok\n", media_type="text/plain; charset=utf-8")


def runs(request: Request) -> Response:
    snap = backend(request).view()
    firing = _count_by_run(snap.firing)
    return ok({"runs": [run_summary(r, firing.get(r.run, 0)) for r in snap.runs]})


def one_run(request: Request) -> Response:
    snap, name = backend(request).view(), run_of(request)
    found = next((r for r in snap.runs if r.run == name), None)
    if found is None:
        return unknown(name)
    try:
        page = pages(query(request), LAYERS_PAGE, LAYERS_MAX)
    except ValueError as e:
        return error(400, "bad_data", str(e))
    detail = run_detail(found, [a for a in snap.firing if a.run == name])
    detail["layers_total"] = len(detail["layers"])
    detail["layers"], following = page.cut(detail["layers"])  # `layers` pages like /layers
    detail["next"] = next_link(request, offset=following)
    return ok(detail)


def layers(request: Request) -> Response:
    name, args = run_of(request), query(request)
    found = next((r for r in backend(request).view().runs if r.run == name), None)
    if found is None:
        return unknown(name)
    try:
        page = pages(args, LAYERS_PAGE, LAYERS_MAX)
    except ValueError as e:
        return error(400, "bad_data", str(e))
    names = matching([layer for layer, *_ in found.layers], args.get("q", [""])[-1])
    shown, following = page.cut(names)
    return ok({"step": found.step, "layers": layer_detail(found, flag_arg(args, "histograms"), set(shown)),
               "total": len(names), "offset": page.offset, "limit": page.limit,
               "next": next_link(request, offset=following)})


def inputs(request: Request) -> Response:
    name = run_of(request)
    found = next((r for r in backend(request).view().runs if r.run == name), None)
    if found is None:
        return unknown(name)
    return ok({"step": found.step, "inputs": input_stats(found)})


def steps(request: Request) -> Response:
    sources, name, args = backend(request), run_of(request), query(request)
    try:
        first, last, limit = int_arg(args, "from"), int_arg(args, "to"), int_arg(args, "limit")
    except ValueError as e:
        return error(400, "bad_data", str(e))
    limit = STEPS_PAGE if limit is None else max(0, min(limit, STEPS_MAX))
    found = next((r for r in sources.view().runs if r.run == name), None) if flag_arg(args, "layers") else None
    if found is not None and found.layers:  # a row holds two norms per layer: no more rows than fit the cells
        limit = min(limit, max(1, STEP_CELLS // (2 * len(found.layers))))
    # One row more than the page: whether older rows remain (`next`).
    rows = sources.history(name, first, last, limit + 1) if sources.history else None
    if rows is None:
        return unknown(name)
    rows, older = latest_steps(rows, limit, STEP_CELLS if flag_arg(args, "layers") else None)
    stats_routes.mark_steps(request, name, rows)  # `out_of_range`, read before the values are spelled for JSON
    with_layers = flag_arg(args, "layers")  # the live view's curves need none
    for row in rows:
        row["loss"], row["grad_norm"] = num(row["loss"]), num(row["grad_norm"])
        if with_layers:
            row["layers"] = {k: num(v) for k, v in row["layers"].items()}
            row["param_norms"] = {k: num(v) for k, v in row["param_norms"].items()}
        else:
            del row["layers"], row["param_norms"]
        if "scalars" in row:
            row["scalars"] = {k: num(v) for k, v in row["scalars"].items()}
    return ok({"steps": rows, "limit": limit, "next": next_link(request, to=older)})


def latest_steps(rows: list[dict], limit: int, cells: int | None) -> tuple[list[dict], int | None]:
    """The newest `limit` of `rows` (oldest first) holding at most `cells` per-layer norms (at least one row),
    never a step's rows (training, evaluation) split over two pages; and the step before them while older
    rows remain (the next page's `to`), else None."""
    kept = rows[max(0, len(rows) - limit):] if limit else []
    if cells is not None:
        total = 0
        for i in range(len(kept) - 1, -1, -1):
            total += len(kept[i]["layers"]) + len(kept[i]["param_norms"])
            if total > cells and i < len(kept) - 1:
                kept = kept[i + 1:]
                break
    if len(kept) == len(rows) or not kept:
        return kept, None
    first = kept[0]["step"]
    if rows[len(rows) - len(kept) - 1]["step"] == first:  # the step's other row would go to the older page
        rest = [r for r in kept if r["step"] != first]
        kept = rest or rows[len(rows) - len(kept) - 1:]  # a page of that one step: both its rows
        if len(kept) == len(rows):
            return kept, None
    return kept, kept[0]["step"] - 1


def ranks(request: Request) -> Response:
    name, args = run_of(request), query(request)
    found = next((r for r in backend(request).view().runs if r.run == name), None)
    if found is None:
        return unknown(name)
    try:
        page = pages(args, RANKS_PAGE, RANKS_MAX)
    except ValueError as e:
        return error(400, "bad_data", str(e))
    with_layers = flag_arg(args, "layers")
    if with_layers:  # a rank's entry holds every layer: fewer ranks to a page on a large model
        page = Page(page.offset, max(1, min(page.limit, RANK_CELLS // max(1, len(found.layers)))))
    j = found.joined
    if j is None:
        return ok({"step": None, "ranks": [], "total": 0, "offset": page.offset, "limit": page.limit, "next": None})
    shown, following = page.cut(sorted(j.parts.items()))
    out = []
    for rank, part in shown:
        out.append({"rank": rank, "loss": num(part.loss), "grad_norm": num(part.grad_norm)})
        if with_layers:
            f = figures(part.view.by_kind) if part.view is not None else None
            out[-1]["layers"] = {layer: {"grad_norm": num(root(f.grad_sq[layer])) if layer in f.grad_sq else None,
                                         "param_norm": num(root(f.param_sq[layer])) if layer in f.param_sq else None}
                                 for layer in f.nonfinite} if f else {}
    return ok({"step": j.step, "reason": j.reason, "missing_ranks": list(j.missing), "ranks": out,
               "total": len(j.parts), "offset": page.offset, "limit": page.limit,
               "next": next_link(request, offset=following)})


def topology(request: Request) -> Response:
    sources, name, args = backend(request), run_of(request), query(request)
    try:
        page = pages(args, NODES_PAGE, NODES_MAX)
    except ValueError as e:
        return error(400, "bad_data", str(e))
    graph = sources.topology(name) if sources.topology else None
    if graph is None:
        return unknown(name)
    return ok(graph_page(request, graph, page, flag_arg(args, "tensors")))


def graph_page(request: Request, graph: dict, page: Page, tensors: bool = True) -> dict:
    """One page of a module graph: its nodes in forward order, the edges leaving them (an edge from no node
    comes with the first page), `total` nodes and `next`; `tensors=False` leaves the nodes' tensors out."""
    nodes, following = page.cut(graph["nodes"])
    ids = {n["id"] for n in nodes}
    known = {n["id"] for n in graph["nodes"]} if page.offset == 0 else None
    edges = [e for e in graph["edges"] if e["source"] in ids or (known is not None and e["source"] not in known)]
    if not tensors:
        nodes = [{k: v for k, v in n.items() if k != "tensors"} for n in nodes]
    return {**graph, "nodes": nodes, "edges": edges, "total": len(graph["nodes"]), "offset": page.offset,
            "limit": page.limit, "next": next_link(request, offset=following)}


def alerts(request: Request) -> Response:
    wanted = set(query(request).get("run", ()))
    return ok({"alerts": [a.to_dict() for a in backend(request).view().firing if not wanted or a.run in wanted]})


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
        "reports_lost": run.reports_lost,  # by the agents before delivery, as their next reports said (AgentDataLost)
        "layers": [{"layer": name, "grad_norm": num(grad), "param_norm": num(param), "nonfinite": dict(kinds)}
                   for name, grad, param, kinds in run.layers],
        "hyperparameters": {k: num(v) if isinstance(v, float) else v for k, v in run.hyperparameters.items()},
        "labels": run.labels,
        "scalars": {k: num(v) for k, v in sorted(run.scalars.items()) if not k.startswith(LABELS_PREFIX)},
        "eval_scalars": {k: num(v) for k, v in sorted(run.eval_scalars.items()) if not k.startswith(LABELS_PREFIX)},
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


def layer_detail(run: RunView, histograms: bool = True, only: set[str] | None = None) -> list[dict]:
    """Per layer, in forward order where known: norms, non-finite counts, health, exact histograms; of the
    layers in `only` when given (a page: health and histograms are derived for those alone)."""
    layers = {name for name, *_ in run.layers} if only is None else only
    health = layer_health(run.tensors, layers) if run.tensors else {}
    hists: dict[str, dict] = {}
    for layer, kind, counts, _ in merge_histograms(run.tensors, layers, 1 << 30) if run.tensors and histograms else ():
        first = next((i for i, c in enumerate(counts) if c), 0)
        last = max((i for i, c in enumerate(counts) if c), default=-1)
        hists.setdefault(layer, {})[kind] = {"offset": first, "counts": counts[first:last + 1]}
    out = []
    for name, grad, param, kinds in run.layers:
        if name not in layers:
            continue
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
