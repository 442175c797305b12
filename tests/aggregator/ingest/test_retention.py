"""Stream retention against a real Redis: the commit trims what the group acknowledged and nothing else, and
counts exactly what left the stream unapplied (the collector's hard cap, XAUTOCLAIM dropping trimmed entries),
which is logged, counted and alerted as StreamDataLost."""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis

from gradwatch.aggregator.ingest.leases import applied_key
from gradwatch.streams import AGGREGATOR_GROUP, ALERTS_KEY, reports_key

RUN = "kept"
KEY = reports_key(RUN)


@pytest.fixture
def redis_url(redis_7):
    """This module's Redis (every fixture built on redis_url uses it): version 7, whose XINFO STREAM has
    entries-added, emptied per test."""
    client = redis.Redis.from_url(redis_7.url)
    client.flushall()
    client.close()
    return redis_7.url


def applied(client, run: str = RUN) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(applied_key(run)).items()}


def pending(client) -> int:
    return client.xpending(KEY, AGGREGATOR_GROUP)["pending"]


def lost_alerts(client) -> list[dict]:
    alerts = (json.loads(fields[b"alert"]) for _, fields in client.xrange(ALERTS_KEY))
    return [a for a in alerts if a["rule"] == "StreamDataLost"]


def publish_steps(build, publish, first: int, n: int) -> None:
    for step in range(first, first + n):
        publish.report(build.report(step, run=RUN))


def drain(agg, rounds: int = 50) -> None:
    """run_once() until a round handles nothing."""
    for _ in range(rounds):
        if agg.run_once() == 0:
            return


def cap(client, maxlen: int) -> None:
    """What the collector's `XADD MAXLEN ~` does to a stream over its cap (exact here, to know the count)."""
    client.xtrim(KEY, maxlen=maxlen, approximate=False)


def test_applied_entries_are_trimmed_and_nothing_is_counted_lost(make_aggregator, build, publish, redis_client):
    publish.registration(build.registration(run=RUN))
    agg = make_aggregator(read_count=3)  # several commits, each with entries written after its read
    publish_steps(build, publish, 0, 10)
    for step in range(10, 30, 4):
        agg.run_once()
        publish_steps(build, publish, step, 4)
    drain(agg)
    assert agg.counters.get("reports") == 30
    assert redis_client.xlen(KEY) == 0 and pending(redis_client) == 0
    record = applied(redis_client)
    assert record["acked"] == 31 and "lost" not in record
    assert agg.counters.get("stream_lost") == 0 and lost_alerts(redis_client) == []


def test_an_entry_a_group_has_not_acknowledged_is_never_trimmed(make_aggregator, build, publish, redis_client):
    publish.registration(build.registration(run=RUN))
    publish_steps(build, publish, 0, 10)
    # another consumer group (an operator's tap) reads the first five entries and acknowledges none yet
    redis_client.xgroup_create(KEY, "tap", id="0")
    tapped = [entry_id for entry_id, _ in redis_client.xreadgroup("tap", "t", {KEY: ">"}, count=5)[0][1]]
    agg = make_aggregator()
    drain(agg)
    assert agg.counters.get("reports") == 10
    assert redis_client.xlen(KEY) == 11  # all kept: the tap's oldest pending entry is the first
    redis_client.xack(KEY, "tap", *tapped[:3])
    publish_steps(build, publish, 10, 1)
    drain(agg)
    assert redis_client.xrange(KEY, count=1)[0][0] == tapped[3]  # trimmed up to the tap's oldest pending one
    redis_client.xack(KEY, "tap", *tapped[3:])
    publish_steps(build, publish, 11, 1)
    drain(agg)
    assert redis_client.xrange(KEY, count=1)[0][0] > tapped[-1]  # the tap's next undelivered entry on
    assert redis_client.xlen(KEY) == 8  # from the tap's sixth entry on: undelivered to it, applied by us
    assert agg.counters.get("stream_lost") == 0 and "lost" not in applied(redis_client)


def test_a_backlog_trimmed_unread_is_counted_logged_and_alerted(make_aggregator, build, publish, redis_client,
                                                                caplog):
    publish.registration(build.registration(run=RUN))
    publish_steps(build, publish, 0, 5)
    agg = make_aggregator(keep_firing_s=0.3)
    drain(agg)
    publish_steps(build, publish, 5, 30)  # no aggregator reads meanwhile ...
    cap(redis_client, 10)                 # ... and the collector's hard cap trims 20 unread entries
    with caplog.at_level(logging.ERROR, logger="gradwatch.aggregator"):
        drain(agg)
    assert agg.counters.get("reports") == 15
    assert agg.counters.get("stream_lost") == 20
    assert applied(redis_client)["lost"] == 20
    assert agg.registry.get_sample_value("gradwatch_aggregator_stream_lost_total") == 20
    assert any(f"run {RUN}: 20 report-stream entries left the stream" in r.getMessage() for r in caplog.records)
    (alert,) = lost_alerts(redis_client)
    assert (alert["status"], alert["run"], alert["value"], alert["severity"], alert["layer"]) == (
        "firing", RUN, 20, "critical", "(run)")
    assert f"Run {RUN} lost 20 report-stream entries" in alert["summary"]
    assert agg.registry.get_sample_value("gradwatch_alert_firing",
                                         {"run": RUN, "rule": "StreamDataLost", "layer": "(run)"}) == 1

    publish_steps(build, publish, 35, 10)
    cap(redis_client, 4)  # six more, while the alert fires: counted, the incident goes on
    drain(agg)
    assert agg.counters.get("stream_lost") == 26 and applied(redis_client)["lost"] == 26
    assert len(lost_alerts(redis_client)) == 1
    time.sleep(0.35)
    agg.run_once()  # the discovery interval (0 in tests) resolves it after keep_firing_s without a loss
    assert [(a["status"], a["value"]) for a in lost_alerts(redis_client)] == [("firing", 20), ("resolved", 26)]


def test_pending_entries_trimmed_before_their_claim_are_lost(make_aggregator, build, publish, redis_client):
    publish.registration(build.registration(run=RUN))
    publish_steps(build, publish, 0, 4)
    redis_client.xgroup_create(KEY, AGGREGATOR_GROUP, id="0")
    redis_client.xreadgroup(AGGREGATOR_GROUP, "crashed", {KEY: ">"}, count=100)  # read, never applied
    cap(redis_client, 1)  # the cap trims four of them before any replica takes the run over
    agg = make_aggregator()
    drain(agg)
    publish_steps(build, publish, 4, 1)  # the next commit of the run counts them
    drain(agg)
    assert agg.counters.get("reports") == 2 and pending(redis_client) == 0
    assert agg.counters.get("stream_lost") == 4 and applied(redis_client)["lost"] == 4


def test_a_stream_deleted_and_made_again_is_no_loss(make_aggregator, build, publish, redis_client):
    publish.registration(build.registration(run=RUN))
    publish_steps(build, publish, 0, 5)
    agg = make_aggregator()
    drain(agg)
    redis_client.delete(KEY)
    publish_steps(build, publish, 5, 2)  # a new stream: entries-added starts again, `acked` does not
    drain(agg)
    drain(agg)
    assert agg.counters.get("reports") == 7 and agg.counters.get("stream_lost") == 0
    publish_steps(build, publish, 7, 10)
    cap(redis_client, 3)
    drain(agg)
    assert agg.counters.get("stream_lost") == 7 and applied(redis_client)["lost"] == 7  # counted from there on


def test_a_run_committed_before_the_count_existed_is_not_reported_lost(make_aggregator, build, publish,
                                                                       redis_client):
    """An aggregator upgraded mid-run: its predecessor acked and left entries without `acked`, and the old
    MAXLEN trimmed some of those."""
    publish.registration(build.registration(run=RUN))
    publish_steps(build, publish, 0, 6)
    redis_client.xgroup_create(KEY, AGGREGATOR_GROUP, id="0")
    read = redis_client.xreadgroup(AGGREGATOR_GROUP, "old", {KEY: ">"}, count=100)[0][1]
    redis_client.xack(KEY, AGGREGATOR_GROUP, *[entry_id for entry_id, _ in read])
    redis_client.hset(applied_key(RUN), mapping={"reports": 6, "summaries": 72, "high:0": 6, "start:0": int(1.7e18)})
    cap(redis_client, 2)
    agg = make_aggregator()
    publish_steps(build, publish, 6, 3)
    drain(agg)
    assert agg.counters.get("reports") == 3 and agg.counters.get("stream_lost") == 0
    assert redis_client.xlen(KEY) == 0 and "lost" not in applied(redis_client)
    publish_steps(build, publish, 9, 5)
    cap(redis_client, 1)
    drain(agg)
    assert agg.counters.get("stream_lost") == 4 and applied(redis_client)["lost"] == 4


@pytest.fixture
def user_without_xtrim(redis_client, redis_url):
    """A Redis user with every command but XTRIM and XINFO (the ACL of an older deploy/redis/users.acl)."""
    redis_client.execute_command("ACL", "SETUSER", "noxtrim", "on", "nopass", "~*", "&*", "+@all", "-xtrim", "-xinfo")
    yield redis_url.replace("redis://", "redis://noxtrim:x@")
    redis_client.execute_command("ACL", "DELUSER", "noxtrim")


def test_a_user_that_may_not_trim_still_commits_and_says_so(make_aggregator, build, publish, redis_client,
                                                           user_without_xtrim, caplog):
    publish.registration(build.registration(run=RUN))
    publish_steps(build, publish, 0, 5)
    agg = make_aggregator(redis_url=user_without_xtrim)
    with caplog.at_level(logging.ERROR, logger="gradwatch.aggregator"):
        drain(agg)
    assert agg.counters.get("reports") == 5 and pending(redis_client) == 0
    assert redis_client.xlen(KEY) == 6  # not trimmed
    assert any("may not run XINFO or XTRIM" in r.getMessage() for r in caplog.records)
    with pytest.raises(redis.exceptions.NoPermissionError):
        agg.client.xtrim(KEY, maxlen=0)
