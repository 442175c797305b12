"""POST and GET of on-demand snapshots on a real aggregator's HTTP port over a real Redis."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from gradwatch.aggregator.http.server import serve
from gradwatch.aggregator.http.snapshots import MAX_BODY_BYTES, SnapshotStore
from gradwatch.streams import snapshot_requests_key, snapshots_key
from gradwatch.v1.snapshot_pb2 import Snapshot, SnapshotKind, SnapshotRequest

TOKEN = "s3cret"


@pytest.fixture
def api(make_aggregator, build, publish, run_all):
    publish.registration(build.registration())
    publish.report(build.report(0))
    agg = make_aggregator()
    run_all(agg)
    server, thread = serve("127.0.0.1", 0, agg.registry, agg.view, history=agg.history, topology=agg.topology,
                           snapshots=SnapshotStore(agg.client), api_token=TOKEN, poll_s=0.02)
    yield f"http://127.0.0.1:{server.server_port}", agg
    server.shutdown()
    server.server_close()
    thread.join(5)


def call(url: str, body: object = None, method: str = "GET", headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(base: str, body: object, run: str = "demo", **headers) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **headers}
    return call(f"{base}/api/v1/runs/{run}/snapshots", body, "POST", {k: v for k, v in headers.items() if v})


def test_post_queues_a_request_and_the_snapshot_is_served_when_it_arrives(api, redis_client):
    base, _ = api
    status, doc = post(base, {"kind": "weight_heatmap", "tensor": "fc1"})
    assert status == 202 and doc["data"]["status"] == "pending"
    rid = doc["data"]["id"]
    queued = [SnapshotRequest.FromString(raw) for raw in redis_client.lrange(snapshot_requests_key("demo"), 0, -1)]
    assert [(r.id, r.run_id, r.kind, r.tensor) for r in queued] == [
        (rid, "demo", SnapshotKind.SNAPSHOT_KIND_WEIGHT_HEATMAP, "fc1")]
    assert 0 < redis_client.pttl(snapshot_requests_key("demo")) <= 600_000

    status, doc = call(f"{base}/api/v1/runs/demo/snapshots/{rid}")
    assert status == 404 and "next logged step" in doc["error"]

    snap = Snapshot(request_id=rid, run_id="demo", step=4, kind=SnapshotKind.SNAPSHOT_KIND_WEIGHT_HEATMAP,
                    tensor="fc1", shape=[3, 2], maps=1, rows=1, cols=2, values=[1.5, float("nan")])
    redis_client.hset(snapshots_key("demo"), "1:fc1", snap.SerializeToString())  # as the collector does
    status, doc = call(f"{base}/api/v1/runs/demo/snapshots/{rid}")
    assert status == 200 and doc["data"]["values"] == [1.5, "NaN"]
    assert doc["data"]["kind"] == "weight_heatmap" and doc["data"]["shape"] == [3, 2] and doc["data"]["step"] == 4
    status, doc = call(f"{base}/api/v1/runs/demo/snapshots")
    assert status == 200 and [s["id"] for s in doc["data"]["snapshots"]] == [rid]
    assert "values" not in doc["data"]["snapshots"][0]


def test_requests_per_run_are_bounded(api, redis_client):
    base, _ = api
    for _ in range(20):
        assert post(base, {"kind": "projection", "tensor": "embed"})[0] == 202
    assert redis_client.llen(snapshot_requests_key("demo")) == 16


@pytest.mark.parametrize(("body", "headers", "status", "error"), [
    ({"kind": "weight_heatmap", "tensor": "fc1"}, {"Authorization": ""}, 401, "Bearer"),
    ({"kind": "weight_heatmap", "tensor": "fc1"}, {"Authorization": "Bearer wrong"}, 401, "Bearer"),
    ({"kind": "weight_heatmap", "tensor": "fc1"}, {"Content-Type": "text/plain"}, 415, "application/json"),
    (b"{" * (MAX_BODY_BYTES + 1), {}, 413, "larger than"),
    (b"not json", {}, 400, "not JSON"),
    ({"kind": "histogram", "tensor": "fc1"}, {}, 400, "kind must be one of"),
    ({"kind": "feature_maps", "tensor": ""}, {}, 400, "tensor"),
    ({"kind": "feature_maps"}, {}, 400, "tensor"),
    (["feature_maps"], {}, 400, "kind must be one of"),
])
def test_bad_posts_are_refused(api, redis_client, body, headers, status, error):
    base, _ = api
    code, doc = post(base, body, **headers)
    assert code == status and error in doc["error"]
    assert redis_client.llen(snapshot_requests_key("demo")) == 0


def test_unknown_run_and_other_paths(api):
    base, _ = api
    assert post(base, {"kind": "feature_maps", "tensor": "fc1"}, run="nope")[0] == 404
    assert call(f"{base}/api/v1/runs/demo/layers", {"x": 1}, "POST",
                {"Content-Type": "application/json"})[0] == 405
    assert call(f"{base}/api/v1/runs/demo/snapshotsx")[0] == 404
