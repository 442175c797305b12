"""deploy/redis/users.acl against a real redis-server, loaded as the deployments load it (deploy/redis/aclfile.sh
adds the passwords): the collector and the aggregator do their whole job with their own users, the ACL log
stays free of denials, the reader reads and nothing more, and everything else is refused with NOPERM."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.service import Aggregator
from gradwatch.cli.redis_server import RedisServer
from gradwatch.streams import (
    AGGREGATOR_GROUP,
    ALERTS_KEY,
    FIELD_ALERT,
    FIELD_REPORT,
    RUNS_KEY,
    dead_letter_key,
    quiet_handshake,
    registrations_key,
    reports_key,
)

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "users.acl"
ACLFILE_SH = ACL_FILE.with_name("aclfile.sh")
# Every user that logs in (`user NAME on`), each given a test password.
USERS = tuple(line.split()[1] for line in ACL_FILE.read_text().splitlines() if line.split()[2:3] == ["on"])
RUN = "acl-run"
STEPS = 12
NAN_STEP = 6


class AclRedis:
    """A redis-server loaded with users.acl, passwords added by aclfile.sh from a file per user, as the
    deployments do (sha256 hashes)."""

    def __init__(self, tmp_path: Path, binary: str):
        self.passwords = {user: f"test-{user}-password" for user in USERS}  # test-only, never real secrets
        (tmp_path / "passwords").mkdir()
        for user, password in self.passwords.items():
            (tmp_path / "passwords" / user).write_text(password)
        acl = tmp_path / "users.acl"
        proc = subprocess.run(["sh", str(ACLFILE_SH), str(ACL_FILE), str(tmp_path / "passwords"), str(acl)],
                              capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0 and not proc.stderr, proc.stderr  # every user that logs in has a password
        self.server = RedisServer(tmp_path / "redis", appendonly=False, extra_args=["--aclfile", str(acl)],
                                  binary=binary)
        self._clients: list[redis.Redis] = []
        self._admin: redis.Redis | None = None

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@{self.server.host}:{self.server.port}/0"

    def client(self, user: str | None, password: str | None = None) -> redis.Redis:
        """A client as `user` (None: no credentials), with its password unless another is given."""
        url = self.url(user) if user else self.server.url
        if password is not None:
            url = url.replace(self.passwords[user], password)
        client = redis.Redis.from_url(url, **quiet_handshake())  # as gradwatch's own clients connect
        self._clients.append(client)
        return client

    def denials(self) -> list[dict]:
        """ACL LOG entries: every denial, the connection handshake's included."""
        if self._admin is None:
            self._admin = self.client("admin")
        return self._admin.acl_log()

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.stop()


@pytest.fixture
def acl_redis(tmp_path, kit):
    server = AclRedis(tmp_path, kit.require_redis_7())
    server.server.start()
    yield server
    server.close()


def export_run(start_collector, acl_redis: AclRedis) -> None:
    """A real agent on a tiny model exports STEPS steps (a NaN loss at NAN_STEP) through a real collector
    that writes with the collector user."""
    torch = pytest.importorskip("torch")
    import gradwatch

    collector = start_collector(redis_url=acl_redis.url("collector"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = gradwatch.watch(model, opt, run=RUN, collector=collector.target)
    try:
        for step in range(STEPS):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            watcher.step(loss=float("nan") if step == NAN_STEP else loss.detach())
        assert watcher.flush(15)
    finally:
        watcher.close()
    assert watcher.counters.exported == STEPS and watcher.counters.dropped == 0
    assert collector.server.registry.get_sample_value("gradwatch_collector_redis_errors_total") == 0


# acl_redis first: fixtures end in reverse order, so the collectors stop before their Redis does.
def test_collector_user_stores_a_real_agent_export(acl_redis, start_collector):
    export_run(start_collector, acl_redis)

    admin = acl_redis.client("admin")
    entries = admin.xrange(reports_key(RUN))
    assert sum(FIELD_REPORT in fields for _, fields in entries) == STEPS + 1  # and the end-of-run marker
    assert admin.hget(registrations_key(RUN), "0") is not None
    assert admin.zscore(RUNS_KEY, RUN) is not None
    assert acl_redis.denials() == []


def test_default_user_is_off(acl_redis):
    with pytest.raises(redis.AuthenticationError):
        acl_redis.client(None).ping()
    with pytest.raises(redis.AuthenticationError):
        acl_redis.client("collector", password="wrong-password").ping()


FOREIGN = "not-gradwatch"
GW_STREAM = reports_key(RUN)

# (what, command): each is refused NOPERM, whether the command or the key is what the user lacks.
COLLECTOR_FORBIDDEN = [
    ("GET another key", ("GET", FOREIGN)),
    ("SET another key", ("SET", FOREIGN, "x")),
    ("XADD another key", ("XADD", FOREIGN, "*", "r", "x")),
    ("forge an alert", ("XADD", ALERTS_KEY, "*", FIELD_ALERT, "{}")),
    ("write a dead letter", ("XADD", dead_letter_key(RUN), "*", "r", "x")),
    ("GET a gradwatch key", ("GET", RUNS_KEY)),
    ("DEL a gradwatch key", ("DEL", GW_STREAM)),
    ("UNLINK a gradwatch key", ("UNLINK", RUNS_KEY)),
    ("FLUSHALL", ("FLUSHALL",)),
    ("FLUSHDB", ("FLUSHDB",)),
    ("CONFIG GET", ("CONFIG", "GET", "*")),
    ("CONFIG SET", ("CONFIG", "SET", "appendonly", "no")),
    ("KEYS", ("KEYS", "*")),
    ("SCAN", ("SCAN", "0")),
    ("ACL", ("ACL", "LIST")),
    ("XRANGE", ("XRANGE", GW_STREAM, "-", "+")),
    ("XREAD", ("XREAD", "STREAMS", GW_STREAM, "0")),
    ("XREADGROUP", ("XREADGROUP", "GROUP", AGGREGATOR_GROUP, "c", "STREAMS", GW_STREAM, ">")),
    ("XACK", ("XACK", GW_STREAM, AGGREGATOR_GROUP, "1-0")),
    ("XDEL", ("XDEL", GW_STREAM, "1-0")),
    ("XTRIM", ("XTRIM", GW_STREAM, "MAXLEN", "0")),
    ("XGROUP DESTROY", ("XGROUP", "DESTROY", GW_STREAM, AGGREGATOR_GROUP)),
    ("HGET", ("HGET", registrations_key(RUN), "0")),
    ("HDEL", ("HDEL", registrations_key(RUN), "0")),
    ("ZRANGE", ("ZRANGE", RUNS_KEY, "0", "-1")),
    ("ZREM", ("ZREM", RUNS_KEY, RUN)),
    ("EVAL", ("EVAL", "return 1", "0")),
    ("PUBLISH", ("PUBLISH", "gradwatch:events", "x")),
]


@pytest.mark.parametrize("command", [c for _, c in COLLECTOR_FORBIDDEN], ids=[w for w, _ in COLLECTOR_FORBIDDEN])
def test_collector_user_cannot_read_delete_or_administer(acl_redis, command):
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_redis.client("collector").execute_command(*command)
    assert [entry["username"] for entry in acl_redis.denials()] == ["collector"]


def run_aggregator(agg: Aggregator, acl_redis: AclRedis, done, timeout: float = 20.0) -> None:
    """run_once() until done(); a denial fails at once (the aggregator would only count it and retry)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert acl_redis.denials() == []
        assert time.monotonic() < deadline, "the aggregator did not finish in time"
        agg.run_once()


def test_aggregator_user_processes_the_reports(acl_redis, start_collector):
    export_run(start_collector, acl_redis)
    admin = acl_redis.client("admin")
    stream = reports_key(RUN)
    # An entry no one can decode: the aggregator parks it in the run's dead-letter stream.
    admin.xadd(stream, {"junk": b"\xff"})
    # A consumer that crashed after reading the first two entries (the registration and step 0), which
    # were then trimmed: the aggregator takes them over (XAUTOCLAIM; on 6.2 also XPENDING, XRANGE, XACK)
    # and, the registration entry gone, looks the tensor names up in the registrations hash (HGET).
    admin.xgroup_create(stream, AGGREGATOR_GROUP, id="0")
    first = admin.xreadgroup(AGGREGATOR_GROUP, "crashed", {stream: ">"}, count=2)[0][1]
    admin.xdel(stream, *[entry_id for entry_id, _ in first])

    config = AggregatorConfig(redis_url=acl_redis.url("aggregator"), consumer="acl-test", block_ms=50,
                              claim_idle_ms=0, claim_interval_s=0.0, metrics_listen="127.0.0.1:0").validate()
    agg = Aggregator(config, CollectorRegistry())
    try:
        agg.client.ping()
        value = agg.registry.get_sample_value
        run_aggregator(agg, acl_redis, lambda: value("gradwatch_run_step", {"run": RUN}) == STEPS - 1
                       and admin.xpending(stream, AGGREGATOR_GROUP)["pending"] == 0)
        assert value("gradwatch_aggregator_redis_errors_total") == 0
        assert value("gradwatch_aggregator_decode_errors_total") == 1
        assert value("gradwatch_aggregator_unregistered_reports_total") == 0  # found by HGET
        assert math.isfinite(value("gradwatch_run_loss", {"run": RUN}))
    finally:
        agg.stop(5)

    alerts = [json.loads(fields[FIELD_ALERT]) for _, fields in admin.xrange(ALERTS_KEY)]
    assert [(a["rule"], a["status"], a["step"]) for a in alerts][:1] == [("NonFinite", "firing", NAN_STEP)]
    assert admin.xlen(dead_letter_key(RUN)) == 1
    assert acl_redis.denials() == []


def test_aggregator_user_folds_the_history_and_the_reader_exports_it(acl_redis):
    """The history's compaction (one MULTI/EXEC a fold, with the generation's INCR) as the aggregator user, and the
    export's consistent window reads as the reader: no denial, every step once."""
    from gradwatch.aggregator.export import RunReader, frame
    from gradwatch.aggregator.history import HistoryStore

    run, steps = "acl-history", 300
    store = HistoryStore(acl_redis.client("aggregator"))
    store.save(run, [(s, 1000.0 + s, True, 0.5, 1.0, {"fc1": 1.0}, {}, {"fc1": 2.0}) for s in range(steps)])
    folded = 0
    while n := store.compact(run, latest=steps - 1, full_steps=10, window=0):
        folded += n
    assert folded > 0
    df = frame(RunReader(acl_redis.client("reader"), run))
    loss = df[df["statistic"] == "loss"]
    assert set(loss["resolution"]) == {1, 10, 100} and loss["count"].sum() == steps
    assert acl_redis.denials() == []


AGGREGATOR_FORBIDDEN = [
    ("GET another key", ("GET", FOREIGN)),
    ("SET another key", ("SET", FOREIGN, "x")),
    ("XADD another key", ("XADD", FOREIGN, "*", "r", "x")),
    ("XRANGE another key", ("XRANGE", FOREIGN, "-", "+")),
    ("DEL a gradwatch key", ("DEL", GW_STREAM)),
    ("forge a registration", ("HSET", registrations_key(RUN), "0", "x")),
    ("touch the run index", ("ZADD", RUNS_KEY, "1", "x")),
    ("FLUSHALL", ("FLUSHALL",)),
    ("CONFIG GET", ("CONFIG", "GET", "*")),
    ("KEYS", ("KEYS", "*")),
    ("XTRIM the alert stream", ("XTRIM", ALERTS_KEY, "MAXLEN", "0")),  # it trims only the report streams
    ("XGROUP DESTROY", ("XGROUP", "DESTROY", GW_STREAM, AGGREGATOR_GROUP)),
    ("XGROUP SETID", ("XGROUP", "SETID", GW_STREAM, AGGREGATOR_GROUP, "0")),
    ("SET a stream (overwrite it)", ("SET", GW_STREAM, "x")),
    ("DEL a lease's neighbour", ("DEL", registrations_key(RUN))),
    ("EVAL on another key", ("EVAL", "return 1", "1", FOREIGN)),
    # A script may touch only what the user may: the DEL inside is refused, the stream stays.
    ("EVAL a script that deletes a stream", ("EVAL", "return redis.call('DEL', KEYS[1])", "1", GW_STREAM)),
    ("EVAL a script that forges a registration",
     ("EVAL", "return redis.call('HSET', KEYS[1], '0', 'x')", "1", registrations_key(RUN))),
]


@pytest.mark.parametrize("command", [c for _, c in AGGREGATOR_FORBIDDEN], ids=[w for w, _ in AGGREGATOR_FORBIDDEN])
def test_aggregator_user_cannot_administer_or_leave_gradwatch(acl_redis, command):
    # NOPERM for the command itself; a refused command inside a script is a script error naming the ACL
    refused = "(?i)noperm|permission|can't run this command|can't access"
    with pytest.raises(redis.exceptions.ResponseError, match=refused):
        acl_redis.client("aggregator").execute_command(*command)
    assert [entry["username"] for entry in acl_redis.denials()] == ["aggregator"]


def test_users_are_the_components_a_reader_and_an_admin():
    assert {"collector", "aggregator", "reader", "admin"} <= set(USERS)
    assert ACL_FILE.read_text().splitlines()[0].split()[:3] == ["user", "default", "off"]


@pytest.fixture
def some_run(acl_redis):
    """A run's stream, registrations and index entry, written by the admin."""
    admin = acl_redis.client("admin")
    admin.xadd(GW_STREAM, {FIELD_REPORT: b"x"})
    admin.hset(registrations_key(RUN), "0", b"x")
    admin.zadd(RUNS_KEY, {RUN: 1})
    admin.set(FOREIGN, "x")
    return acl_redis


# What the read-only user is for (Grafana's Redis data source, an operator looking): reading gradwatch's keys.
READER_ALLOWED = [
    ("PING", ("PING",)),
    ("XRANGE a run's reports", ("XRANGE", GW_STREAM, "-", "+")),
    ("XLEN", ("XLEN", GW_STREAM)),
    ("XINFO STREAM", ("XINFO", "STREAM", GW_STREAM)),
    ("HGETALL the registrations", ("HGETALL", registrations_key(RUN))),
    ("ZRANGE the run index", ("ZRANGE", RUNS_KEY, "0", "-1")),
    ("TYPE", ("TYPE", RUNS_KEY)),
]

READER_FORBIDDEN = [
    ("GET another key", ("GET", FOREIGN)),
    ("XRANGE another key", ("XRANGE", FOREIGN, "-", "+")),
    ("XADD", ("XADD", GW_STREAM, "*", "r", "x")),
    ("forge an alert", ("XADD", ALERTS_KEY, "*", FIELD_ALERT, "{}")),
    ("HSET", ("HSET", registrations_key(RUN), "0", "y")),
    ("ZADD", ("ZADD", RUNS_KEY, "2", "x")),
    ("DEL", ("DEL", GW_STREAM)),
    ("SET a gradwatch key", ("SET", "gradwatch:x", "x")),
    ("XTRIM", ("XTRIM", GW_STREAM, "MAXLEN", "0")),
    ("XREADGROUP (moves entries to a pending list)", ("XREADGROUP", "GROUP", AGGREGATOR_GROUP, "c", "STREAMS",
                                                     GW_STREAM, ">")),
    ("XGROUP CREATE", ("XGROUP", "CREATE", GW_STREAM, "g", "0")),
    ("KEYS", ("KEYS", "*")),
    ("SCAN", ("SCAN", "0")),
    ("RANDOMKEY", ("RANDOMKEY",)),
    ("FLUSHALL", ("FLUSHALL",)),
    ("CONFIG GET", ("CONFIG", "GET", "*")),
    ("ACL", ("ACL", "LIST")),
    ("EVAL", ("EVAL", "return 1", "0")),
    ("PUBLISH", ("PUBLISH", "gradwatch:events", "x")),
]


@pytest.mark.parametrize("command", [c for _, c in READER_ALLOWED], ids=[w for w, _ in READER_ALLOWED])
def test_reader_reads_gradwatch_keys(some_run, command):
    some_run.client("reader").execute_command(*command)
    assert some_run.denials() == []


@pytest.mark.parametrize("command", [c for _, c in READER_FORBIDDEN], ids=[w for w, _ in READER_FORBIDDEN])
def test_reader_cannot_write_or_leave_gradwatch(some_run, command):
    with pytest.raises(redis.exceptions.NoPermissionError):
        some_run.client("reader").execute_command(*command)
    assert [entry["username"] for entry in some_run.denials()] == ["reader"]


# The clients skip redis-py's optional CLIENT SETINFO / MAINT_NOTIFICATIONS handshake
# (core/streams.py quiet_handshake), so a least-privilege user leaves no denial per connection.
def test_clients_skip_the_optional_handshake(acl_redis, start_collector):
    start_collector(redis_url=acl_redis.url("collector"))
    agg = Aggregator(AggregatorConfig(redis_url=acl_redis.url("aggregator"), metrics_listen="127.0.0.1:0"),
                     CollectorRegistry())
    try:
        agg.client.ping()
    finally:
        agg.stop(1)
    assert acl_redis.denials() == []
