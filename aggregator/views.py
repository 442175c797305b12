"""Shapes of a run for the live view and Grafana, built from a snapshot: per-layer statistics, the layer x
step heatmap, the node graph in Grafana's field names, and the run's alert transitions from the alert
stream."""

from __future__ import annotations

import json
import time

from gradwatch.aggregator.alert import json_number
from gradwatch.aggregator.health import layer_health
from gradwatch.aggregator.state import RunSnapshot

ALERT_SCAN = 10_000  # alert-stream entries read for one run's transitions


def _num(x: float | None) -> float | str | None:
    return None if x is None else json_number(float(x))


def layer_stats(run: RunSnapshot) -> dict[str, dict]:
    """layer -> the numbers the page colours the graph by."""
    names = {name for name, *_ in run.layers}
    health = layer_health(run.tensors, names) if run.tensors else {}
    out = {}
    for name, grad, param, kinds in run.layers:
        h = health.get(name)
        out[name] = {"grad_norm": _num(grad), "param_norm": _num(param),
                     "update_ratio": _num(h.update_ratio) if h and h.update_ratio is not None else None,
                     "nonfinite": sum(n for _, n in kinds)}
    return out


def heatmap(run: RunSnapshot, rows: list[dict], order: dict[str, int]) -> dict:
    """Per-layer gradient norms of recent steps as one matrix: the layers with gradients, named once in
    forward order, and values[i][j] = norm of layers[j] at steps[i] (None where the step had none)."""
    names = sorted({name for name, grad, *_ in run.layers if grad is not None},
                   key=lambda n: (order.get(n, 1 << 32), n))
    return {"layers": names, "steps": [r["step"] for r in rows],
            "values": [[_num(r["layers"].get(n)) for n in names] for r in rows]}


def nodegraph(graph: dict, run: RunSnapshot) -> dict:
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
    from gradwatch.collector.streams import ALERTS_KEY, FIELD_ALERT

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
