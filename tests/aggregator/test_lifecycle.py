"""A run's data leaving Redis (aggregator/lifecycle.py), against a real Redis fed by the real collector and
aggregator: `delete_run` removes every key of one run and nothing of another, its alerts and index entry too, and
refuses an active run unless forced; an aggregator holding a deleted run lets it go; the retention sweep expires
every durable key at last write + ttl, prunes the index, and is bounded per tick. Then the same on a real Redis
Cluster, and with the least-privilege users of deploy/redis/users.acl."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from gradwatch.aggregator import lifecycle, service
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.http.snapshots import SnapshotStore
from gradwatch.aggregator.lifecycle import Retention, RunActive, RunNotFound, delete_run, inspect_run
from gradwatch.aggregator.ranges import RangeStore, make_range
from gradwatch.aggregator.service import Aggregator
from gradwatch.cli.redis_server import RedisServer
from gradwatch.settings import ConfigError
from gradwatch.streams import (
    ALERTS_KEY,
    FIELD_ALERT,
    RUNS_KEY,
    durable_keys,
    lease_key,
    quiet_handshake,
    run_keys,
    snapshot_requests_key,
    snapshots_key,
)
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.snapshot_pb2 import Snapshot, SnapshotKind
from tests.fixtures.aggregator import Build, Publisher, drain, redis_7_binary, require_redis_7_binary

RUNS = ("life-a", "life-b")
STEPS = 125  # with history_full_steps 2: steps fold into 10- and 100-step buckets
NAN_STEP = 110  # a NonFinite alert: an entry of gradwatch:alerts, a pinned step
DAY = 86400.0


def keys_of(client, run: str) -> set[str]:
    """Every key Redis holds under the run's hash tag, found by SCAN (tests only: the code never scans)."""
    return {k.decode() for k in client.scan_iter(match=f"gradwatch:{{{run}}}:*", count=1000)}


def dumps(client, run: str) -> dict[str, bytes]:
    return {key: client.dump(key) for key in sorted(keys_of(client, run))}


def alerts_by_run(client) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, fields in client.xrange(ALERTS_KEY):
        run = json.loads(fields[FIELD_ALERT])["run"]
        out[run] = out.get(run, 0) + 1
    return out


def export(stub, run: str, steps: int = STEPS) -> None:
    """The run's registration, reports (a NaN at NAN_STEP) and a snapshot through the real collector."""
    build = Build()
    reports = [build.report(step, run=run, nonfinite={("fc1", "gradient"): 2} if step == NAN_STEP else None)
               for step in range(steps)]
    snapshot = Snapshot(request_id="req-1", run_id=run, step=3, kind=SnapshotKind.SNAPSHOT_KIND_WEIGHT_HEATMAP,
                        tensor="fc1", shape=[16, 16], maps=1, rows=2, cols=2, values=[0.5, 1.0, 1.5, 2.0])
    for i in range(0, steps, 50):
        request = ExportRequest(reports=reports[i:i + 50])
        if i == 0:
            request.registrations.append(build.registration(run))
            request.snapshots.append(snapshot)
        response = stub.Export(request, timeout=10)
        assert not response.HasField("partial_success"), response


@pytest.fixture
def populated(stub, redis_client, make_aggregator, monkeypatch):
    """RUNS exported through the real collector and applied by a real aggregator (history folded into tiers, an
    alert each, a dead letter each, a pending snapshot request each); returns the aggregator, which holds them."""
    monkeypatch.setattr(service, "COMPACT_INTERVAL_S", 0.0)
    for run in RUNS:
        export(stub, run)
        Publisher(redis_client).raw(run, {b"junk": b"\xff"})  # undecodable: the aggregator parks it
    agg = make_aggregator(history_full_steps=2, history_alert_window=1, keep_firing_s=0)
    drain(agg)
    for _ in range(3):
        agg.run_once()  # compaction passes
    for run in RUNS:
        SnapshotStore(redis_client).request(run, "weight_heatmap", "fc1")
        RangeStore(redis_client).set(run, make_range("loss", 0, 10))  # a valid range a user marked
    return agg


def test_a_run_gets_exactly_the_keys_run_keys_lists(populated, redis_client):
    for run in RUNS:
        assert keys_of(redis_client, run) == set(run_keys(run))
    assert alerts_by_run(redis_client) == {run: 2 for run in RUNS}  # the NaN's alert, firing then resolved


def test_delete_removes_every_key_of_the_run_and_nothing_else(populated, redis_client):
    a, b = RUNS
    kept = dumps(redis_client, b)
    redis_client.zadd(RUNS_KEY, {a: time.time() - 2 * 3600, b: time.time() - 2 * 3600})  # both finished
    b_score = redis_client.zscore(RUNS_KEY, b)
    b_alerts = [entry for entry in redis_client.xrange(ALERTS_KEY) if json.loads(entry[1][FIELD_ALERT])["run"] == b]

    done = delete_run(redis_client, a, settle_s=0)

    assert sorted(done["keys"]) == sorted(run_keys(a)) and done["index"] == 1 and done["alerts"] == 2
    assert done["held_by"] == populated.config.consumer
    assert keys_of(redis_client, a) == set() and redis_client.zscore(RUNS_KEY, a) is None
    assert alerts_by_run(redis_client) == {b: 2}
    assert dumps(redis_client, b) == kept  # byte for byte
    assert redis_client.zscore(RUNS_KEY, b) == b_score
    assert [e for e in redis_client.xrange(ALERTS_KEY)] == b_alerts
    with pytest.raises(RunNotFound, match="no run 'life-a' in Redis"):
        delete_run(redis_client, a)


def test_an_active_run_is_refused_unless_forced(redis_client, publish, build):
    publish.registration(build.registration("busy"))
    redis_client.zadd(RUNS_KEY, {"busy": time.time() - 42})
    with pytest.raises(RunActive, match=r"run 'busy' last reported 42 s ago \(within 60 min") as refused:
        delete_run(redis_client, "busy")
    assert 41 < refused.value.age_s < 45
    assert keys_of(redis_client, "busy") and redis_client.zscore(RUNS_KEY, "busy")  # nothing touched
    assert delete_run(redis_client, "busy", active_s=30)["index"] == 1  # a shorter window: not active any more
    publish.registration(build.registration("busy"))
    assert delete_run(redis_client, "busy", force=True)["index"] == 1
    assert keys_of(redis_client, "busy") == set()


def test_a_run_known_only_by_its_alerts_is_deleted(redis_client):
    redis_client.xadd(ALERTS_KEY, {FIELD_ALERT: json.dumps({"run": "gone", "rule": "NonFinite"})})
    redis_client.xadd(ALERTS_KEY, {FIELD_ALERT: json.dumps({"run": "other", "rule": "NonFinite"})})
    redis_client.xadd(ALERTS_KEY, {FIELD_ALERT: b"not json"})
    assert inspect_run(redis_client, "gone").alerts and not inspect_run(redis_client, "gone").keys
    assert delete_run(redis_client, "gone") == {"run": "gone", "keys": [], "index": 0, "alerts": 1,
                                                "last_report": None, "held_by": None}
    assert redis_client.xlen(ALERTS_KEY) == 2


def test_alerts_are_found_over_several_pages(redis_client, monkeypatch):
    monkeypatch.setattr(lifecycle, "ALERT_PAGE", 7)
    for i in range(50):
        redis_client.xadd(ALERTS_KEY, {FIELD_ALERT: json.dumps({"run": "paged" if i % 3 else "kept"})})
    assert len(lifecycle.run_alert_ids(redis_client, "paged", page=7)) == 33
    assert delete_run(redis_client, "paged")["alerts"] == 33
    assert alerts_by_run(redis_client) == {"kept": 17}


@pytest.mark.parametrize("discovery", ["next discovery", "next read (NOGROUP)"])
def test_an_aggregator_holding_a_deleted_run_lets_it_go(populated, redis_client, discovery):
    a, b = RUNS
    agg = populated
    if discovery != "next discovery":  # discovery not due: the next call only reads the held streams
        agg.config = dataclasses.replace(agg.config, discover_interval_s=3600.0)
        agg._next_discover = time.monotonic() + 3600.0
    assert a in agg.state.runs and a in agg.leases.held

    delete_run(redis_client, a, force=True, settle_s=0)
    for _ in range(3):
        agg.run_once()
    agg._next_discover = 0.0  # and a discovery after it
    for _ in range(2):
        agg.run_once()

    assert a not in agg.state.runs and a not in agg.leases.held
    assert keys_of(redis_client, a) == set() and redis_client.zscore(RUNS_KEY, a) is None
    assert b in agg.state.runs and b in agg.leases.held  # the other run is still followed
    assert agg.history(a, None, None, 10) is None


def test_keys_an_aggregator_writes_after_the_delete_are_deleted_again(populated, redis_client, monkeypatch):
    """The holder's batch in flight writes its history rows before its fenced ack: they come back once."""
    a = RUNS[0]
    waits = []

    def late_write(seconds: float) -> None:  # what the batch in flight does while delete_run waits
        waits.append(seconds)
        HistoryStore(redis_client).save(a, [(1000, time.time(), True, 0.5, 1.0, {"fc1": 1.0}, {}, {"fc1": 2.0})])

    monkeypatch.setattr(lifecycle.time, "sleep", late_write)
    done = delete_run(redis_client, a, force=True)
    assert waits == [lifecycle.SETTLE_S]  # the aggregator held the run: a second pass
    assert keys_of(redis_client, a) == set()
    assert set(done["keys"]) == set(run_keys(a))


# -- retention ----------------------------------------------------------------------------------------------------


def test_retention_expires_every_durable_key_at_last_write_plus_ttl(populated, redis_client):
    a, b = RUNS
    now = time.time()
    redis_client.zadd(RUNS_KEY, {a: now - 1 * DAY, b: now - 3 * DAY})
    ttl = 10 * DAY
    sweep = Retention(redis_client, ttl).sweep(now)
    assert sweep.runs == 2 and sweep.pruned == 0
    for run, age in ((a, 1 * DAY), (b, 3 * DAY)):
        for key in durable_keys(run):
            assert redis_client.pttl(key) / 1000 == pytest.approx(ttl - age, abs=5), key
        # their own expiries, untouched: the lease's (seconds) and the snapshots' (an hour at most)
        assert 0 < redis_client.pttl(lease_key(run)) <= populated.config.lease_ttl_ms
        assert 0 < redis_client.pttl(snapshots_key(run)) <= 3600 * 1000
        assert 0 < redis_client.pttl(snapshot_requests_key(run)) <= 600 * 1000
    # Idempotent, and absolute: a second sweep later sets the same expiry.
    Retention(redis_client, ttl).sweep(now + 60)
    assert redis_client.pttl(durable_keys(a)[0]) / 1000 == pytest.approx(ttl - DAY, abs=5)


def test_retention_prunes_the_index_and_gives_expired_runs_a_grace(redis_client, publish, build):
    now = time.time()
    for run in ("old", "young"):
        publish.registration(build.registration(run))
        HistoryStore(redis_client).save(run, [(1, now, True, 0.5, 1.0, {"fc1": 1.0}, {}, {"fc1": 2.0})])
    redis_client.zadd(RUNS_KEY, {"old": now - 40 * DAY, "young": now - 5 * DAY, "not a run id!": now - 40 * DAY})

    sweep = Retention(redis_client, 30 * DAY).sweep(now)

    assert sweep.pruned == 2 and redis_client.zrange(RUNS_KEY, 0, -1) == [b"young"]
    for key in keys_of(redis_client, "old"):  # due already: deleted after the grace, not at once
        assert redis_client.pttl(key) / 1000 == pytest.approx(lifecycle.RESUME_GRACE_S, abs=5)
    for key in keys_of(redis_client, "young"):
        assert redis_client.pttl(key) / 1000 == pytest.approx(25 * DAY, abs=5)


def test_retention_zero_keeps_forever(redis_client, publish, build):
    publish.registration(build.registration("kept"))
    redis_client.zadd(RUNS_KEY, {"kept": time.time() - 10 * DAY})
    Retention(redis_client, 30 * DAY).sweep()
    assert redis_client.pttl(durable_keys("kept")[0]) > 0
    sweep = Retention(redis_client, 0).sweep()
    assert sweep.pruned == 0 and redis_client.zscore(RUNS_KEY, "kept") is not None
    assert all(redis_client.pttl(key) == -1 for key in keys_of(redis_client, "kept"))


def test_retention_tick_is_one_page_and_waits_for_its_interval(redis_client):
    now = time.time()
    redis_client.zadd(RUNS_KEY, {f"run-{i}": now - (40 if i % 2 else 1) * DAY for i in range(600)})
    retention = Retention(redis_client, 30 * DAY, interval_s=3600, page=100)
    ticks = 1
    while not retention.tick(now):
        ticks += 1
    assert 3 <= ticks <= 12  # ZSCAN's COUNT is a hint; a page is bounded, not exact
    assert retention.last.runs >= 600 and retention.last.pruned == 300
    assert redis_client.zcard(RUNS_KEY) == 300
    redis_client.zadd(RUNS_KEY, {"later": now - 40 * DAY})
    assert not retention.tick(now) and retention.last.pruned == 300  # not due for an hour: nothing read
    assert redis_client.zscore(RUNS_KEY, "later") is not None


@pytest.mark.parametrize(("retention", "expiry", "ok"), [
    (0.0, 3600.0, True), (7200.0, 3600.0, True), (90 * DAY, 3600.0, True),
    (7199.0, 3600.0, False), (-1.0, 3600.0, False), (float("inf"), 3600.0, False), (60.0, 10.0, True),
])
def test_history_retention_setting(retention, expiry, ok):
    config = AggregatorConfig(history_retention_s=retention, run_expiry_s=expiry)
    if ok:
        config.validate()
    else:
        with pytest.raises(ConfigError, match="history_retention_s .GRADWATCH_AGGREGATOR_HISTORY_RETENTION_S."):
            config.validate()


def test_history_retention_default_and_variable(monkeypatch):
    assert AggregatorConfig().history_retention_s == 90 * DAY
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_HISTORY_RETENTION_S", "0")
    assert AggregatorConfig.from_env().validate().history_retention_s == 0


# -- Redis Cluster ------------------------------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path):
    from tests.scenarios.cluster.local_cluster import LocalCluster, require_cluster_tools

    binary = redis_7_binary()
    require_cluster_tools(binary)
    started = LocalCluster(tmp_path, binary=binary).start()
    yield started
    started.stop()


def test_delete_and_retention_on_a_redis_cluster(cluster, build):
    from redis.cluster import RedisCluster
    from redis.crc import key_slot

    client = RedisCluster.from_url(cluster.url, **quiet_handshake())
    # Runs on every node.
    runs, nodes = [], set()
    for i in range(200):
        node = cluster.owner(key_slot(f"c-{i}".encode())).port
        if node not in nodes:
            nodes.add(node)
            runs.append(f"c-{i}")
    assert len(runs) == 3
    publish = Publisher(client)
    config = AggregatorConfig(redis_url=cluster.url, redis_cluster=True, metrics_listen="127.0.0.1:0",
                              consumer="cluster-test", block_ms=20, discover_interval_s=0.0, claim_interval_s=0.0,
                              history_full_steps=2, history_alert_window=1, keep_firing_s=0).validate()
    agg = Aggregator(config, CollectorRegistry())
    try:
        for run in runs:
            publish.registration(build.registration(run))
            for step in range(30):
                publish.report(build.report(step, run=run, nonfinite={("fc1", "gradient"): 2} if step == 20 else None))
        drain(agg)
        for run in runs:
            assert len(inspect_run(client, run).keys) >= 8  # stream, registrations, history, pins, lease...
        now = time.time()
        client.zadd(RUNS_KEY, {runs[0]: now - 2 * DAY, runs[1]: now - 40 * DAY, runs[2]: now - 2 * DAY})
        sweep = Retention(client, 30 * DAY, page=1).sweep(now)
        assert sweep.pruned == 1 and client.zscore(RUNS_KEY, runs[1]) is None
        assert client.pttl(durable_keys(runs[0])[0]) / 1000 == pytest.approx(28 * DAY, abs=5)

        done = delete_run(client, runs[0], force=True, settle_s=0.5)
        assert done["index"] == 1 and done["alerts"] == 2
        assert inspect_run(client, runs[0]).empty
        assert len(inspect_run(client, runs[2]).keys) >= 8 and alerts_by_run(client) == {runs[1]: 2, runs[2]: 2}
    finally:
        agg.stop(2)
        client.close()


# -- least privilege ----------------------------------------------------------------------------------------------

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "users.acl"


@pytest.fixture
def acl_server(tmp_path):
    """A Redis 7 loaded with deploy/redis/users.acl (passwords added as deploy/redis/README.md says)."""
    binary = require_redis_7_binary("users.acl")
    text = ACL_FILE.read_text()
    for user in ("aggregator", "admin"):
        digest = hashlib.sha256(f"pw-{user}".encode()).hexdigest()
        text = text.replace(f"user {user} on ", f"user {user} on #{digest} ", 1)
    (tmp_path / "users.acl").write_text(text)
    server = RedisServer(tmp_path / "redis", appendonly=False, binary=binary,
                         extra_args=["--aclfile", str(tmp_path / "users.acl")]).start()
    yield lambda user: redis.Redis(host=server.host, port=server.port, username=user, password=f"pw-{user}",
                                   **quiet_handshake())
    server.stop()


def test_the_aggregator_user_may_sweep_but_not_delete(acl_server, build):
    admin, aggregator = acl_server("admin"), acl_server("aggregator")
    publish = Publisher(admin)
    now = time.time()
    for run in ("acl-old", "acl-new"):
        publish.registration(build.registration(run))
        HistoryStore(admin).save(run, [(1, now, True, 0.5, 1.0, {"fc1": 1.0}, {}, {"fc1": 2.0})])
        admin.hset(f"gradwatch:{{{run}}}:applied", "reports", 1)
        admin.xadd(f"gradwatch:{{{run}}}:dead", {"junk": b"1"})
    admin.zadd(RUNS_KEY, {"acl-old": now - 40 * DAY, "acl-new": now - DAY})

    assert Retention(aggregator, 30 * DAY).sweep(now).pruned == 1
    Retention(aggregator, 0).sweep(now)
    assert admin.acl_log() == []

    with pytest.raises(redis.exceptions.NoPermissionError):
        delete_run(aggregator, "acl-new", force=True)
    admin.acl_log_reset()
    assert delete_run(admin, "acl-new", force=True)["index"] == 1
    assert inspect_run(admin, "acl-new").empty and admin.acl_log() == []
