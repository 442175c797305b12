"""Every statistic the agents send, through a real aggregator over a real Redis and its real HTTP port
(aggregator/http/stats_routes.py): per-tensor figures of every kind (NaN never 0; a multi-rank run merged over its
ranks, equal to numpy over the ranks' data put together), the optimizer's view, a tensor's histograms over steps
as a matrix, and valid ranges: stored in Redis, guarded like every write, marked in /steps, alerted by OutOfRange,
and still there after the aggregator restarts."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from gradwatch.aggregator.http.server import serve
from gradwatch.aggregator.http.snapshots import SnapshotStore
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT
from gradwatch.v1 import run_pb2
from tests.fixtures.aggregator import full_tensors, registration_of, report_of, summary_of

READ = "read-token-0123456789"
API = "api-token-0123456789"
TENSORS = full_tensors()
KINDS = {"parameter", "gradient", "update", "optimizer_state", "activation", "activation_gradient"}
NAN_TENSOR = "fc2:output.grad"


def values(step: int, rank: int, t) -> np.ndarray:
    """Deterministic data of a tensor at a step on a rank; replicated tensors are the same on every rank."""
    replicated = t.partition == run_pb2.PARTITION_REPLICATED
    rng = np.random.default_rng([step, t.id, 0 if replicated else rank])
    if t.name.endswith("exp_avg_sq"):
        return rng.uniform(1e-8, 1e-6, 64)
    scale = {run_pb2.TENSOR_KIND_UPDATE: 1e-4, run_pb2.TENSOR_KIND_GRADIENT: 1e-2}.get(t.kind, 1.0)
    x = rng.normal(0.5 * rank + 0.1 * step, scale, 64 * (rank + 1))
    if step == 2 and t.name == NAN_TENSOR and rank == 0:
        x[3] = np.nan
    return x.astype(np.float32).astype(np.float64)


def publish_run(publish, run: str, steps: range, world_size: int = 1, loss=lambda step: 0.5) -> None:
    for rank in range(world_size):
        publish.registration(registration_of(TENSORS, run, rank, world_size))
    for step in steps:
        for rank in range(world_size):
            summaries = [summary_of(t.id, values(step, rank, t)) for t in TENSORS]
            publish.report(report_of(step, summaries, run, rank, loss=loss(step), scalars={"accuracy": 0.8}))


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("[OutOfRange]\nrefresh_s = 0.05\n")  # a range set now is judged from the next report on
    return str(path)


@pytest.fixture
def start(make_aggregator, run_all, rules_file):
    """start(host, **tokens) -> (base URL, aggregator): a fresh aggregator that read what was published, served."""
    started = []

    def start_one(host: str = "127.0.0.1", **tokens):
        agg = make_aggregator(rules=rules_file, keep_firing_s=0.0)
        run_all(agg)
        server, thread = serve(host, 0, agg.registry, agg.view, history=agg.history, topology=agg.topology,
                               frames=agg.frames, snapshots=SnapshotStore(agg.client), live_tick_s=0.05, **tokens)
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}", agg

    yield start_one
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def api(publish, start):
    publish_run(publish, "full", range(3))
    publish_run(publish, "ddp", range(2), world_size=2)
    return start()


def call(url: str, method: str = "GET", body: object = None, token: str | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> dict:
    status, doc = call(url)
    assert status == 200, doc
    return doc["data"]


def number(x) -> float:
    return float(x)  # "NaN", "+Inf" as the API spells them


def test_tensors_hold_every_kind_with_numpy_figures(api):
    base, _ = api
    doc = get(f"{base}/api/v1/runs/full/tensors")
    assert doc["step"] == 2 and doc["total"] == len(TENSORS) and doc["offset"] == 0
    assert {t["kind"] for t in doc["tensors"]} == KINDS
    got = {(t["kind"], t["name"]): t for t in doc["tensors"]}
    for spec in TENSORS:
        kind = run_pb2.TensorKind.Name(spec.kind).removeprefix("TENSOR_KIND_").lower()
        row, x = got[(kind, spec.name)], values(2, 0, spec)
        finite = x[np.isfinite(x)]
        assert row["layer"] == spec.layer and row["count"] == x.size and row["nan"] == int(np.isnan(x).sum())
        assert number(row["finite_mean"]) == pytest.approx(finite.mean(), rel=1e-9, abs=1e-15)
        assert number(row["finite_std"]) == pytest.approx(finite.std(), rel=1e-7)
        assert (number(row["min"]), number(row["max"])) == (pytest.approx(finite.min()), pytest.approx(finite.max()))
        if spec.name == NAN_TENSOR:  # NaN propagates: never the finite rest's figures, never 0
            assert (row["mean"], row["std"], row["norm"]) == ("NaN", "NaN", "NaN")
        else:
            assert number(row["mean"]) == pytest.approx(x.mean(), rel=1e-9, abs=1e-15)
            assert number(row["std"]) == pytest.approx(x.std(), rel=1e-7)
            assert number(row["norm"]) == pytest.approx(np.linalg.norm(x), rel=1e-9)
        assert row["zero_fraction"] == 0.0 and "histogram" not in row


def test_tensor_filters_pages_and_errors(api):
    base, _ = api
    everything = get(f"{base}/api/v1/runs/full/tensors")["tensors"]
    assert [t["layer"] for t in everything] == ["fc1"] * 7 + ["fc2"] * 7  # forward order
    some = get(f"{base}/api/v1/runs/full/tensors?kind=activation,activation_gradient&layer=fc1&histograms=1")
    assert [(t["name"], t["kind"]) for t in some["tensors"]] == [
        ("fc1:output", "activation"), ("fc1:output.grad", "activation_gradient")]
    assert some["tensors"][0]["histogram"]["counts"] and some["total"] == 2
    page = get(f"{base}/api/v1/runs/full/tensors?limit=3&offset=3")
    assert page["tensors"] == everything[3:6] and (page["total"], page["limit"], page["offset"]) == (14, 3, 3)
    assert page["next"] == "/api/v1/runs/full/tensors?limit=3&offset=6"
    assert get(f"{base}/api/v1/runs/full/tensors?offset=13")["next"] is None
    assert [t["name"] for t in get(f"{base}/api/v1/runs/full/tensors?q=EXP_AVG_SQ")["tensors"]] == [
        "fc1.weight.exp_avg_sq", "fc2.weight.exp_avg_sq"]
    status, doc = call(f"{base}/api/v1/runs/full/tensors?kind=weights")
    assert status == 400 and "kind: weights unknown" in doc["error"]
    assert call(f"{base}/api/v1/runs/full/tensors?limit=x")[0] == 400
    assert call(f"{base}/api/v1/runs/nope/tensors")[0] == 404


def test_multi_rank_tensors_are_merged_over_ranks(api):
    """Per-rank activations add up to the global batch: numpy over both ranks' data put together; replicated
    weights count once."""
    base, _ = api
    doc = get(f"{base}/api/v1/runs/ddp/tensors?layer=fc1")
    assert doc["step"] == 1
    rows = {(t["kind"], t["name"]): t for t in doc["tensors"]}
    for kind, name in (("activation", "fc1:output"), ("activation_gradient", "fc1:output.grad")):
        spec = next(t for t in TENSORS if t.name == name)
        union = np.concatenate([values(1, rank, spec) for rank in (0, 1)])
        row = rows[(kind, name)]
        assert row["count"] == union.size
        assert number(row["mean"]) == pytest.approx(union.mean(), rel=1e-12)
        assert number(row["std"]) == pytest.approx(union.std(), rel=1e-9)
        assert number(row["norm"]) == pytest.approx(np.linalg.norm(union), rel=1e-12)
        assert number(row["min"]) == pytest.approx(union.min()) and number(row["max"]) == pytest.approx(union.max())
    weight = next(t for t in TENSORS if t.name == "fc1.weight" and t.kind == run_pb2.TENSOR_KIND_PARAMETER)
    assert rows[("parameter", "fc1.weight")]["count"] == values(1, 0, weight).size  # once, not per rank


def test_optimizer_view(api):
    base, _ = api
    doc = get(f"{base}/api/v1/runs/full/optimizer")
    assert doc["step"] == 2 and doc["updates"] is True and doc["learning_rate"] == 1e-3
    fc1, fc2 = doc["parameters"]
    assert (fc1["parameter"], fc1["layer"], fc2["parameter"]) == ("fc1.weight", "fc1", "fc2.weight")
    spec = {(t.name, t.kind): t for t in TENSORS}
    w = values(2, 0, spec[("fc1.weight", run_pb2.TENSOR_KIND_PARAMETER)])
    dw = values(2, 0, spec[("fc1.weight", run_pb2.TENSOR_KIND_UPDATE)])
    m = values(2, 0, spec[("fc1.weight.exp_avg", run_pb2.TENSOR_KIND_OPTIMIZER_STATE)])
    v = values(2, 0, spec[("fc1.weight.exp_avg_sq", run_pb2.TENSOR_KIND_OPTIMIZER_STATE)])
    assert fc1["states"]["exp_avg"]["norm"] == pytest.approx(np.linalg.norm(m))
    assert fc1["states"]["exp_avg_sq"]["norm"] == pytest.approx(np.linalg.norm(v))
    assert fc1["update"]["ratio"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(w))
    assert sum(fc1["update"]["histogram"]["counts"]) == dw.size
    assert fc1["adam_step_estimate"] == pytest.approx(1e-3 * np.sqrt(np.mean(m ** 2)) / (np.sqrt(np.mean(v)) + 1e-8))
    assert [p["parameter"] for p in get(f"{base}/api/v1/runs/full/optimizer?layer=fc2")["parameters"]] == ["fc2.weight"]


def test_histograms_over_steps_as_one_matrix(api):
    base, _ = api
    url = f"{base}/api/v1/runs/full/histograms?tensor=fc1.weight&kind=update"
    frames = get(url)["frames"]  # the animation's frames, as before
    assert [f["step"] for f in frames] == [0, 1, 2]
    matrix = get(url + "&matrix=1")
    assert (matrix["tensor"], matrix["kind"], matrix["steps"]) == ("fc1.weight", "update", [0, 1, 2])
    assert all(sum(row) == pytest.approx(1.0) for row in matrix["values"])
    assert matrix["offset"] == min(f["offset"] for f in frames)
    assert len(matrix["values"][0]) == max(f["offset"] + len(f["counts"]) for f in frames) - matrix["offset"]
    two = get(url + "&matrix=1&columns=2")
    assert (two["steps"], two["last_steps"], two["counts"]) == ([0, 2], [1, 2], [128, 64])
    assert call(f"{base}/api/v1/runs/full/histograms?tensor=x&kind=weights&matrix=1")[0] == 400
    merged = get(f"{base}/api/v1/runs/ddp/histograms?tensor=fc1:output&kind=activation&matrix=1")
    assert merged["counts"] == [64 + 128, 64 + 128]  # both ranks' micro-batches in each step's column


def alerts(client, rule: str = "OutOfRange") -> list[tuple]:
    out = []
    for _, fields in client.xrange(ALERTS_KEY):
        a = json.loads(fields[FIELD_ALERT])
        if a["rule"] == rule:
            out.append((a["run"], a["step"], a["status"], a["tensor"]))
    return out


def test_ranges_alert_mark_steps_and_survive_a_restart(publish, start, run_all, redis_client):
    publish_run(publish, "full", range(2))
    base, agg = start()
    ranges = f"{base}/api/v1/runs/full/ranges"
    assert get(ranges) == {"ranges": []}
    status, doc = call(ranges, "POST", {"metric": "loss", "min": 0, "max": 1})
    assert status == 200 and doc["data"]["range"]["metric"] == "loss"
    assert call(ranges, "POST", {"metric": "accuracy", "min": 0.5})[0] == 200
    assert [(r["metric"], r["min"], r["max"]) for r in get(ranges)["ranges"]] == [
        ("accuracy", 0.5, None), ("loss", 0.0, 1.0)]
    time.sleep(0.1)  # the rule's refresh_s

    publish_run(publish, "full", range(2, 4), loss=lambda step: 5.0 if step == 2 else 0.5)
    run_all(agg)
    assert alerts(redis_client) == [("full", 2, "firing", "loss"), ("full", 3, "resolved", "loss")]
    steps = get(f"{base}/api/v1/runs/full/steps")["steps"]
    assert [(s["step"], s["out_of_range"]) for s in steps] == [(0, []), (1, []), (2, ["loss"]), (3, [])]

    agg.stop()  # a new aggregator process: the ranges come back from Redis, for the API and the rule
    publish_run(publish, "full", range(4, 5), loss=lambda step: 9.0)
    base, agg = start()
    assert [r["metric"] for r in get(f"{base}/api/v1/runs/full/ranges")["ranges"]] == ["accuracy", "loss"]
    assert alerts(redis_client)[-1] == ("full", 4, "firing", "loss")
    status, doc = call(f"{base}/api/v1/runs/full/ranges?metric=loss", "DELETE")
    assert status == 200 and doc["data"] == {"metric": "loss", "deleted": True}
    assert call(f"{base}/api/v1/runs/full/ranges?metric=loss", "DELETE")[0] == 404
    assert [r["metric"] for r in get(f"{base}/api/v1/runs/full/ranges")["ranges"]] == ["accuracy"]


@pytest.mark.parametrize(("body", "content_type", "status", "message"), [
    (b"{not json", "application/json", 400, "body is not JSON"),
    ({"metric": "loss", "max": 1}, "text/plain", 415, "Content-Type: application/json"),
    ({"metric": "loss", "max": 1, "colour": "red"}, "application/json", 400, 'send {"metric"'),
    ([1, 2], "application/json", 400, 'send {"metric"'),
    ({"metric": "lr/0", "max": 1}, "application/json", 400, "not a user scalar"),
    ({"metric": "loss", "min": 2, "max": 1}, "application/json", 400, "min 2 is above max 1"),
    ({"metric": "loss"}, "application/json", 400, "give at least one bound"),
])
def test_bad_range_posts_are_refused(api, body, content_type, status, message):
    base, _ = api
    got, doc = call(f"{base}/api/v1/runs/full/ranges", "POST", body, content_type=content_type)
    assert got == status and message in doc["error"]


def test_ranges_of_unknown_runs_and_missing_metrics(api):
    base, _ = api
    assert call(f"{base}/api/v1/runs/nope/ranges", "POST", {"metric": "loss", "max": 1})[0] == 404
    assert call(f"{base}/api/v1/runs/nope/ranges")[0] == 404
    assert call(f"{base}/api/v1/runs/full/ranges", "DELETE")[0] == 400
    assert call(f"{base}/api/v1/runs/full/ranges?metric=loss", "DELETE")[0] == 404


def test_range_writes_need_the_api_token(publish, start):
    publish_run(publish, "full", range(1))
    body = {"metric": "loss", "max": 1}
    base, _ = start("0.0.0.0", read_token=READ)  # beyond loopback without an API token: writes are off
    for method, url in (("POST", f"{base}/api/v1/runs/full/ranges"),
                        ("DELETE", f"{base}/api/v1/runs/full/ranges?metric=loss")):
        status, doc = call(url, method, body if method == "POST" else None, token=READ)
        assert status == 403 and doc["errorType"] == "writes_disabled"
    base, _ = start("0.0.0.0", read_token=READ, api_token=API)
    ranges = f"{base}/api/v1/runs/full/ranges"
    assert call(ranges, "POST", body)[0] == 401
    assert call(ranges, "POST", body, token=READ)[1]["errorType"] == "read_only"
    assert call(ranges, "POST", body, token=API)[0] == 200
    assert call(ranges, token=READ)[0] == 200 and call(ranges)[0] == 401  # reading them is a read
    assert call(f"{ranges}?metric=loss", "DELETE", token=READ)[0] == 403
    assert call(f"{ranges}?metric=loss", "DELETE", token=API)[0] == 200


def test_multi_rank_runs_are_judged_on_the_merged_step(publish, start, run_all, redis_client):
    """The ranks' losses 0.5 and 3.5 are a step of loss 2 (their mean): out of [0, 1], inside [0, 3], one alert."""
    publish_run(publish, "ddp", range(1), world_size=2)
    base, agg = start()
    assert call(f"{base}/api/v1/runs/ddp/ranges", "POST", {"metric": "loss", "max": 1})[0] == 200
    assert call(f"{base}/api/v1/runs/ddp/ranges", "POST", {"metric": "grad_norm/fc1", "max": 3})[0] == 200
    time.sleep(0.1)
    for rank, loss in ((0, 0.5), (1, 3.5)):
        summaries = [summary_of(t.id, values(1, rank, t)) for t in TENSORS]
        publish.report(report_of(1, summaries, "ddp", rank, loss=loss))
    run_all(agg)
    assert alerts(redis_client) == [("ddp", 1, "firing", "loss")]
    (row,) = [s for s in get(f"{base}/api/v1/runs/ddp/steps")["steps"] if s["step"] == 1]
    assert row["loss"] == 2.0 and row["out_of_range"] == ["loss"]
