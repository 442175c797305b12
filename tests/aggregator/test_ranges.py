"""Valid ranges (aggregator/ranges.py): what metric names mean, what a range holds, the Redis store (a real
Redis), the rule's cache that asks it at most once per refresh, and the marks /steps rows get."""

from __future__ import annotations

import math

import pytest
import redis

from gradwatch.aggregator.ranges import (
    MAX_RANGES,
    Metric,
    RangeCache,
    RangeStore,
    make_range,
    mark,
    parse_metric,
)
from gradwatch.streams import durable_keys, ranges_key


@pytest.mark.parametrize(("name", "metric"), [
    ("loss", Metric("loss", "loss", phase="train")),
    ("eval_loss", Metric("eval_loss", "loss", phase="eval")),
    ("grad_norm", Metric("grad_norm", "grad_norm")),
    ("grad_norm/encoder.layers.0", Metric("grad_norm/encoder.layers.0", "layers", "encoder.layers.0")),
    ("param_norm/fc1", Metric("param_norm/fc1", "param_norms", "fc1")),
    ("accuracy", Metric("accuracy", "scalars", "accuracy")),
    ("val/acc", Metric("val/acc", "scalars", "val/acc")),
])
def test_metric_names(name, metric):
    assert parse_metric(name) == metric


@pytest.mark.parametrize(("metric", "lo", "hi", "message"), [
    ("", 0, 1, "metric: a name of 1-512"),
    (" loss", 0, 1, "without surrounding blanks"),
    ("x" * 513, 0, 1, "metric: a name of 1-512"),
    (7, 0, 1, "metric: a name"),
    ("grad_norm/", 0, 1, "needs the layer's module path"),
    ("lr/0", 0, 1, "is not a user scalar"),
    ("labels/3", 0, 1, "is not a user scalar"),
    ("loss", None, None, "give at least one bound"),
    ("loss", 2, 1, "min 2 is above max 1"),
    ("loss", "0", 1, "min: a finite number or null"),
    ("loss", 0, math.inf, "max: a finite number or null"),
    ("loss", True, 1, "min: a finite number or null"),
])
def test_bad_ranges_are_named(metric, lo, hi, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_range(metric, lo, hi)


@pytest.mark.parametrize(("lo", "hi", "value", "inside"), [
    (0, 10, 0.0, True), (0, 10, 10.0, True), (0, 10, 10.5, False), (0, 10, -1e-9, False),
    (None, 5, -1e9, True), (None, 5, 5.1, False), (0.5, None, 1e9, True), (0.5, None, 0.4, False),
    (0, 10, math.nan, False), (None, 5, math.inf, False), (0, None, math.inf, True),
])
def test_contains(lo, hi, value, inside):
    assert make_range("loss", lo, hi).contains(value) is inside


def test_store_round_trip_bound_and_delete(redis_client):
    store = RangeStore(redis_client)
    assert ranges_key("demo") in durable_keys("demo")  # retention and `runs delete` take it with the run
    store.set("demo", make_range("loss", 0, 10, set_at=1.0))
    store.set("demo", make_range("accuracy", 0.5, None, set_at=2.0))
    store.set("demo", make_range("loss", None, 3, set_at=3.0))  # replaces
    redis_client.hset(ranges_key("demo"), "broken", b"{not json")  # skipped, not an error
    got = store.all("demo")
    assert list(got) == ["accuracy", "loss"]
    assert got["loss"].to_dict() == {"metric": "loss", "min": None, "max": 3.0, "set_at": 3.0}
    assert store.delete("demo", "loss") and not store.delete("demo", "loss")
    for i in range(MAX_RANGES - 2):
        assert store.set("demo", make_range(f"s{i}", 0, 1))
    assert not store.set("demo", make_range("one-too-many", 0, 1))
    assert store.set("demo", make_range("accuracy", 0.6, 1))  # replacing one is always allowed


class CountingStore(RangeStore):
    def __init__(self, client):
        super().__init__(client)
        self.reads = 0

    def all(self, run):
        self.reads += 1
        return super().all(run)


def test_cache_reads_redis_at_most_once_per_refresh(redis_client):
    now = [100.0]
    store = CountingStore(redis_client)
    cache = RangeCache(store, refresh_s=5.0, clock=lambda: now[0])
    assert cache.get("demo") == {} and store.reads == 1
    store.set("demo", make_range("loss", 0, 1))
    for _ in range(100):
        assert cache.get("demo") == {}  # a report a millisecond: still one read
    now[0] += 5.0
    assert list(cache.get("demo")) == ["loss"] and store.reads == 2
    cache.forget("demo")
    cache.get("demo")
    assert store.reads == 3


def test_cache_keeps_what_it_knew_when_redis_fails(redis_client):
    now = [0.0]
    errors = []
    store = RangeStore(redis_client)
    store.set("demo", make_range("loss", 0, 1))
    cache = RangeCache(store, refresh_s=1.0, on_error=errors.append, clock=lambda: now[0])
    assert list(cache.get("demo")) == ["loss"]
    store.client = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    now[0] += 1.0
    assert list(cache.get("demo")) == ["loss"] and len(errors) == 1
    assert cache.get("demo") and len(errors) == 1  # tried again only after refresh_s


def test_mark_rows():
    ranges = {r.metric.name: r for r in (make_range("loss", 0, 1), make_range("accuracy", 0.5, 1),
                                         make_range("grad_norm/fc1", None, 5), make_range("eval_loss", None, 2))}
    rows = [{"step": 0, "phase": "train", "loss": 0.5, "grad_norm": 1.0, "layers": {"fc1": 7.0}, "param_norms": {},
             "scalars": {"accuracy": 0.4}},
            {"step": 1, "phase": "eval", "loss": 3.0, "grad_norm": None, "layers": {}, "param_norms": {},
             "scalars": {}},
            {"step": 2, "phase": "train", "loss": math.nan, "grad_norm": 1.0, "layers": {"fc1": 1.0},
             "param_norms": {}, "scalars": {}}]
    mark(rows, ranges)
    assert [r["out_of_range"] for r in rows] == [["accuracy", "grad_norm/fc1"], ["eval_loss"], ["loss"]]
    unmarked = [{"step": 0, "phase": "train", "loss": 9.0}]
    mark(unmarked, {})
    assert "out_of_range" not in unmarked[0]  # a run without ranges: rows as before


def test_the_aggregator_user_may_keep_ranges(tmp_path):
    """deploy/redis/users.acl: the aggregator's user reads, writes and deletes ranges (its history* selector), the
    read-only user reads them; no denial in the ACL log."""
    from tests.deploy.test_redis_acl import AclRedis
    from tests.fixtures.aggregator import require_redis_7_binary

    server = AclRedis(tmp_path, require_redis_7_binary("the ACL file"))
    server.server.start()
    try:
        store = RangeStore(server.client("aggregator"))
        assert store.set("acl-run", make_range("loss", 0, 10))
        assert list(RangeStore(server.client("reader")).all("acl-run")) == ["loss"]
        assert store.delete("acl-run", "loss") and store.all("acl-run") == {}
        assert server.denials() == []
    finally:
        server.close()
