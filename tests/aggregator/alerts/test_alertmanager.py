"""Alertmanager push against a small real HTTP server that records what it receives."""

from __future__ import annotations

import time

import pytest

from gradwatch.aggregator.alerts import push
from gradwatch.aggregator.alerts.alertmanager import AlertmanagerPusher
from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.counters import Counters
from gradwatch.cli.redis_server import free_port


@pytest.fixture
def fake_am(http_receiver):
    """Alertmanager's v2 API: records POST /api/v2/alerts bodies, queued statuses then 200."""
    return http_receiver(path="/api/v2/alerts", ok=200)


def alerts(fake) -> list[dict]:
    return [a for body in fake.bodies() for a in body]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(push, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def pushers():
    made = []

    def make(url, **kw):
        pusher = AlertmanagerPusher(url, Counters(), generator_url="http://agg:4772/metrics", **kw)
        made.append(pusher)
        return pusher

    yield make
    for p in made:
        p.shutdown(2)


def alert(status="firing", layer="fc2", ends_at=None) -> Alert:
    return Alert("ExplodingGradient", status, "demo", 120, 0, layer, "", 3.2e5, 590.0, "warning",
                 "Gradient norm of layer fc2 is 3.2e+05 at step 120", "2024-01-01T00:00:00.000Z", ends_at)


def test_firing_then_resolved_reach_alertmanager(fake_am, pushers):
    pusher = pushers(fake_am.url)
    pusher.enqueue(alert())
    pusher.enqueue(alert("resolved", ends_at="2024-01-01T00:01:00.000Z"))
    assert pusher.force_flush(5)
    firing, resolved = alerts(fake_am)
    assert firing == {
        "labels": {"alertname": "ExplodingGradient", "run": "demo", "severity": "warning", "layer": "fc2",
                   "rank": "0"},
        "annotations": {"summary": "Gradient norm of layer fc2 is 3.2e+05 at step 120", "value": "320000",
                        "threshold": "590", "step": "120"},
        "startsAt": "2024-01-01T00:00:00.000Z",
        "generatorURL": "http://agg:4772/metrics",
    }
    assert resolved["labels"] == firing["labels"] and resolved["endsAt"] == "2024-01-01T00:01:00.000Z"
    assert pusher.counters.get("alertmanager_sent") == 2


def test_server_errors_are_retried_and_counted(fake_am, pushers):
    fake_am.statuses = [503, 500]
    pusher = pushers(fake_am.url, retries=3)
    pusher.enqueue(alert())
    assert pusher.force_flush(5)
    assert len(alerts(fake_am)) == 1
    assert pusher.counters.get("alertmanager_errors") == 2
    assert pusher.counters.get("alertmanager_sent") == 1


def test_client_errors_are_not_retried(fake_am, pushers):
    fake_am.statuses = [400]
    pusher = pushers(fake_am.url, retries=3)
    pusher.enqueue(alert())
    assert pusher.force_flush(5)
    assert alerts(fake_am) == []
    assert pusher.counters.get("alertmanager_errors") == 1
    assert pusher.counters.get("alertmanager_dropped") == 1


def test_unreachable_alertmanager_is_counted(pushers):
    pusher = pushers(f"http://127.0.0.1:{free_port()}", retries=1, timeout_s=1)
    pusher.enqueue(alert())
    assert pusher.force_flush(5)
    assert pusher.counters.get("alertmanager_errors") == 2
    assert pusher.counters.get("alertmanager_dropped") == 1


def test_queue_is_bounded_and_drops_the_oldest(fake_am, pushers):
    fake_am.release.clear()  # Alertmanager hangs: the first POST stays in flight
    pusher = pushers(fake_am.url, queue_size=3)
    pusher.enqueue(alert(layer="first"))
    deadline = time.monotonic() + 5
    while pusher._inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(5):
        pusher.enqueue(alert(layer=f"l{i}"))
    assert pusher.counters.get("alertmanager_dropped") == 2
    fake_am.release.set()
    assert pusher.force_flush(5)
    assert [a["labels"]["layer"] for a in alerts(fake_am)] == ["first", "l2", "l3", "l4"]


def test_firing_alerts_are_resent_until_resolved(fake_am, pushers):
    pusher = pushers(fake_am.url, resend_s=0.1)
    pusher.enqueue(alert())
    deadline = time.monotonic() + 5
    while len(alerts(fake_am)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(alerts(fake_am)) >= 3  # the first push and re-sends, within Alertmanager's resolve_timeout
    pusher.enqueue(alert("resolved", ends_at="2024-01-01T00:01:00.000Z"))
    assert pusher.force_flush(5)
    time.sleep(0.3)
    assert "endsAt" in alerts(fake_am)[-1]


def test_shutdown_is_idempotent(fake_am, pushers):
    pusher = pushers(fake_am.url)
    pusher.enqueue(alert())
    pusher.shutdown(2)
    pusher.shutdown(2)
    assert not pusher._thread.is_alive()
    assert len(alerts(fake_am)) == 1  # what was queued was still posted


def test_aggregator_pushes_its_alerts(fake_am, make_aggregator, build, publish, run_all):
    publish.registration(build.registration())
    publish.report(build.report(0, nonfinite={("fc1", "parameter"): 1}))
    agg = make_aggregator(alertmanager_url=fake_am.url)
    run_all(agg)
    assert agg.sink.force_flush(5)
    (pushed,) = alerts(fake_am)
    assert pushed["labels"] == {"alertname": "NonFinite", "run": "demo", "severity": "critical", "layer": "fc1",
                                "rank": "0"}
    assert pushed["annotations"]["tensor"] == "fc1.weight"
    assert agg.registry.get_sample_value("gradwatch_aggregator_alertmanager_errors_total") == 0
    assert agg.registry.get_sample_value("gradwatch_aggregator_alertmanager_sent_total") == 1
