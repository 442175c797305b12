"""Several aggregator replicas on one Redis: runs shared out by leases, taken over from a replica that
died, fenced commits, and the committed watermarks that keep a report from being applied twice."""

from __future__ import annotations

import time

from gradwatch.aggregator.ingest.leases import REPLICAS_KEY, applied_key, lease_key
from gradwatch.streams import AGGREGATOR_GROUP, reports_key

RUNS = ("run-a", "run-b", "run-c", "run-d")


def applied(client, run: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(applied_key(run)).items()}


def pending(client, run: str) -> int:
    return client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"]


def rounds(*aggs, n: int = 6) -> int:
    total = 0
    for _ in range(n):
        for agg in aggs:
            total += agg.run_once()
    return total


def publish_runs(build, publish, steps: int, start: int = 0) -> None:
    for run in RUNS:
        if start == 0:
            publish.registration(build.registration(run=run))
        for step in range(start, start + steps):
            publish.report(build.report(step, run=run))


def test_two_replicas_share_the_runs_and_apply_each_report_once(make_aggregator, build, publish, redis_client):
    a = make_aggregator(consumer="replica-a")
    b = make_aggregator(consumer="replica-b")
    a.leases.replicas(), b.leases.replicas()  # both alive before the runs appear
    publish_runs(build, publish, steps=10)
    rounds(a, b)
    held_a, held_b = a.leases.held, b.leases.held
    assert len(held_a) == len(held_b) == 2 and not held_a & held_b
    for run in RUNS:
        owner = a if run in held_a else b
        assert redis_client.get(lease_key(run)) == owner.config.consumer.encode()
        assert applied(redis_client, run) == {"reports": 10, "summaries": 120, "high:0": 10, "start:0": int(1.7e18),
                                              "acked": 11}  # the registration's entry too
        assert pending(redis_client, run) == 0
        assert redis_client.xlen(reports_key(run)) == 0  # trimmed once applied
    total = sum(agg.counters.get("reports") for agg in (a, b))
    assert total == 40
    assert {m.decode() for m in redis_client.zrange(REPLICAS_KEY, 0, -1)} == {"replica-a", "replica-b"}


def test_a_replica_joining_later_gets_its_share(make_aggregator, build, publish, redis_client):
    a = make_aggregator(consumer="replica-a")
    publish_runs(build, publish, steps=3)
    rounds(a)
    assert a.leases.held == set(RUNS)
    b = make_aggregator(consumer="replica-b")
    rounds(a, b, n=8)  # a gives back one run per discovery, b takes them
    assert len(a.leases.held) == len(b.leases.held) == 2
    publish_runs(build, publish, steps=3, start=3)
    rounds(a, b)
    for run in RUNS:
        assert applied(redis_client, run)["reports"] == 6 and pending(redis_client, run) == 0
    # b restored the watermarks a committed: nothing a applied was applied again
    assert sum(agg.counters.get("reports") for agg in (a, b)) == 24
    assert sum(agg.counters.get("duplicates") for agg in (a, b)) == 0


def test_takeover_after_a_crash_applies_what_was_not_committed_exactly_once(make_aggregator, build, publish,
                                                                             redis_client):
    run = "crashy"
    publish.registration(build.registration(run=run))
    for step in range(5):
        publish.report(build.report(step, run=run))
    a = make_aggregator(consumer="replica-a", lease_ttl_ms=300)
    rounds(a, n=2)
    assert applied(redis_client, run)["reports"] == 5
    # a reads two more entries and dies before its commit (its lease then expires) ...
    for step in range(5, 7):
        publish.report(build.report(step, run=run))
    read = redis_client.xreadgroup(AGGREGATOR_GROUP, "replica-a", {reports_key(run): ">"}, count=10)
    assert len(read[0][1]) == 2
    # ... and the collector had written an already-applied report twice (an agent retry)
    publish.report(build.report(4, run=run))
    publish.report(build.report(7, run=run))

    b = make_aggregator(consumer="replica-b", lease_ttl_ms=300)
    rounds(b, n=2)
    assert b.leases.held == set()  # a's lease is still valid
    time.sleep(0.35)
    rounds(b, n=3)
    assert b.leases.held == {run}
    assert b.counters.get("claimed") == 2
    assert b.counters.get("reports") == 3 and b.counters.get("duplicates") == 1
    assert applied(redis_client, run) == {"reports": 8, "summaries": 96, "high:0": 8, "start:0": int(1.7e18),
                                          "acked": 10}  # every entry once: a's two uncommitted ones by b
    assert pending(redis_client, run) == 0
    assert redis_client.xlen(reports_key(run)) == 0


def test_a_replica_that_lost_its_lease_cannot_ack(make_aggregator, build, publish, redis_client):
    """The fence: a replica paused past its lease TTL finds another owner at commit time."""
    run = "paused"
    publish.registration(build.registration(run=run))
    publish.report(build.report(0, run=run))
    # discovery (and lease renewal) only on the first run_once: the next ones only read and commit
    a = make_aggregator(consumer="replica-a", discover_interval_s=1000.0, lease_ttl_ms=3_000_000)
    rounds(a, n=2)
    assert applied(redis_client, run)["reports"] == 1
    redis_client.set(lease_key(run), "replica-b")  # a's lease expired while it was paused; b took it
    publish.report(build.report(1, run=run))
    assert a.run_once() == 1
    assert a.counters.get("lease_lost") == 1
    assert run not in a.leases.held and a.state.runs.get(run) is None
    assert applied(redis_client, run)["reports"] == 1  # not committed
    assert pending(redis_client, run) == 1             # left for the new owner

    b = make_aggregator(consumer="replica-b")
    rounds(b, n=2)
    assert b.counters.get("claimed") == 1 and b.counters.get("reports") == 1
    assert applied(redis_client, run)["reports"] == 2 and pending(redis_client, run) == 0


def test_a_clean_stop_hands_the_runs_over_at_once(make_aggregator, build, publish, redis_client):
    publish_runs(build, publish, steps=2)
    a = make_aggregator(consumer="replica-a")
    rounds(a)
    a.stop()
    assert all(redis_client.get(lease_key(run)) is None for run in RUNS)
    assert redis_client.zscore(REPLICAS_KEY, "replica-a") is None
    b = make_aggregator(consumer="replica-b")
    publish_runs(build, publish, steps=2, start=2)
    rounds(b)
    assert b.leases.held == set(RUNS)
    assert b.counters.get("reports") == 8 and b.counters.get("duplicates") == 0
    assert all(applied(redis_client, run)["reports"] == 4 for run in RUNS)


def test_restarted_agent_after_a_takeover_numbers_from_one_again(make_aggregator, build, publish, redis_client):
    run = "restarted"
    publish.registration(build.registration(run=run))
    for step in range(3):
        publish.report(build.report(step, run=run))
    a = make_aggregator(consumer="replica-a")
    rounds(a, n=2)
    a.stop()
    # the agent restarts (a later start time) and numbers its reports from 1 again
    publish.registration(build.registration(run=run, start_s=1_700_000_100.0))
    for step in range(3, 5):
        publish.report(build.report(step, run=run, seq=step - 2))
    b = make_aggregator(consumer="replica-b")
    rounds(b, n=2)
    assert b.counters.get("reports") == 2 and b.counters.get("duplicates") == 0
    assert applied(redis_client, run)["high:0"] == 2


def test_replicas_idle_before_the_runs_appear_share_them_at_once(make_aggregator, build, publish, redis_client):
    """An idle replica heartbeats too: when runs appear, the first replica to look takes only its share, so no
    run is taken over (handed back) just because the other replica had not been counted yet."""
    a, b = make_aggregator(consumer="replica-a"), make_aggregator(consumer="replica-b")
    rounds(a, b, n=2)  # nothing to follow yet
    publish_runs(build, publish, steps=3)
    rounds(a, n=1)
    assert len(a.leases.held) == 2  # its share of 4 runs between 2 live replicas
    rounds(a, b, n=3)
    assert len(a.leases.held) == len(b.leases.held) == 2
    assert sum(agg.counters.get("duplicates") for agg in (a, b)) == 0


def test_a_batch_longer_than_the_lease_keeps_it(make_aggregator, build, publish, redis_client):
    """Applying a batch of huge reports can take longer than the lease TTL: the leases are renewed mid-batch, so
    its commit is not fenced off (before, the run was taken over and the same batch applied again, forever)."""
    run = "slow"
    publish.registration(build.registration(run=run))
    for step in range(48):
        publish.report(build.report(step, run=run))
    agg = make_aggregator(lease_ttl_ms=300, discover_interval_s=60.0, claim_interval_s=60.0, read_count=100)
    apply = agg.state.apply

    def slow_apply(*args, **kwargs):  # 48 reports at 20 ms: about 1 s, three lease TTLs
        time.sleep(0.02)
        return apply(*args, **kwargs)

    agg.state.apply = slow_apply
    rounds(agg, n=3)
    assert agg.counters.get("lease_lost") == 0
    assert applied(redis_client, run)["reports"] == 48 and pending(redis_client, run) == 0
