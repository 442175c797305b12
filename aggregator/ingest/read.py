"""Reading new entries of the report streams this replica holds, in the consumer group, on one Redis or a Cluster.

A command's keys must share a hash slot on a Redis Cluster (else CROSSSLOT), and each run's keys have their own
slot (the {run} hash tag), so the one XREADGROUP over every held stream that serves a single Redis is split:

  one Redis        XREADGROUP COUNT n BLOCK block_ms STREAMS <every held stream>: one round trip, answered as
                   soon as any stream has an entry
  cluster, 1 slot  the same (every held stream in one slot: typically one run)
  cluster, more    one XREADGROUP per slot, without BLOCK (a blocking read names one slot, and blocking commands
                   in a pipeline would wait one after the other), all in one pipeline: one round trip per node,
                   every node written before any is read. When every slot comes back empty, the next pass waits
                   min(block_ms, IDLE_POLL_MS): an entry waits up to that much longer than on one Redis.

XREADGROUP applies COUNT per stream, so `count` (the entries of one batch) is shared out among the held streams:
each is read up to ceil(count / streams) entries, a batch at most count + streams - 1 entries whatever the number
of runs a replica holds (its memory, docs/sizing.md#memory-bounds), the same on one Redis and on a cluster. One
held run reads `count` entries a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import redis
from redis.crc import key_slot

from gradwatch.aggregator.ingest.client import is_cluster
from gradwatch.streams import AGGREGATOR_GROUP

# A cluster's idle poll: the added wait of an entry that arrives while nothing else does (about half of it on
# average); each poll costs one XREADGROUP per held run's slot.
IDLE_POLL_MS = 50


def read_new(client: redis.Redis, consumer: str, streams: Iterable[str], count: int, block_ms: int,
             wait: Callable[[float], object]) -> list:
    """[(stream key, [(entry id, fields), ...]), ...]: new entries of `streams` for `consumer`, ceil(count / streams)
    of each at most. `wait(seconds)` sleeps between a cluster's empty polls (the stop event's wait: a stop ends it)."""
    streams = list(streams)
    count = -(-count // max(1, len(streams)))  # per stream: a batch of `count` entries over all of them
    slots: dict[int, list[str]] = {}
    if is_cluster(client):
        for key in streams:
            slots.setdefault(key_slot(key.encode()), []).append(key)
    if len(slots) <= 1:
        return client.xreadgroup(AGGREGATOR_GROUP, consumer, dict.fromkeys(streams, ">"), count=count,
                                 block=block_ms or None) or []  # BLOCK 0 would wait forever
    pipe = client.pipeline(transaction=False)
    for keys in slots.values():
        # Sent to the slot's node as the client's slot map has it: left to find its keys itself, the client
        # would ask a node COMMAND GETKEYS first (XREADGROUP's keys follow STREAMS), a round trip per slot per
        # pass. A MOVED answer (a slot resharded) is followed, routed by the keys.
        pipe.execute_command("XREADGROUP", "GROUP", AGGREGATOR_GROUP, consumer, "COUNT", count, "STREAMS", *keys,
                             *[">"] * len(keys), target_nodes=client.get_node_from_key(keys[0]))
    read = [item for response in pipe.execute() for item in response or []]
    if not read and block_ms:
        wait(min(block_ms, IDLE_POLL_MS) / 1000)
    return read
