"""The aggregator's Redis client on one Redis: which client a config makes, and scripts over many runs in one
pipeline (their cluster side: tests/scenarios/cluster/test_aggregator_cluster.py)."""

from __future__ import annotations

import pytest
import redis

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.ingest.client import REDIS_ERRORS, connect, eval_many, is_cluster, raise_first

COUNT = "return redis.call('INCR', KEYS[1])"


def test_one_redis_unless_the_config_says_cluster(redis_url):
    client = connect(AggregatorConfig(redis_url=redis_url))
    assert type(client) is redis.Redis and not is_cluster(client) and client.ping()
    client.close()
    with pytest.raises(REDIS_ERRORS, match="[Cc]luster mode is not enabled"):  # one Redis is no cluster
        connect(AggregatorConfig(redis_url=redis_url, redis_cluster=True))


def test_eval_many_answers_in_order_and_loads_the_script_once_missing(redis_client):
    script = redis_client.register_script(COUNT)
    calls = [([f"gradwatch:{{run-{i}}}:n"], []) for i in range(5)]
    assert eval_many(redis_client, script, calls) == [1] * 5  # never loaded: NOSCRIPT, loaded, run again once
    assert eval_many(redis_client, script, calls) == [2] * 5
    redis_client.script_flush()  # a restarted Redis
    assert eval_many(redis_client, script, calls) == [3] * 5
    assert eval_many(redis_client, script, []) == []


def test_eval_many_keeps_each_error_in_place(redis_client):
    script = redis_client.register_script(COUNT)
    redis_client.hset("gradwatch:{bad}:n", "not", "a counter")
    results = eval_many(redis_client, script, [(["gradwatch:{a}:n"], []), (["gradwatch:{bad}:n"], []),
                                               (["gradwatch:{b}:n"], [])])
    assert results[0] == results[2] == 1 and isinstance(results[1], redis.ResponseError)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        raise_first(results)
    assert raise_first([1, 0]) == [1, 0]
