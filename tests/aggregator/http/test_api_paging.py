"""Pagination of the lists that grow with a model's layers, steps and ranks (aggregator/http/paging.py): a
default and a maximum page size, a cursor, and `next` (the following page's path, null on the last), followed
to the end by a client that knows nothing else; over a real Aggregator and Redis. Cell caps keep answers that
hold a value per layer bounded however large the model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from gradwatch.aggregator.http import api as api_module
from gradwatch.aggregator.http import live_routes
from gradwatch.aggregator.http.server import serve
from gradwatch.v1 import run_pb2

LAYERS = ["embed", "fc1", "fc2", "head"]
RANKS = 5


@pytest.fixture
def paged(make_aggregator, build, publish, run_all):
    """Run "demo" (12 training steps, an evaluation at steps 5 and 11) and run "wide" (RANKS sharded ranks, 2
    joined steps), served on an ephemeral port; yields the base URL."""
    publish.registration(build.registration())
    for step in range(12):
        r = build.report(step, grad={"fc2": float(step + 1)})
        for s in r.tensors:
            s.histogram.extend([1, 2, 3])
        publish.report(r)
        if step in (5, 11):
            publish.report(build.report(step, phase=2, seq=100 + step))
    for rank in range(RANKS):
        reg = build.registration(run="wide", rank=rank)
        reg.world_size = RANKS
        for t in reg.tensors:
            t.partition = run_pb2.PARTITION_SHARDED
        publish.registration(reg)
    for step in range(2):
        for rank in range(RANKS):
            publish.report(build.report(step, run="wide", rank=rank))
    agg = make_aggregator()
    run_all(agg)
    server, thread = serve("127.0.0.1", 0, agg.registry, agg.view, history=agg.history, topology=agg.topology,
                           frames=agg.frames, poll_s=0.02)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def follow(base: str, path: str, key: str) -> tuple[list, int]:
    """Every page's `key` items, following `next`; and how many pages it took."""
    items, pages, url = [], 0, base + path
    while url:
        status, doc = get(url)
        assert status == 200, doc
        items += doc["data"][key]
        pages += 1
        url = base + doc["data"]["next"] if doc["data"]["next"] else None
        assert pages < 50
    return items, pages


def test_layers_page_by_offset_and_search(paged):
    status, doc = get(f"{paged}/api/v1/runs/demo/layers?limit=3")
    data = doc["data"]
    assert [entry["layer"] for entry in data["layers"]] == LAYERS[:3]
    assert (data["total"], data["offset"], data["limit"]) == (4, 0, 3)
    assert data["next"] == "/api/v1/runs/demo/layers?limit=3&offset=3"
    layers, pages = follow(paged, "/api/v1/runs/demo/layers?limit=1&histograms=0", "layers")
    assert [entry["layer"] for entry in layers] == LAYERS and pages == 4
    found = get(f"{paged}/api/v1/runs/demo/layers?q=FC")[1]["data"]
    assert [entry["layer"] for entry in found["layers"]] == ["fc1", "fc2"] and found["total"] == 2
    assert get(f"{paged}/api/v1/runs/demo/layers")[1]["data"]["limit"] == api_module.LAYERS_PAGE  # the default
    assert get(f"{paged}/api/v1/runs/demo/layers?limit=99999999")[1]["data"]["limit"] == api_module.LAYERS_MAX
    status, doc = get(f"{paged}/api/v1/runs/demo/layers?offset=x")
    assert status == 400 and "offset" in doc["error"]


def test_one_runs_layers_page_too(paged):
    data = get(f"{paged}/api/v1/runs/demo?limit=2&offset=1")[1]["data"]
    assert [entry["layer"] for entry in data["layers"]] == ["fc1", "fc2"] and data["layers_total"] == 4
    assert data["next"] == "/api/v1/runs/demo?limit=2&offset=3"


def test_steps_page_backwards_from_the_newest_without_splitting_a_step(paged):
    data = get(f"{paged}/api/v1/runs/demo/steps?limit=4&layers=0")[1]["data"]
    # the newest 4 rows would be train 10, train 11, eval 11 and train 9: a page ends at a whole step
    assert [(s["step"], s["phase"]) for s in data["steps"]] == [(9, "train"), (10, "train"), (11, "train"),
                                                                (11, "eval")]
    assert data["next"] == "/api/v1/runs/demo/steps?limit=4&layers=0&to=8"
    rows, pages = follow(paged, "/api/v1/runs/demo/steps?limit=3&layers=0", "steps")
    assert sorted((s["step"], s["phase"]) for s in rows) == sorted(
        [(s, "train") for s in range(12)] + [(5, "eval"), (11, "eval")])
    assert len(rows) == 14 and pages == 5
    assert get(f"{paged}/api/v1/runs/demo/steps?limit=1000000")[1]["data"]["limit"] == api_module.STEPS_MAX


def test_steps_with_per_layer_norms_are_capped_by_cells(paged, monkeypatch):
    monkeypatch.setattr(api_module, "STEP_CELLS", 20)  # 4 layers x 2 figures: 2 rows to a page
    data = get(f"{paged}/api/v1/runs/demo/steps?from=6&to=10")[1]["data"]
    assert [s["step"] for s in data["steps"]] == [9, 10] and data["next"].endswith("to=8")
    rows, _ = follow(paged, "/api/v1/runs/demo/steps?from=6&to=10", "steps")
    assert [s["step"] for s in rows if s["phase"] == "train"] == [9, 10, 7, 8, 6]


def test_ranks_page_and_leave_out_layers(paged, monkeypatch):
    data = get(f"{paged}/api/v1/runs/wide/ranks?limit=2")[1]["data"]
    assert [r["rank"] for r in data["ranks"]] == [0, 1] and data["total"] == RANKS
    assert set(data["ranks"][0]["layers"]) == set(LAYERS)
    ranks, pages = follow(paged, "/api/v1/runs/wide/ranks?limit=2&layers=0", "ranks")
    assert [r["rank"] for r in ranks] == list(range(RANKS)) and pages == 3 and "layers" not in ranks[0]
    monkeypatch.setattr(api_module, "RANK_CELLS", 8)  # 4 layers per rank: 2 ranks to a page, whatever is asked
    assert get(f"{paged}/api/v1/runs/wide/ranks?limit=100")[1]["data"]["limit"] == 2


def test_topology_and_nodegraph_page_nodes_with_the_edges_leaving_them(paged):
    data = get(f"{paged}/api/v1/runs/demo/topology?limit=2&tensors=0")[1]["data"]
    assert [n["id"] for n in data["nodes"]] == ["embed", "fc1"] and "tensors" not in data["nodes"][0]
    assert data["edges"] == [{"source": "embed", "target": "fc1"}, {"source": "fc1", "target": "fc2"}]
    assert data["total"] == 4 and data["next"] == "/api/v1/runs/demo/topology?limit=2&tensors=0&offset=2"
    nodes, pages = follow(paged, "/api/v1/runs/demo/topology?limit=3", "nodes")
    assert [n["id"] for n in nodes] == LAYERS and pages == 2 and nodes[0]["tensors"]
    graph = get(f"{paged}/api/v1/runs/demo/nodegraph?limit=3")[1]["data"]
    assert [n["id"] for n in graph["nodes"]] == LAYERS[:3] and len(graph["edges"]) == 3
    assert graph["next"] == "/api/v1/runs/demo/nodegraph?limit=3&offset=3"


def test_heatmap_pages_layers_and_caps_cells(paged, monkeypatch):
    data = get(f"{paged}/api/v1/runs/demo/heatmap?layer_limit=2&layer_offset=1&limit=3")[1]["data"]
    assert data["layers"] == ["fc1", "fc2"] and data["steps"] == [9, 10, 11]
    assert data["values"][-1] == [pytest.approx(1.0), pytest.approx(12.0)]
    assert (data["total"], data["layer_offset"], data["layer_limit"]) == (4, 1, 2)
    assert data["next"] == "/api/v1/runs/demo/heatmap?layer_limit=2&layer_offset=3&limit=3"
    assert get(f"{paged}/api/v1/runs/demo/heatmap?q=fc2&from=10")[1]["data"] | {"values": None} == {
        "layers": ["fc2"], "steps": [10, 11], "values": None, "total": 1, "layer_offset": 0,
        "layer_limit": live_routes.HEATMAP_LAYERS, "next": None}
    assert get(f"{paged}/api/v1/runs/demo/heatmap?to=4&limit=2")[1]["data"]["steps"] == [3, 4]
    monkeypatch.setattr(live_routes, "HEATMAP_CELLS", 8)  # 4 layers: 2 steps, whatever is asked
    assert get(f"{paged}/api/v1/runs/demo/heatmap?limit=50")[1]["data"]["steps"] == [10, 11]
    status, doc = get(f"{paged}/api/v1/runs/demo/heatmap?layer_limit=many")
    assert status == 400 and "layer_limit" in doc["error"]


def test_histogram_frames_page_forward(paged):
    frames, pages = follow(paged, "/api/v1/runs/demo/histograms?tensor=fc1.weight&kind=parameter&limit=5", "frames")
    assert [f["step"] for f in frames] == list(range(12)) and pages == 3
