"""Taking over stream entries that a dead consumer read but never acked (XAUTOCLAIM with a cursor)."""

from __future__ import annotations

import redis

from gradwatch.streams import AGGREGATOR_GROUP


def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


def autoclaim(client: redis.Redis, key: str, consumer: str, min_idle_ms: int, cursor: str,
              count: int) -> tuple[str, list, bool]:
    """One XAUTOCLAIM page from `cursor`: (next cursor, claimed entries, whether the scan wrapped).

    min_idle_ms is what keeps two live consumers from claiming each other's entries: a consumer
    acks within one batch, far sooner than the idle time."""
    response = client.xautoclaim(key, AGGREGATOR_GROUP, consumer, min_idle_ms, start_id=cursor, count=count)
    nxt, entries = response[0], response[1]
    nxt = nxt.decode() if isinstance(nxt, bytes) else str(nxt)
    live = [(i, f) for i, f in entries if i is not None]
    if len(live) < len(entries):
        _ack_trimmed(client, key, consumer, cursor, nxt, {i for i, _ in live}, count)
    return nxt, live, nxt == "0-0" or not entries


def _ack_trimmed(client: redis.Redis, key: str, consumer: str, start: str, end: str, live: set, count: int) -> None:
    """Redis 6.2 returns entries trimmed by MAXLEN as nil, without their ids, and keeps them pending
    (7.0 drops them itself): find our pending ids in the scanned range that no longer exist, ack them."""
    hi = None if end == "0-0" else stream_id(end)
    pending = client.xpending_range(key, AGGREGATOR_GROUP, start, "+", 10 * count, consumername=consumer)
    gone = [p["message_id"] for p in pending
            if p["message_id"] not in live and (hi is None or stream_id(p["message_id"]) < hi)
            and not client.xrange(key, p["message_id"], p["message_id"])]
    if gone:
        client.xack(key, AGGREGATOR_GROUP, *gone)
