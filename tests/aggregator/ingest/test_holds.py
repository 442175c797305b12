"""Parts of a multi-rank step stay pending until the join closes the step, and a Redis that lost commits the
aggregator saw succeed is read again: aggregator/ingest/holds.py and the commit's check in leases.py, against
a real Redis."""

from __future__ import annotations

import os
import signal
import time

import redis

from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.ingest.leases import applied_key
from gradwatch.cli.redis_server import RedisServer
from gradwatch.streams import AGGREGATOR_GROUP, reports_key
from tests.fixtures.aggregator import Publisher, drain

RUN = "two-ranks"


def applied(client: redis.Redis, run: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(applied_key(run)).items()}


def pending(client: redis.Redis, run: str) -> int:
    return client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"]


def register_two(build, publish, run: str = RUN) -> None:
    for rank in (0, 1):
        reg = build.registration(run=run, rank=rank)
        reg.world_size = 2
        publish.registration(reg)


def test_a_part_is_acked_with_its_step_not_before(make_aggregator, build, publish, redis_client):
    register_two(build, publish)
    agg = make_aggregator()
    drain(agg)
    for step in range(3):
        publish.report(build.report(step, run=RUN, rank=0, loss=1.0))
    drain(agg)
    # rank 0's parts of three open steps: applied to the join, not acknowledged, not counted, not committed
    assert pending(redis_client, RUN) == 3
    assert applied(redis_client, RUN).get("reports", 0) == 0
    assert applied(redis_client, RUN).get("high:0", 0) == 0
    assert HistoryStore(redis_client).count(RUN) == 0
    publish.report(build.report(0, run=RUN, rank=1, loss=3.0))
    drain(agg)
    # step 0 closed: both parts acked with its row; steps 1 and 2 still wait for rank 1
    assert pending(redis_client, RUN) == 2
    assert applied(redis_client, RUN)["reports"] == 2 and applied(redis_client, RUN)["high:0"] == 1
    assert [row[0] for row in HistoryStore(redis_client).rows(RUN)] == [0]


def test_a_step_open_at_a_crash_is_joined_whole_by_the_next_owner(make_aggregator, build, publish, redis_client):
    """Replica a applied rank 0's half of steps 0-2 and died; b takes the run over after the lease TTL, gets
    those halves back from the stream, and every step's row is the merge of both ranks (loss: their mean)."""
    register_two(build, publish)
    a = make_aggregator(consumer="replica-a", lease_ttl_ms=300)
    drain(a)
    for step in range(3):
        publish.report(build.report(step, run=RUN, rank=0, loss=1.0))
    drain(a)
    assert pending(redis_client, RUN) == 3
    a._stop.set()  # a "dies": it neither commits nor releases again  # noqa: SLF001

    b = make_aggregator(consumer="replica-b", lease_ttl_ms=300)
    time.sleep(0.35)
    drain(b)
    assert b.leases.held == {RUN}
    for step in range(3):
        publish.report(build.report(step, run=RUN, rank=1, loss=3.0))
    drain(b)
    rows = HistoryStore(redis_client).rows(RUN)
    assert [(row[0], row[3]) for row in rows] == [(0, 2.0), (1, 2.0), (2, 2.0)]
    assert b.counters.get("steps_incomplete") == 0 and b.counters.get("duplicates") == 0
    assert applied(redis_client, RUN)["reports"] == 6 and pending(redis_client, RUN) == 0


def test_own_sweep_leaves_held_parts_alone(make_aggregator, build, publish, redis_client):
    """XAUTOCLAIM of idle entries returns this replica's held parts too: they are not taken for repeats."""
    register_two(build, publish)
    agg = make_aggregator(claim_idle_ms=0)
    drain(agg)
    publish.report(build.report(0, run=RUN, rank=0))
    for _ in range(5):
        drain(agg)
    assert pending(redis_client, RUN) == 1 and agg.counters.get("duplicates") == 0
    assert agg.counters.get("claimed") == 0  # the sweep saw it and left it
    publish.report(build.report(0, run=RUN, rank=1))
    drain(agg)
    assert pending(redis_client, RUN) == 0 and applied(redis_client, RUN)["reports"] == 2


def test_a_step_closed_by_the_timeout_acks_what_it_has(make_aggregator, build, publish, redis_client):
    register_two(build, publish)
    agg = make_aggregator(join_timeout_s=0.1)
    drain(agg)
    publish.report(build.report(0, run=RUN, rank=0, loss=1.0))
    drain(agg)
    assert pending(redis_client, RUN) == 1
    time.sleep(0.15)
    drain(agg)
    assert pending(redis_client, RUN) == 0 and applied(redis_client, RUN)["reports"] == 1
    assert agg.counters.get("steps_incomplete") == 1
    assert [(row[0], row[3]) for row in HistoryStore(redis_client).rows(RUN)] == [(0, 1.0)]


def test_redis_restarted_from_an_older_snapshot_loses_no_applied_report(tmp_path, make_aggregator, build):
    """Redis comes back without commits the aggregator saw succeed (an AOF's last second, an older snapshot, a
    failover): the entries behind them are delivered again. Taken for duplicates by the aggregator's watermarks
    in memory, they were acked without being counted and their history rows lost; the commit now finds Redis
    behind, and the run is followed again from what Redis kept."""
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    client = redis.Redis.from_url(server.url)
    publish = Publisher(client)
    run = "rolled-back"
    try:
        publish.registration(build.registration(run=run))
        agg = make_aggregator(redis_url=server.url)
        for step in range(5):
            publish.report(build.report(step, run=run))
        drain(agg)
        assert applied(client, run)["reports"] == 5
        for step in range(5, 10):
            publish.report(build.report(step, run=run))
        client.save()  # what Redis will come back with: steps 5-9 written, not yet applied
        drain(agg)
        assert applied(client, run)["reports"] == 10 and HistoryStore(client).count(run) == 10

        os.kill(server.proc.pid, signal.SIGKILL)  # the commits of steps 5-9 are lost with it
        server.proc.wait()
        server.start()
        assert applied(client, run)["reports"] == 5 and HistoryStore(client).count(run) == 5
        for step in range(10, 12):
            publish.report(build.report(step, run=run))
        for _ in range(10):
            drain(agg)
            if applied(client, run).get("reports") == 12:
                break
        assert applied(client, run)["reports"] == 12 and pending(client, run) == 0
        assert agg.counters.get("redis_rollbacks") == 1
        assert [row[0] for row in HistoryStore(client).rows(run)] == list(range(12))
    finally:
        client.close()
        server.stop()
