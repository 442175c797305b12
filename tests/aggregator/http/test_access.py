"""Who may call what on the aggregator's HTTP port (aggregator/http/access.py), on a real aggregator over a
real Redis: the read token on every read (API, event stream, /metrics), the API token on snapshot requests,
refusals counted, and a port beyond loopback without a read token never opened."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from email.message import Message

import pytest

from gradwatch.aggregator.__main__ import run
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.http.server import ListenError, serve
from gradwatch.aggregator.http.snapshots import SnapshotStore
from gradwatch.cli.redis_server import free_port
from gradwatch.settings import ConfigError
from gradwatch.streams import snapshot_requests_key

READ = "read-token-0123456789"
API = "api-token-0123456789"
SNAPSHOT = {"kind": "weight_heatmap", "tensor": "fc1"}
# Every read, and what it answers with a token: an unknown path or snapshot is refused before it is looked up.
READS = {"/api/v1/runs": 200, "/api/v1/runs/demo": 200, "/api/v1/runs/demo/layers": 200,
         "/api/v1/runs/demo/snapshots": 200, "/api/v1/runs/demo/snapshots/abc": 404, "/api/v1/alerts": 200,
         "/api/v1/events?run=demo": 200, "/metrics": 200, "/api/v1/no-such-path": 404}


@pytest.fixture
def start(make_aggregator, build, publish, run_all):
    """start(host, **serve keywords) -> base URL of a served aggregator that read run "demo" (each on its own
    registry: a port's refusals are exported in its aggregator's registry)."""
    publish.registration(build.registration())
    publish.report(build.report(0))
    started = []

    def start_one(host: str = "127.0.0.1", **tokens) -> str:
        agg = make_aggregator()
        run_all(agg)
        server, thread = serve(host, 0, agg.registry, agg.view, history=agg.history, topology=agg.topology,
                               snapshots=SnapshotStore(agg.client), live_tick_s=0.05, **tokens)
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start_one
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


def call(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, Message, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            # An event stream never ends: its first line is enough.
            content = resp.readline() if "event-stream" in resp.headers["Content-Type"] else resp.read()
            return resp.status, resp.headers, content
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def refused(base: str) -> dict[str, float]:
    """gradwatch_aggregator_http_refused_total by reason, read with the read token."""
    _, _, body = call(f"{base}/metrics", READ)
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("gradwatch_aggregator_http_refused_total{"):
            out[line.split('reason="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize(("path", "found"), READS.items())
def test_every_read_needs_the_read_token(start, path, found):
    base = start(read_token=READ, api_token=API)
    for token in (None, "wrong", READ[:-1]):
        status, headers, body = call(base + path, token)
        doc = json.loads(body)
        assert status == 401 and doc["errorType"] == "unauthorized", (path, token)
        assert "Authorization: Bearer <its read token>" in doc["error"] and READ not in doc["error"]
        assert headers["WWW-Authenticate"].startswith("Bearer")
    for token in (READ, API):  # the API token reads too
        status, _, _ = call(base + path, token)
        assert status == found, (path, token)
    assert refused(base)["unauthenticated"] == 3


def test_the_event_stream_with_the_token_streams(start):
    base = start(read_token=READ)
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/api/v1/events?run=demo", headers={"Authorization": f"Bearer {READ}"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        assert resp.readline() == b"retry: 3000\n"
        resp.close()
    finally:
        conn.close()
    status, _, _ = call(f"{base}/api/v1/events?access_token={READ}")  # never a token in the URL
    assert status == 401


@pytest.mark.parametrize("path", ["/healthz", "/ui/", "/ui/app.js", "/ui/util.js"])
def test_liveness_and_the_pages_files_stay_open(start, path):
    base = start(read_token=READ, api_token=API)
    assert call(base + path)[0] == 200
    assert refused(base)["unauthenticated"] == 0


def test_snapshot_requests_need_the_api_token(start, redis_client):
    base = start(read_token=READ, api_token=API)
    url = f"{base}/api/v1/runs/demo/snapshots"
    status, _, body = call(url, None, SNAPSHOT)
    assert status == 401 and "GRADWATCH_AGGREGATOR_API_TOKEN" in json.loads(body)["error"]
    status, _, body = call(url, READ, SNAPSHOT)
    doc = json.loads(body)
    assert status == 403 and doc["errorType"] == "read_only" and "read token cannot write" in doc["error"]
    assert redis_client.llen(snapshot_requests_key("demo")) == 0
    status, _, body = call(url, API, SNAPSHOT)
    assert status == 202 and json.loads(body)["data"]["status"] == "pending"
    assert redis_client.llen(snapshot_requests_key("demo")) == 1
    assert refused(base) == {"unauthenticated": 1, "read_only": 1, "writes_disabled": 0}


def test_beyond_loopback_without_an_api_token_snapshot_requests_are_refused(start, redis_client):
    base = start("0.0.0.0", read_token=READ)
    for token in (None, READ):
        status, _, body = call(f"{base}/api/v1/runs/demo/snapshots", token, SNAPSHOT)
        doc = json.loads(body)
        assert status == 403 and doc["errorType"] == "writes_disabled"
        assert "set GRADWATCH_AGGREGATOR_API_TOKEN" in doc["error"].replace("Set", "set")
    assert redis_client.llen(snapshot_requests_key("demo")) == 0
    assert refused(base)["writes_disabled"] == 2
    assert call(f"{base}/api/v1/runs", READ)[0] == 200


def test_the_opt_out_opens_reads_but_not_snapshot_requests(start, redis_client):
    base = start("0.0.0.0", allow_unauthenticated=True)
    assert call(f"{base}/api/v1/runs")[0] == 200
    assert call(f"{base}/api/v1/runs/demo/snapshots", None, SNAPSHOT)[0] == 403
    assert redis_client.llen(snapshot_requests_key("demo")) == 0


def test_on_loopback_without_any_token_snapshot_requests_work_as_before(start, redis_client):
    base = start()  # `gradwatch up`
    assert call(f"{base}/api/v1/runs", None)[0] == 200
    assert call(f"{base}/api/v1/runs/demo/snapshots", None, SNAPSHOT)[0] == 202
    assert redis_client.llen(snapshot_requests_key("demo")) == 1


def test_on_loopback_without_an_api_token_requests_take_what_reads_take(start, redis_client):
    base = start(read_token=READ)
    assert call(f"{base}/api/v1/runs/demo/snapshots", None, SNAPSHOT)[0] == 401
    assert call(f"{base}/api/v1/runs/demo/snapshots", READ, SNAPSHOT)[0] == 202
    assert redis_client.llen(snapshot_requests_key("demo")) == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_beyond_loopback_without_a_read_token_nothing_listens(make_aggregator, host):
    agg = make_aggregator()
    port = free_port()
    with pytest.raises(ListenError) as info:
        serve(host, port, agg.registry, agg.view, api_token=API)  # the API token alone leaves reads open
    message = str(info.value)
    assert f"refusing to listen on {host}:{port} without a read token" in message
    assert "GRADWATCH_AGGREGATOR_READ_TOKEN" in message and "GRADWATCH_AGGREGATOR_ALLOW_UNAUTHENTICATED=1" in message
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


def test_the_process_refuses_to_start_and_says_what_to_set(agg_config, capsys):
    config = AggregatorConfig(**{**agg_config.__dict__, "metrics_listen": f"0.0.0.0:{free_port()}"})
    assert run(config, threading.Event()) == 1
    assert "without a read token" in capsys.readouterr().err


def test_the_process_serves_with_its_read_token(agg_config):
    port = free_port()
    config = AggregatorConfig(**{**agg_config.__dict__, "metrics_listen": f"127.0.0.1:{port}", "read_token": READ})
    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(run(config, stop)))
    thread.start()
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if call(f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        assert call(f"{base}/metrics")[0] == 401
        assert call(f"{base}/metrics", READ)[0] == 200
    finally:
        stop.set()
        thread.join(10)
    assert result == [0]


@pytest.mark.parametrize("tokens", [{"read_token": API, "api_token": API}, {"read_token": "has space"}])
def test_bad_tokens_are_refused_at_start(tokens):
    with pytest.raises(ConfigError, match="read_token") as info:
        AggregatorConfig(**tokens).validate()
    assert API not in str(info.value)
