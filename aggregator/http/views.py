"""Shapes of a run for the live view, Grafana and the query API, built from a view (RunView) or (under the
aggregator's lock) a run's state: per-layer statistics, the layer x step heatmap, recent steps, the module
graph and the node graph in Grafana's field names, per-input statistics, and the run's alert transitions
from the alert stream."""

from __future__ import annotations

import itertools
import json
import math
import time
from types import MappingProxyType

from gradwatch.aggregator.alerts.record import json_number
from gradwatch.aggregator.health import layer_health
from gradwatch.aggregator.runstate import RunState, RunView
from gradwatch.names import EVAL, TRAIN, split_channel
from gradwatch.stats import summary_moments
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT
from gradwatch.v1 import report_pb2, run_pb2

ALERT_SCAN = 10_000  # alert-stream entries read for one run's transitions
# Skewness from raw moments loses about (|mean| / std)^3 ulps: past this ratio it is noise, not sent.
SKEW_MAX_MEAN_OVER_STD = 1e4


def num(x: float | None) -> float | str | None:
    """A number for JSON: None stays null, NaN and Inf are spelled as Prometheus does."""
    return None if x is None else json_number(float(x))



def history_rows(rs: RunState | None, first: int | None = None, last: int | None = None,
                 limit: int = 1000) -> list[dict] | None:
    """The run's recent steps with first <= step <= last (the latest `limit`); None for an unknown run. A
    multi-rank run's rows are its joined steps, merged over ranks (aggregator/merge.py)."""
    if rs is None:
        return None
    lo = -1 << 62 if first is None else first
    hi = 1 << 62 if last is None else last
    return rows_of([r for r in rs.history if lo <= r[0] <= hi][-limit:] if limit > 0 else [])


def rows_of(rows) -> list[dict]:
    """History rows (RunState.history's tuples, or aggregator/history.py's from Redis) as the API shapes them;
    a downsampled bucket (a 9th element: its width in steps) says so in "resolution", its values the means.
    The per-layer norms are read-only views of the row's own (a copy of 1,000 rows of a 2,000-layer model is
    about 4M entries, made under the aggregator's lock)."""
    out = []
    for row in rows:
        step, t, train, loss, norm, layers, curve, params = row[:8]
        out.append({"step": step, "time": t, "phase": TRAIN if train else EVAL, "loss": loss, "grad_norm": norm,
                    "layers": MappingProxyType(layers), "param_norms": MappingProxyType(params),
                    "scalars": dict(curve)})
        if len(row) > 8:
            out[-1]["resolution"] = row[8]
    return out


def topology(rs: RunState | None) -> dict | None:
    """The run's module graph: the agent's (nodes with their types, data-flow edges) when it sent one,
    else the layers of the tensor dictionary chained in forward order (`inferred`). Each node lists
    its tensors. None for an unknown run."""
    if rs is None:
        return None
    rank = rs.ranks[min(rs.ranks)] if rs.ranks else None
    tensors: dict[str, list[dict]] = {}
    order: dict[str, int] = {}
    for meta in (rank.dictionary or {}).values() if rank else ():
        tensors.setdefault(meta.layer, []).append({"name": meta.name, "kind": meta.kind_name,
                                                   "shape": list(meta.shape), "dtype": meta.dtype})
        order[meta.layer] = min(order.get(meta.layer, meta.order), meta.order)
    if rs.topology is not None:
        nodes = [{"id": n.module_path, "type": n.module_type, "order": order.get(n.module_path),
                  "tensors": tensors.get(n.module_path, [])} for n in rs.topology.nodes]
        edges = [{"source": e.source, "target": e.target} for e in rs.topology.edges]
        return {"inferred": False, "nodes": nodes, "edges": edges}
    chain = sorted(order, key=lambda layer: (order[layer], layer))
    nodes = [{"id": layer, "type": "", "order": order[layer], "tensors": tensors[layer]} for layer in chain]
    edges = [{"source": a, "target": b} for a, b in itertools.pairwise(chain)]
    return {"inferred": True, "nodes": nodes, "edges": edges}


def layer_stats(run: RunView) -> dict[str, dict]:
    """layer -> the numbers the page colours the graph by."""
    names = {name for name, *_ in run.layers}
    health = layer_health(run.tensors, names) if run.tensors else {}
    out = {}
    for name, grad, param, kinds in run.layers:
        h = health.get(name)
        out[name] = {"grad_norm": num(grad), "param_norm": num(param),
                     "update_ratio": num(h.update_ratio) if h and h.update_ratio is not None else None,
                     "nonfinite": sum(n for _, n in kinds)}
    return out


def layer_order(run: RunView) -> dict[str, int]:
    """layer -> forward position, from the tensor dictionary entries of the latest training report's summaries
    (what topology() reads from the dictionary, without building the graph)."""
    order: dict[str, int] = {}
    for group in run.tensors.values():
        for meta, _ in group:
            if meta.order < order.get(meta.layer, 1 << 62):
                order[meta.layer] = meta.order
    return order


def heatmap_layers(run: RunView, order: dict[str, int] | None = None) -> list[str]:
    """The heatmap's rows: the layers with gradients, in forward order."""
    order = layer_order(run) if order is None else order
    return sorted({name for name, grad, *_ in run.layers if grad is not None}, key=lambda n: (order.get(n, 1 << 32), n))


def heatmap(run: RunView, rows: list[dict], order: dict[str, int], names: list[str] | None = None) -> dict:
    """Per-layer gradient norms of recent steps as one matrix: the layers with gradients (or `names`, a window
    of them), named once in forward order, and values[i][j] = norm of layers[j] at steps[i] (None where the
    step had none)."""
    names = heatmap_layers(run, order) if names is None else names
    return {"layers": names, "steps": [r["step"] for r in rows],
            "values": [[num(r["layers"].get(n)) for n in names] for r in rows]}


def input_stats(run: RunView) -> list[dict]:
    """Every input tensor of the latest training report (whole, then per channel), in report order: count,
    nan, inf, and over the finite values min, max, mean, std (population) and skew (None without a third
    moment, or where std is 0 or too small beside the mean for the raw moments to tell)."""
    out = []
    for meta, s in run.tensors.get(run_pb2.TENSOR_KIND_INPUT, ()):
        name, channel = split_channel(meta.name)
        mean, std, skew = mean_std_skew(s)
        out.append({"name": name, "channel": channel, "count": s.count, "mean": num(mean), "std": num(std),
                    "skew": num(skew), "min": num(s.min), "max": num(s.max), "nan": s.nan_count, "inf": s.inf_count})
    return out


def mean_std_skew(s: report_pb2.TensorSummary) -> tuple[float | None, float | None, float | None]:
    """(mean, std, skew) of a summary's finite values from its raw moments; None where undefined."""
    n, mean, var = summary_moments(s)
    if n <= 0:
        return None, None, None
    std = math.sqrt(var)
    if not s.HasField("sum_cubes") or std == 0 or not abs(mean) <= SKEW_MAX_MEAN_OVER_STD * std:
        return mean, std, None
    return mean, std, (s.sum_cubes / n - 3 * mean * var - mean ** 3) / (var * std)


def nodegraph(graph: dict, run: RunView) -> dict:
    """The topology in the field names of Grafana's node graph panel (nodes: id, title, subtitle,
    mainstat, secondarystat, arc__*, detail__*; edges: id, source, target)."""
    stats = layer_stats(run)
    nodes = []
    for n in graph["nodes"]:
        s = stats.get(n["id"], {})
        bad = 1.0 if s.get("nonfinite") else 0.0
        grad = s.get("grad_norm")
        nodes.append({"id": n["id"], "title": n["id"], "subtitle": n.get("type") or "",
                      "mainstat": grad if isinstance(grad, float) else None,
                      "secondarystat": s.get("update_ratio") if isinstance(s.get("update_ratio"), float) else None,
                      "arc__finite": 1.0 - bad, "arc__nonfinite": bad,
                      "detail__tensors": ", ".join(t["name"] for t in n.get("tensors", ()))})
    edges = [{"id": f"{e['source']}->{e['target']}", "source": e["source"], "target": e["target"]}
             for e in graph["edges"]]
    return {"nodes": nodes, "edges": edges}


def alert_log(client, run: str, limit: int = 500) -> list[dict]:
    """The run's alert transitions (firing and resolved), oldest first, from the newest ALERT_SCAN
    entries of the gradwatch:alerts stream."""
    out: list[dict] = []
    last = "+"
    scanned = 0
    started = time.monotonic()
    while scanned < ALERT_SCAN and len(out) < limit and time.monotonic() - started < 2.0:
        entries = client.xrevrange(ALERTS_KEY, max=last, min="-", count=1000)
        if not entries:
            break
        for _, fields in entries:
            raw = fields.get(FIELD_ALERT) or fields.get(FIELD_ALERT.decode())
            try:
                alert = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if isinstance(alert, dict) and alert.get("run") == run:
                out.append(alert)
        scanned += len(entries)
        last_id = entries[-1][0]
        last = "(" + (last_id.decode() if isinstance(last_id, bytes) else last_id)
    return out[:limit][::-1]
