"""The aggregator's Redis client, one Redis or a Redis Cluster (`redis_cluster`), and the two things that differ
between them for the rest of the aggregator: the errors a client raises, and Lua scripts run over many runs.

  client   redis.Redis; or redis.cluster.RedisCluster from the URL of any node: it learns the slot map there
           and sends each command to the node of its keys' slot, following MOVED, ASK and failovers.
  errors   REDIS_ERRORS: a cluster client also raises RedisClusterException, which is not a RedisError (no
           node reachable, a slot without a node); the aggregator counts, backs off and retries either.
  scripts  eval_many: one script over many runs in one pipeline (the fenced commits, the lease renewals).

Cluster-safety holds by construction: every command the aggregator sends names one run's keys (all under the
run's hash tag, gradwatch.streams) or one cross-run key (gradwatch:runs, gradwatch:alerts,
gradwatch:aggregators), never both; a Lua script's keys are one run's. The one command that named several
runs' keys, XREADGROUP over the held streams, is split by slot (aggregator/ingest/read.py). Pipelines need
no care beyond that: a cluster pipeline sends each node its commands (all nodes written before any is read).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException

from gradwatch.streams import quiet_handshake

if TYPE_CHECKING:
    from redis.commands.core import Script

    from gradwatch.aggregator.config import AggregatorConfig

REDIS_ERRORS = (redis.RedisError, RedisClusterException)


def connect(config: AggregatorConfig) -> redis.Redis | RedisCluster:
    """The client `config` asks for. A cluster client connects at once (it needs the slot map): it raises one of
    REDIS_ERRORS when no node answers or the node is not in cluster mode."""
    # The socket timeout must outlast XREADGROUP's BLOCK, or every idle read would fail.
    options = dict(socket_timeout=config.block_ms / 1000 + 10, socket_connect_timeout=5, health_check_interval=30,
                   **quiet_handshake())
    if config.redis_cluster:
        return RedisCluster.from_url(config.redis_url, **options)
    return redis.Redis.from_url(config.redis_url, **options)


def is_cluster(client: redis.Redis) -> bool:
    return isinstance(client, RedisCluster)


def eval_many(client: redis.Redis, script: Script, calls: Sequence[tuple[Sequence, Sequence]]) -> list:
    """`script` once per (keys, args), in one pipeline: the results in order, an exception in place of a call
    that failed (a connection lost mid-way raises instead: which calls ran is then unknown).

    EVALSHA only, then SCRIPT LOAD where a node answered NOSCRIPT (a cluster pipeline cannot load scripts
    itself; a node restarted, failed over or flushed its scripts) and only those calls again: NOSCRIPT ran
    nothing. On a cluster SCRIPT LOAD goes to every primary. On one Redis this also saves the SCRIPT EXISTS
    round trip redis-py's pipeline makes before each execute when handed a Script."""
    results = _evalsha(client, script.sha, calls)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        client.script_load(script.script)
        for i, result in zip(missing, _evalsha(client, script.sha, [calls[i] for i in missing]), strict=True):
            results[i] = result
    return results


def raise_first(results: list) -> list:
    """`results` of eval_many, unless one is an exception: then the first is raised."""
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def _evalsha(client: redis.Redis, sha: str, calls: Sequence[tuple[Sequence, Sequence]]) -> list:
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        pipe.evalsha(sha, len(keys), *keys, *args)
    return pipe.execute(raise_on_error=False)
