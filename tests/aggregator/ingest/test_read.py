"""One batch's read (aggregator/ingest/read.py) on a real Redis: `count` entries shared out among the held streams,
so a replica holding many runs reads a batch of about `count` entries, not `count` of each (its memory bound,
docs/sizing.md#memory-bounds). The split by slot on a cluster: tests/scenarios/cluster/test_aggregator_cluster.py."""

from __future__ import annotations

import pytest

from gradwatch.aggregator.ingest.read import read_new
from gradwatch.streams import AGGREGATOR_GROUP, reports_key


def filled(client, runs: int, entries: int) -> list[str]:
    keys = [reports_key(f"read-{i}") for i in range(runs)]
    for key in keys:
        client.xgroup_create(key, AGGREGATOR_GROUP, id="0", mkstream=True)
        pipe = client.pipeline(transaction=False)
        for n in range(entries):
            pipe.xadd(key, {"n": n})
        pipe.execute()
    return keys


@pytest.mark.parametrize(("runs", "count", "each"), [(1, 20, 20), (8, 20, 3), (8, 500, 63), (40, 20, 1)])
def test_a_batch_shares_its_count_among_the_held_streams(redis_client, runs, count, each):
    keys = filled(redis_client, runs, 100)
    read = read_new(redis_client, "c", keys, count=count, block_ms=0, wait=lambda s: None)
    assert sorted(len(entries) for _, entries in read) == [each] * runs
    assert sum(len(entries) for _, entries in read) <= count + runs - 1


def test_every_entry_of_every_stream_is_read_in_order_over_batches(redis_client):
    keys = filled(redis_client, 5, 37)
    seen: dict[str, list[int]] = {key: [] for key in keys}
    while batch := read_new(redis_client, "c", keys, count=16, block_ms=0, wait=lambda s: None):
        for key, entries in batch:
            seen[key.decode()] += [int(fields[b"n"]) for _, fields in entries]
    assert seen == {key: list(range(37)) for key in keys}
