"""The HTTP port: /metrics and the JSON query API of a real Aggregator over a real Redis, read with
urllib like any client would."""

from __future__ import annotations

import gzip
import json
import socket
import urllib.error
import urllib.request
from email.message import Message

import numpy as np
import pytest
from prometheus_client import generate_latest

from gradwatch.aggregator.http.server import ListenError, serve
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT
from gradwatch.v1 import run_pb2


@pytest.fixture
def api(make_aggregator, build, publish, run_all):
    """An aggregator that read two steps of run "demo" (the second with a NaN in fc1's weight) and one
    step of run "nanloss", served on an ephemeral port; yields (base URL, aggregator, server)."""
    publish.registration(build.registration())
    publish.report(build.report(0, grad={"fc2": 7.0}))
    publish.report(build.report(1, grad={"fc2": 7.0}, nonfinite={("fc1", "parameter"): 3}, loss=0.25))
    publish.report(build.report(5, run="nanloss", loss=float("nan")))
    agg = make_aggregator()
    run_all(agg)
    server, thread = serve("127.0.0.1", 0, agg.registry, agg.view, history=agg.history, topology=agg.topology,
                           poll_s=0.02)
    yield f"http://127.0.0.1:{server.server_port}", agg, server
    server.shutdown()
    server.server_close()
    thread.join(5)


def request(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, Message, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()  # header names: any case
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get_json(url: str) -> tuple[int, dict]:
    status, headers, body = request(url)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def test_runs(api):
    base, _, _ = api
    status, doc = get_json(f"{base}/api/v1/runs")
    assert status == 200 and doc["status"] == "success"
    runs = {r["run"]: r for r in doc["data"]["runs"]}
    demo = runs["demo"]
    assert demo["step"] == 1 and demo["loss"] == 0.25 and demo["eval_loss"] is None
    assert demo["learning_rate"] == 1e-3 and demo["grad_norm"] == pytest.approx((3 + 49) ** 0.5)
    assert demo["steps_per_second"] == pytest.approx(10.0)
    assert demo["last_report_time"] == pytest.approx(1_700_000_000.1)
    assert demo["firing_alerts"] == 1
    assert runs["nanloss"]["loss"] == "NaN"  # JSON has no NaN: spelled as Prometheus does
    assert runs["nanloss"]["step"] == 5 and runs["nanloss"]["firing_alerts"] == 1


def test_one_run(api):
    base, _, _ = api
    status, doc = get_json(f"{base}/api/v1/runs/demo")
    assert status == 200
    run = doc["data"]
    assert (run["run"], run["step"], run["world_size"], run["ranks"], run["firing_alerts"]) == ("demo", 1, 1, [0], 1)
    layers = {layer["layer"]: layer for layer in run["layers"]}
    assert list(layers) == ["embed", "fc1", "fc2", "head"]
    assert layers["fc2"]["grad_norm"] == 7.0 and layers["fc2"]["param_norm"] == 10.0
    assert layers["fc1"]["nonfinite"] == {"parameter": 3, "gradient": 0, "activation": 0}
    ((alert),) = run["alerts"]
    assert (alert["rule"], alert["layer"], alert["status"]) == ("NonFinite", "fc1", "firing")


def test_unknown_run_is_a_json_404(api):
    base, _, _ = api
    status, doc = get_json(f"{base}/api/v1/runs/nope")
    assert status == 404
    assert doc["status"] == "error" and doc["errorType"] == "not_found" and "'nope'" in doc["error"]


def test_alerts_are_those_of_the_alert_stream(api, redis_client):
    base, _, _ = api
    status, doc = get_json(f"{base}/api/v1/alerts")
    # Runs are taken in no fixed order: their alerts reach the stream in either order.
    streamed = sorted((json.loads(fields[FIELD_ALERT]) for _, fields in redis_client.xrange(ALERTS_KEY)),
                      key=lambda a: a["run"])
    assert status == 200 and sorted(doc["data"]["alerts"], key=lambda a: a["run"]) == streamed
    assert [a["run"] for a in streamed] == ["demo", "nanloss"]
    (only,) = get_json(f"{base}/api/v1/alerts?run=nanloss")[1]["data"]["alerts"]
    assert only == streamed[1] and only["layer"] == "(loss)"
    assert get_json(f"{base}/api/v1/alerts?run=other")[1]["data"]["alerts"] == []


def test_healthz(api):
    base, _, _ = api
    assert request(f"{base}/healthz")[::2] == (200, b"ok\n")


@pytest.mark.parametrize("path", ["/api", "/api/v1", "/api/v1/nope", "/api/v1/runs/demo/layers/x",
                                  "/metrics/extra", "/favicon.ico"])
def test_bad_paths_are_json_404s(api, path):
    base, _, _ = api
    status, doc = get_json(base + path)
    assert status == 404 and doc["errorType"] == "not_found"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head(api, method):
    base, _, _ = api
    status, headers, body = request(f"{base}/api/v1/runs", method)
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert json.loads(body)["errorType"] == "method_not_allowed"


def test_head_has_the_headers_of_get_and_no_body(api):
    base, _, _ = api
    _, get_headers, get_body = request(f"{base}/api/v1/runs/demo")
    status, headers, body = request(f"{base}/api/v1/runs/demo", "HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str(len(get_body)) == get_headers["Content-Length"]


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_metrics_serves_the_registry(api):
    base, agg, _ = api
    status, headers, body = request(f"{base}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert families(text) == families(generate_latest(agg.registry).decode())
    assert {"gradwatch_run_step", "gradwatch_layer_grad_norm", "gradwatch_alert_firing",
            "gradwatch_aggregator_webhook_sent_total"} <= families(text)
    assert 'gradwatch_layer_grad_norm{layer="fc2",run="demo"} 7.0' in text


def test_metrics_content_negotiation_filter_and_gzip(api):
    base, _, _ = api
    _, headers, body = request(f"{base}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    _, _, body = request(f"{base}/metrics?name[]=gradwatch_run_step")
    assert families(body.decode()) == {"gradwatch_run_step"}
    _, headers, body = request(f"{base}/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and b"gradwatch_run_step" in gzip.decompress(body)


def test_a_broken_snapshot_answers_500_and_the_server_goes_on(api):
    base, agg, server = api

    def broken():
        raise RuntimeError("bug")

    server.view = broken
    status, doc = get_json(f"{base}/api/v1/runs")
    assert status == 500 and doc["errorType"] == "internal"
    server.view = agg.view
    assert get_json(f"{base}/api/v1/runs")[0] == 200


def test_taken_port_is_a_listen_error(agg_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: address in use"):
            serve("127.0.0.1", port, None, lambda: None)


def test_layers_of_a_run(api):
    base, _, _ = api
    status, doc = get_json(f"{base}/api/v1/runs/demo/layers")
    assert status == 200 and doc["data"]["step"] == 1
    layers = {entry["layer"]: entry for entry in doc["data"]["layers"]}
    assert list(layers) == ["embed", "fc1", "fc2", "head"]
    assert layers["fc2"]["grad_norm"] == pytest.approx(7.0) and layers["fc1"]["nonfinite"]["parameter"] == 3
    # Build.report's activations go negative and reach 3: neither ReLU-like nor tanh-like; no updates sent
    assert layers["fc2"]["update_ratio"] is None and layers["fc2"]["dead_fraction"] is None
    assert layers["fc2"]["histograms"] == {}
    assert layers["fc2"]["activation_mean"] == 0.0 and layers["fc2"]["activation_var"] == pytest.approx(9 / 256)
    assert get_json(f"{base}/api/v1/runs/nope/layers")[0] == 404


def test_steps_of_a_run(api):
    base, _, _ = api
    status, doc = get_json(f"{base}/api/v1/runs/demo/steps")
    steps = doc["data"]["steps"]
    assert status == 200 and [s["step"] for s in steps] == [0, 1]
    assert steps[0]["layers"]["fc2"] == pytest.approx(7.0) and steps[1]["loss"] == 0.25
    assert steps[1]["phase"] == "train" and steps[1]["time"] == pytest.approx(1_700_000_000.1)
    assert [s["step"] for s in get_json(f"{base}/api/v1/runs/demo/steps?from=1")[1]["data"]["steps"]] == [1]
    assert [s["step"] for s in get_json(f"{base}/api/v1/runs/demo/steps?to=0")[1]["data"]["steps"]] == [0]
    assert [s["step"] for s in get_json(f"{base}/api/v1/runs/demo/steps?limit=1")[1]["data"]["steps"]] == [1]
    status, doc = get_json(f"{base}/api/v1/runs/demo/steps?from=x")
    assert status == 400 and "from" in doc["error"]
    assert get_json(f"{base}/api/v1/runs/nope/steps")[0] == 404
    assert get_json(f"{base}/api/v1/runs/demo/other")[0] == 404


def test_topology_of_a_run(api, build, publish, run_all):
    base, agg, _ = api
    status, doc = get_json(f"{base}/api/v1/runs/demo/topology")
    graph = doc["data"]
    assert status == 200 and graph["inferred"] is True  # no graph from the agent: layers chained in forward order
    assert [n["id"] for n in graph["nodes"]] == ["embed", "fc1", "fc2", "head"]
    assert graph["edges"][0] == {"source": "embed", "target": "fc1"} and len(graph["edges"]) == 3
    fc1 = graph["nodes"][1]
    assert {t["kind"] for t in fc1["tensors"]} == {"parameter", "gradient", "activation"}
    assert fc1["tensors"][0]["shape"] == [16, 16] and fc1["tensors"][0]["dtype"] == "float32"

    reg = build.registration(run="graph")
    for layer, kind in (("embed", "Embedding"), ("fc1", "Linear"), ("fc2", "Linear"), ("head", "Linear")):
        reg.topology.nodes.add(module_path=layer, module_type=kind)
    reg.topology.edges.add(source="embed", target="fc1")
    reg.topology.edges.add(source="embed", target="head")  # a skip connection
    publish.registration(reg)
    run_all(agg)
    graph = get_json(f"{base}/api/v1/runs/graph/topology")[1]["data"]
    assert graph["inferred"] is False and graph["nodes"][0]["type"] == "Embedding"
    assert {"source": "embed", "target": "head"} in graph["edges"]
    assert get_json(f"{base}/api/v1/runs/nope/topology")[0] == 404


def test_run_carries_hyperparameters_labels_and_scalars(api, build, publish, run_all):
    base, agg, _ = api
    reg = build.registration(run="sweep-3")
    reg.hyperparameters["lr"].number = 0.3
    reg.hyperparameters["batch_size"].integer = 64
    reg.hyperparameters["optimizer"].text = "adamw"
    reg.hyperparameters["amp"].flag = True
    reg.labels["sweep"] = "lr-wd"
    publish.registration(reg)
    r = build.report(0, run="sweep-3")
    r.scalars["accuracy"] = 0.5
    r.scalars["labels/1"] = 9
    publish.report(r)
    run_all(agg)
    run = get_json(f"{base}/api/v1/runs/sweep-3")[1]["data"]
    assert run["hyperparameters"] == {"lr": 0.3, "batch_size": 64, "optimizer": "adamw", "amp": True}
    assert run["labels"] == {"sweep": "lr-wd"}
    assert run["scalars"] == {"accuracy": 0.5} and run["eval_scalars"] == {}


def test_inputs_of_a_run(api, build, publish, run_all):
    base, agg, _ = api
    rng = np.random.default_rng(0)
    x = np.stack([rng.exponential(2.0, 1000), np.full(1000, 3.0)], axis=1)  # skewed, and constant
    x[[5, 9], 0] = [np.nan, np.inf]
    ids = rng.integers(0, 50, 64).astype(np.float64)
    reg = build.registration(run="inp")
    for i, name in enumerate(["inputs.x", "inputs.x[0]", "inputs.x[1]", "inputs.ids"]):
        reg.tensors.add(id=100 + i, name=name, kind=run_pb2.TENSOR_KIND_INPUT, module_path="(inputs)",
                        partition=run_pb2.PARTITION_PER_RANK)
    publish.registration(reg)
    r = build.report(0, run="inp")
    for i, values in enumerate([x, x[:, 0], x[:, 1]]):
        f = values[np.isfinite(values)]
        r.tensors.add(tensor_id=100 + i, count=values.size, nan_count=int(np.isnan(values).sum()),
                      inf_count=int(np.isinf(values).sum()), sum=f.sum(), sum_squares=(f * f).sum(),
                      sum_cubes=(f * f * f).sum(), min=f.min(), max=f.max())
    r.tensors.add(tensor_id=103, count=ids.size, sum=ids.sum(), sum_squares=(ids * ids).sum(), min=ids.min(),
                  max=ids.max())  # no third moment: no skew
    publish.report(r)
    run_all(agg)
    status, doc = get_json(f"{base}/api/v1/runs/inp/inputs")
    assert status == 200 and doc["data"]["step"] == 0
    got = doc["data"]["inputs"]
    assert [(i["name"], i["channel"]) for i in got] == [("inputs.x", None), ("inputs.x", 0), ("inputs.x", 1),
                                                        ("inputs.ids", None)]
    for entry, values in zip(got, [x, x[:, 0], x[:, 1], ids], strict=True):
        f = values[np.isfinite(values)]
        assert (entry["count"], entry["nan"], entry["inf"]) == (
            values.size, int(np.isnan(values).sum()), int(np.isinf(values).sum()))
        assert entry["mean"] == pytest.approx(f.mean(), rel=1e-12)
        assert entry["std"] == pytest.approx(f.std(), rel=1e-9, abs=1e-12)
        assert (entry["min"], entry["max"]) == pytest.approx((f.min(), f.max()), rel=1e-6)
    assert got[0]["skew"] == pytest.approx(central_skew(x), rel=1e-9)
    assert got[1]["skew"] == pytest.approx(central_skew(x[:, 0]), rel=1e-9) and got[1]["skew"] > 1
    assert got[2]["std"] == 0.0 and got[2]["skew"] is None  # constant: no skew
    assert got[3]["skew"] is None  # no sum_cubes
    assert get_json(f"{base}/api/v1/runs/demo/inputs")[1]["data"]["inputs"] == []  # a run without inputs
    assert get_json(f"{base}/api/v1/runs/nope/inputs")[0] == 404


def central_skew(values: np.ndarray) -> float:
    """Population skewness of the finite values, from central moments (the API uses raw ones)."""
    f = values[np.isfinite(values)]
    return float(((f - f.mean()) ** 3).mean() / f.std() ** 3)


def test_a_sharded_run_shows_merged_layers_and_each_rank_apart(api, build, publish, run_all):
    """Two FSDP-like ranks each hold half of fc1: the API shows the whole layer (norms over both shards)
    for every joined step, and /ranks each rank's own shard."""
    base, agg, _ = api
    for rank in (0, 1):
        reg = build.registration(run="fsdp", rank=rank)
        reg.world_size = 2
        for t in reg.tensors:
            t.partition = (run_pb2.PARTITION_PER_RANK if t.kind == run_pb2.TENSOR_KIND_ACTIVATION else
                           run_pb2.PARTITION_SHARDED if t.module_path == "fc1" else run_pb2.PARTITION_REPLICATED)
        publish.registration(reg)
    for step in (0, 1):
        for rank, (g, w) in enumerate(((3.0, 5.0), (4.0, 12.0))):
            publish.report(build.report(step, run="fsdp", rank=rank, grad={"fc1": g * (step + 1)}, param={"fc1": w},
                                        loss=1.0 + rank))
    run_all(agg)
    run = get_json(f"{base}/api/v1/runs/fsdp")[1]["data"]
    layers = {entry["layer"]: entry for entry in run["layers"]}
    assert layers["fc1"]["grad_norm"] == pytest.approx(10.0) and layers["fc1"]["param_norm"] == pytest.approx(13.0)
    assert layers["fc2"]["grad_norm"] == pytest.approx(1.0)  # replicated: once, not sqrt(2)
    assert run["loss"] == pytest.approx(1.5)  # the mean over the ranks
    steps = get_json(f"{base}/api/v1/runs/fsdp/steps")[1]["data"]["steps"]
    assert [s["step"] for s in steps] == [0, 1]
    assert [s["layers"]["fc1"] for s in steps] == [pytest.approx(5.0), pytest.approx(10.0)]
    assert steps[0]["param_norms"]["fc1"] == pytest.approx(13.0)
    ranks = get_json(f"{base}/api/v1/runs/fsdp/ranks")[1]["data"]
    assert ranks["step"] == 1 and [r["rank"] for r in ranks["ranks"]] == [0, 1]
    assert [r["layers"]["fc1"]["grad_norm"] for r in ranks["ranks"]] == [pytest.approx(6.0), pytest.approx(8.0)]
    assert [r["loss"] for r in ranks["ranks"]] == [1.0, 2.0]
    assert get_json(f"{base}/api/v1/runs/demo/ranks")[1]["data"] == {"step": None, "ranks": [], "total": 0,
                                                                     "offset": 0, "limit": 16, "next": None}
    assert get_json(f"{base}/api/v1/runs/nope/ranks")[0] == 404
