"""The live view's server side on a real Aggregator over a real Redis: server-sent events (updates,
bounded streams, ended on shutdown), the heatmap, histogram frames, Grafana node graph and alert-log
shapes, and the frame store's thinning."""

from __future__ import annotations

import gzip
import http.client
import json
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from gradwatch.aggregator.http import live as live_module
from gradwatch.aggregator.http import middleware
from gradwatch.aggregator.http.live import FrameStore, LiveHub
from gradwatch.aggregator.http.server import serve
from gradwatch.aggregator.http.views import alert_log
from gradwatch.aggregator.runstate import RunView


@pytest.fixture
def live(make_aggregator, build, publish, run_all, redis_client):
    """Run "demo" (two steps, a NaN in fc1's weight at step 1) on an aggregator whose HTTP port has a fast
    live hub; yields (base URL, aggregator, server, publish-and-apply)."""
    publish.registration(build.registration())
    for step in range(2):
        r = build.report(step, grad={"fc2": 7.0}, nonfinite={("fc1", "parameter"): 3} if step else None)
        r.scalars["accuracy"] = 0.5 + step / 10
        for s in r.tensors:
            s.histogram.extend([1, 0, 5, 250])
            s.histogram_offset = 38 + step
        publish.report(r)
    agg = make_aggregator()
    run_all(agg)
    server, thread = serve("127.0.0.1", 0, agg.registry, agg.view, history=agg.history, topology=agg.topology,
                           alert_log=lambda run: alert_log(redis_client, run), frames=agg.frames,
                           live_tick_s=0.05, poll_s=0.02)

    def more(report):
        publish.report(report)
        run_all(agg)

    yield f"http://127.0.0.1:{server.server_port}", agg, server, more
    server.shutdown()
    server.server_close()
    thread.join(5)


def get_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Events:
    """A server-sent-event client on a raw HTTP connection."""

    def __init__(self, base: str, query: str = ""):
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=5)
        self.conn.request("GET", f"/api/v1/events{query}")
        self.resp = self.conn.getresponse()

    def next(self, kind: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        event = None
        while time.monotonic() < deadline:
            line = self.resp.readline()
            if not line:
                raise EOFError("the stream ended")
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == kind:
                return json.loads(line[6:])
        raise AssertionError(f"no {kind} event within {timeout}s")

    def close(self) -> None:
        self.resp.close()  # the response holds the socket of an HTTP/1.0 answer
        self.conn.close()


def test_events_push_the_runs_new_steps_layers_and_alerts(live, build):
    base, _, _, more = live
    events = Events(base, "?run=demo")
    try:
        assert events.resp.status == 200 and events.resp.headers["Content-Type"] == "text/event-stream"
        assert events.next("hello")["run"] == "demo"
        runs = events.next("runs")["runs"]
        assert {r["run"]: r["firing_alerts"] for r in runs} == {"demo": 1}
        first = events.next("update")
        assert first["step"] == 1 and first["loss"] == 0.5
        assert first["layers"]["fc2"]["grad_norm"] == pytest.approx(7.0) and first["layers"]["fc1"]["nonfinite"] == 3
        assert [a["rule"] for a in first["alerts"]] == ["NonFinite"] and first["alerts"][0]["layer"] == "fc1"
        assert [s["step"] for s in first["steps"]] == [0, 1] and first["steps"][1]["scalars"] == {"accuracy": 0.6}

        more(build.report(2, grad={"fc2": 9.0}, loss=0.4))
        update = events.next("update")
        assert update["step"] == 2 and update["loss"] == 0.4
        assert update["layers"]["fc2"]["grad_norm"] == pytest.approx(9.0)
        assert "embed" not in update["layers"]  # unchanged layers are not sent again
        assert [s["step"] for s in update["steps"]] == [2] and "layers" not in update["steps"][0]
    finally:
        events.close()


def test_a_stream_opened_beside_another_gets_the_whole_run(live):
    """A page loads the run, then connects: while another page of the run keeps a stream open (nothing new to tell
    it), the new one still gets the run list and the run's whole state at the next tick, not only later changes."""
    base, _, _, _ = live
    first = Events(base, "?run=demo")
    try:
        first.next("update")
        time.sleep(0.2)  # ticks with nothing new: the first stream is up to date
        second = Events(base, "?run=demo")
        try:
            assert {r["run"] for r in second.next("runs")["runs"]} == {"demo"}
            update = second.next("update")
            assert update["step"] == 1 and update["layers"]["fc2"]["grad_norm"] == pytest.approx(7.0)
            assert [s["step"] for s in update["steps"]] == [0, 1]
        finally:
            second.close()
    finally:
        first.close()


def test_event_streams_are_bounded_and_end_on_shutdown(live):
    base, _, server, _ = live
    server.live.max_streams = 2
    streams = [Events(base, "?run=demo"), Events(base)]
    try:
        for s in streams:
            s.next("hello")
        status, doc = get_json(f"{base}/api/v1/events?run=demo")
        assert status == 503 and doc["errorType"] == "unavailable"
        streams.pop().close()  # a closed page frees its slot
        deadline = time.monotonic() + 5
        while server.live.open_streams > 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices at its next write
        reopened = Events(base, "?run=demo")
        streams.append(reopened)
        assert reopened.next("hello")["run"] == "demo"
        started = time.monotonic()
        server.shutdown()
        for s in streams:
            with pytest.raises(EOFError):
                s.next("never", timeout=5)
        assert time.monotonic() - started < 3
    finally:
        for s in streams:
            s.close()


def test_heatmap_is_a_matrix_in_forward_order(live, build):
    base, _, _, more = live
    for step in range(2, 6):
        more(build.report(step, grad={"fc2": 2.0 ** step}))
    status, doc = get_json(f"{base}/api/v1/runs/demo/heatmap")
    data = doc["data"]
    assert status == 200 and data["layers"] == ["embed", "fc1", "fc2", "head"]
    assert data["steps"] == [0, 1, 2, 3, 4, 5]
    assert data["values"][3][2] == pytest.approx(8.0) and data["values"][3][0] == pytest.approx(1.0)
    assert get_json(f"{base}/api/v1/runs/demo/heatmap?from=4")[1]["data"]["steps"] == [4, 5]
    assert get_json(f"{base}/api/v1/runs/demo/heatmap?limit=2")[1]["data"]["steps"] == [4, 5]
    assert get_json(f"{base}/api/v1/runs/demo/heatmap?limit=x")[0] == 400
    assert get_json(f"{base}/api/v1/runs/nope/heatmap")[0] == 404


def test_histogram_frames_of_one_tensor(live):
    base, _, _, _ = live
    status, doc = get_json(f"{base}/api/v1/runs/demo/histograms?tensor=fc2.weight.grad&kind=gradient")
    frames = doc["data"]["frames"]
    assert status == 200 and [f["step"] for f in frames] == [0, 1]
    # [1, 0, 5, 250] from bucket 38 (38 - 40: |x| in [2^-2, 2^-1)) and one later at step 1
    assert frames[0] == {"step": 0, "offset": 38, "counts": [1, 0, 5, 250], "nonfinite": 0}
    assert frames[1]["offset"] == 39
    fc1 = get_json(f"{base}/api/v1/runs/demo/histograms?tensor=fc1.weight&kind=parameter&from=1")[1]["data"]
    assert [f["nonfinite"] for f in fc1["frames"]] == [3]
    assert get_json(f"{base}/api/v1/runs/demo/histograms?tensor=nope&kind=gradient")[1]["data"]["frames"] == []
    assert get_json(f"{base}/api/v1/runs/demo/histograms")[0] == 400


def test_nodegraph_has_grafanas_field_names(live):
    base, _, _, _ = live
    status, doc = get_json(f"{base}/api/v1/runs/demo/nodegraph")
    nodes = {n["id"]: n for n in doc["data"]["nodes"]}
    assert status == 200 and list(nodes) == ["embed", "fc1", "fc2", "head"]
    assert nodes["fc2"]["mainstat"] == pytest.approx(7.0) and nodes["fc2"]["title"] == "fc2"
    assert (nodes["fc1"]["arc__nonfinite"], nodes["fc1"]["arc__finite"]) == (1.0, 0.0)
    assert all(n["arc__finite"] + n["arc__nonfinite"] == 1.0 for n in nodes.values())
    assert "fc2.weight" in nodes["fc2"]["detail__tensors"]
    assert doc["data"]["edges"][0] == {"id": "embed->fc1", "source": "embed", "target": "fc1"}


def test_alerts_of_a_run_are_its_transitions(live, build):
    base, agg, server, more = live
    status, doc = get_json(f"{base}/api/v1/runs/demo/alerts")
    assert status == 200 and [(a["rule"], a["status"], a["layer"]) for a in doc["data"]["alerts"]] == [
        ("NonFinite", "firing", "fc1")]
    server.alert_log = None  # no alert stream to read: the firing alerts
    assert [a["rule"] for a in get_json(f"{base}/api/v1/runs/demo/alerts")[1]["data"]["alerts"]] == ["NonFinite"]


def test_steps_without_layers_and_with_scalars(live):
    base, _, _, _ = live
    steps = get_json(f"{base}/api/v1/runs/demo/steps?layers=0")[1]["data"]["steps"]
    assert [s["scalars"] for s in steps] == [{"accuracy": 0.5}, {"accuracy": 0.6}]
    assert all("layers" not in s for s in steps)


def test_large_json_is_gzipped_when_the_client_takes_it(live, monkeypatch):
    base, _, _, _ = live
    monkeypatch.setattr(middleware, "GZIP_MIN_BYTES", 100)
    req = urllib.request.Request(f"{base}/api/v1/runs/demo/topology", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert json.loads(gzip.decompress(resp.read()))["data"]["nodes"][0]["id"] == "embed"
    assert get_json(f"{base}/api/v1/runs/demo/topology")[0] == 200  # and plain without Accept-Encoding


def test_frame_store_thins_long_runs_and_keeps_the_newest():
    store = FrameStore(budget=64 * 4, max_frames=64)
    tensors = {1: [None] * 4}  # four summaries a frame: 64 frames fit
    for step in range(1000):
        store.add("run", step, tensors)
    steps = [s for s, _ in store.get("run")]
    assert steps[0] == 0 and steps[-1] == 999  # the whole run, first and newest step
    assert 32 <= len(steps) <= 65
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1], strict=True)}
    assert len(gaps) == 1  # evenly spread
    store.add("run", 500, tensors)  # a redelivery: no frame out of order
    assert [s for s, _ in store.get("run")][-1] == 999
    store.add("other", 0, {1: [None] * 4})
    store.forget("run")
    assert store.get("run") == [] and store.runs() == {"other"}


def test_an_update_is_bounded_and_the_changes_it_left_out_follow(live, build, monkeypatch):
    """At most MAX_UPDATE_LAYERS changed layers go in one update (a large model's changes take several ticks),
    marked `more_layers`; the rest come with the next tick although the step did not move."""
    base, _, _, more = live
    monkeypatch.setattr(live_module, "MAX_UPDATE_LAYERS", 3)
    events = Events(base, "?run=demo")
    try:
        first = events.next("update")
        assert len(first["layers"]) == 3 and first["more_layers"] is True
        rest = events.next("update")
        assert rest["step"] == first["step"] and set(rest["layers"]) == {"head"} and "more_layers" not in rest
        assert rest["steps"] == []  # the step's rows went with the first
        more(build.report(2, grad={"fc2": 9.0}))
        update = events.next("update")
        assert "fc2" in update["layers"] and "embed" not in update["layers"]  # only what changed
        assert [s["step"] for s in update["steps"]] == [2]
    finally:
        events.close()


def test_a_multi_rank_step_closing_after_its_first_report_is_news():
    """A multi-rank run's step moves with its first rank's report; its per-layer figures and history row come
    when the join closes the step, a tick later: that is an update too."""
    rows: list[dict] = []
    hub = LiveHub(lambda: None, history=lambda run, first, last, limit: [r for r in rows if first is None
                                                                        or r["step"] >= first])

    def view(grad: float, joined: int | None) -> RunView:
        return RunView("r", 5, 1.0, None, 1e-3, 1.0, None, 0.0, (("fc1", grad, 2.0, ()),), world_size=2,
                       joined=SimpleNamespace(step=joined) if joined is not None else None)

    row = {"step": 4, "time": 0.0, "phase": "train", "loss": 1.0, "grad_norm": 1.0, "scalars": {}}
    rows.append(row)
    assert [s["step"] for s in hub._update(view(1.0, 4), [])["steps"]] == [4]
    assert hub._update(view(1.0, 4), []) is None  # nothing new
    rows.append({**row, "step": 5})
    update = hub._update(view(3.0, 5), [])  # step 5 joined: same step, new figures and row
    assert [s["step"] for s in update["steps"]] == [5] and update["layers"]["fc1"]["grad_norm"] == 3.0
