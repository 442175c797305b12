"""Generic webhook push against a small real HTTP server on 127.0.0.1 that records what it receives."""

from __future__ import annotations

import json
import logging
import time

import pytest

from gradwatch.aggregator.alerts import push
from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.alerts.webhook import WebhookPusher
from gradwatch.aggregator.counters import Counters
from gradwatch.cli.redis_server import free_port
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT


@pytest.fixture
def receiver(http_receiver):
    """A webhook: records every POST with its path and headers, queued (status, headers) then 204."""
    return http_receiver(url_path="/hooks/s3cr3t-path")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(push, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def hooks():
    made = []

    def make(url, **kw):
        hook = WebhookPusher(url, Counters(), **kw)
        made.append(hook)
        return hook

    yield make
    for h in made:
        h.shutdown(2)


def alert(status="firing", layer="fc2", value=3.2e5, ends_at=None) -> Alert:
    return Alert("ExplodingGradient", status, "demo", 120, 0, layer, "", value, 590.0, "warning",
                 "Gradient norm of layer fc2 is 3.2e+05 at step 120", "2024-01-01T00:00:00.000Z", ends_at)


def test_each_transition_is_one_post_of_the_stream_json(receiver, hooks):
    hook = hooks(receiver.url, token="t0ken")
    hook.enqueue(alert())
    hook.enqueue(alert("resolved", ends_at="2024-01-01T00:01:00.000Z"))
    assert hook.force_flush(5)
    (path, headers, firing), (_, _, resolved) = receiver.posts
    assert path == "/hooks/s3cr3t-path"
    assert firing == json.loads(alert().to_json())
    assert resolved["status"] == "resolved" and resolved["ends_at"] == "2024-01-01T00:01:00.000Z"
    assert headers["Authorization"] == "Bearer t0ken"
    assert headers["Content-Type"] == "application/json"
    assert hook.counters.get("webhook_sent") == 2
    assert hook._thread.name == "gradwatch-webhook" and hook._thread.daemon


def test_no_token_no_authorization_header(receiver, hooks):
    hook = hooks(receiver.url)
    hook.enqueue(alert())
    assert hook.force_flush(5)
    ((_, headers, _),) = receiver.posts
    assert "Authorization" not in headers


def test_non_finite_values_stay_valid_json(receiver, hooks):
    hook = hooks(receiver.url)
    hook.enqueue(alert(value=float("nan")))
    assert hook.force_flush(5)
    assert receiver.bodies()[0]["value"] == "NaN"


@pytest.mark.parametrize(("statuses", "errors", "sent", "dropped"), [
    ([(503, {}), (500, {})], 2, 1, 0),             # server errors are retried
    ([(429, {"Retry-After": "0"})], 1, 1, 0),      # push-back is honoured, then retried
    ([(400, {})], 1, 0, 1),                         # client errors are not retried
    ([(503, {})] * 4, 3, 0, 1),                     # retries=2: three attempts, then given up
])
def test_retries_and_counters(receiver, hooks, statuses, errors, sent, dropped):
    receiver.statuses = list(statuses)
    hook = hooks(receiver.url, retries=2)
    hook.enqueue(alert())
    assert hook.force_flush(5)
    assert (hook.counters.get("webhook_errors"), hook.counters.get("webhook_sent"),
            hook.counters.get("webhook_dropped")) == (errors, sent, dropped)
    assert len(receiver.posts) == sent


def test_unreachable_webhook_is_counted_and_its_path_not_logged(hooks, caplog):
    url = f"http://127.0.0.1:{free_port()}/hooks/s3cr3t-path"
    hook = hooks(url, retries=1, timeout_s=1)
    with caplog.at_level(logging.WARNING, logger="gradwatch.aggregator.alerts.webhook"):
        hook.enqueue(alert())
        assert hook.force_flush(5)
    assert hook.counters.get("webhook_errors") == 2 and hook.counters.get("webhook_dropped") == 1
    assert "cannot push alerts to http://127.0.0.1:" in caplog.text and "s3cr3t" not in caplog.text


def test_queue_is_bounded_and_drops_the_oldest(receiver, hooks):
    receiver.release.clear()  # the receiver hangs: the first POST stays in flight
    hook = hooks(receiver.url, queue_size=3)
    hook.enqueue(alert(layer="first"))
    deadline = time.monotonic() + 5
    while hook._inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(5):
        hook.enqueue(alert(layer=f"l{i}"))
    assert hook.counters.get("webhook_dropped") == 2
    receiver.release.set()
    assert hook.force_flush(5)
    assert [b["layer"] for b in receiver.bodies()] == ["first", "l2", "l3", "l4"]


def test_shutdown_posts_what_is_queued_and_is_idempotent(receiver, hooks):
    hook = hooks(receiver.url)
    hook.enqueue(alert())
    hook.shutdown(2)
    hook.shutdown(2)
    assert not hook._thread.is_alive()
    assert len(receiver.posts) == 1


def test_shutdown_interrupts_the_backoff(receiver, hooks, monkeypatch):
    monkeypatch.setattr(push, "BACKOFF_BASE_S", 5.0)
    receiver.statuses = [(503, {})] * 10
    hook = hooks(receiver.url, retries=5)
    hook.enqueue(alert())
    deadline = time.monotonic() + 5
    while hook.counters.get("webhook_errors") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    hook.shutdown(5)
    assert time.monotonic() - started < 2 and not hook._thread.is_alive()
    assert hook.counters.get("webhook_dropped") == 1


def test_aggregator_posts_what_it_writes_to_the_alert_stream(receiver, make_aggregator, build, publish, run_all,
                                                             redis_client):
    publish.registration(build.registration())
    publish.report(build.report(0, nonfinite={("fc1", "parameter"): 1}))
    agg = make_aggregator(webhook_url=receiver.url, webhook_token="t0ken")
    run_all(agg)
    assert agg.sink.force_flush(5)
    ((_, headers, body),) = receiver.posts
    ((_, fields),) = redis_client.xrange(ALERTS_KEY)
    assert body == json.loads(fields[FIELD_ALERT]) and body["rule"] == "NonFinite"
    assert headers["Authorization"] == "Bearer t0ken"
    assert agg.registry.get_sample_value("gradwatch_aggregator_webhook_sent_total") == 1
    assert agg.registry.get_sample_value("gradwatch_aggregator_webhook_errors_total") == 0
    assert agg.registry.get_sample_value("gradwatch_aggregator_webhook_dropped_total") == 0
