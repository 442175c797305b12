"""Which aggregator replica owns which run: leases in Redis, a fair share per live replica, and a
fenced commit that acks entries only while the lease is still ours.

Cross-rank joins and windowed rules need every report of a run in one process, so replicas do not let
the consumer group scatter a run's entries; each run's stream is read by the one replica holding its
lease (docs/architecture.md#leases). Keys (the run's hash tag keeps them on the run's Redis Cluster shard, so
each script below, naming one run's keys, runs there; the renewals and commits of many runs go in one pipeline,
aggregator/ingest/client.py's eval_many):

  gradwatch:{<run>}:lease     STRING  owner consumer name, PX lease_ttl_ms; renewed by every commit and
                                      at every discovery interval
  gradwatch:{<run>}:applied   HASH    what the owners applied, written atomically with the XACK:
                                      `reports`, `summaries` (totals), `high:<rank>` (highest sequence
                                      number applied) and `start:<rank>` (that agent's start, ns); and
                                      the stream's retention count: `acked`, `lost`, `base`, `rebase`
                                      (aggregator/ingest/retention.py)
  gradwatch:aggregators       ZSET    consumer name -> last heartbeat (unix ms): the live replicas

A replica that dies stops renewing; after lease_ttl_ms another one takes the run, claims the entries
the dead one had read but not acked, and restores the sequence watermarks from `applied`, so a report
the dead replica committed is never applied again and one it had not committed is applied once. The commit
also refuses when Redis lost commits this replica saw succeed (ROLLED_BACK): the service then reads the run
again from what Redis kept. Parts of a multi-rank step still open are held unacknowledged until the step
closes (aggregator/ingest/holds.py). The
commit also trims the stream to what the group acknowledged and counts what left it unacknowledged
(aggregator/ingest/retention.py).
"""

from __future__ import annotations

import math
import random
import time

import redis

from gradwatch.aggregator.ingest.client import REDIS_ERRORS, eval_many, raise_first
from gradwatch.aggregator.ingest.retention import AUDIT
from gradwatch.streams import applied_key, lease_key

__all__ = ["ROLLED_BACK", "Leases", "applied_key", "lease_key"]  # the key names live in gradwatch.streams

# A replica that missed this many lease periods is not counted when sharing runs out.
REPLICA_TIMEOUT_LEASES = 3
REPLICAS_KEY = "gradwatch:aggregators"
ROLLED_BACK = -1  # the commit's answer when Redis lost earlier commits of the run (_COMMIT)

# KEYS: lease. ARGV: owner, ttl ms. 1 when the lease is (now) ours, 0 when another replica holds it.
_ACQUIRE = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] or not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease, stream, applied. ARGV: owner, ttl ms, group, reports, summaries, n ranks, then per
# rank (rank, agent start ns, high sequence, and the start and high this replica committed last), then the entry
# ids to ack. The lease check is the fence: a replica that lost its lease (paused past the TTL) cannot ack what the
# new owner will apply. The second check finds a Redis that lost commits this replica saw succeed (restarted from
# an older AOF or snapshot, a replica promoted before it had them): its entries would come back and be taken
# for duplicates, so nothing is written and the run is read again from what Redis kept. Returns 0 when fenced,
# ROLLED_BACK for the latter, else the retention count's result (retention.lost_entries reads it).
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local n = tonumber(ARGV[6])
for i = 7, 6 + 5 * n, 5 do
  local want = tonumber(ARGV[i + 4])
  if want > 0 then
    local rank = ARGV[i]
    local high = tonumber(redis.call('HGET', KEYS[3], 'high:' .. rank) or '0')
    if redis.call('HGET', KEYS[3], 'start:' .. rank) ~= ARGV[i + 3] or high < want then return -1 end
  end
end
if not redis.call('HGET', KEYS[3], 'acked') and redis.call('HGET', KEYS[3], 'reports') then
  redis.call('HSET', KEYS[3], 'rebase', 1)  -- commits from before the retention count: count from now on
end
local i = 7
for _ = 1, n do
  local rank, start, high = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local old_start = redis.call('HGET', KEYS[3], 'start:' .. rank)
  local old_high = tonumber(redis.call('HGET', KEYS[3], 'high:' .. rank) or '0')
  if old_start ~= start or high > old_high then
    redis.call('HSET', KEYS[3], 'start:' .. rank, start, 'high:' .. rank, high)
  end
  i = i + 5
end
if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', KEYS[3], 'reports', ARGV[4]) end
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[3], 'summaries', ARGV[5]) end
local acked = 0
if #ARGV >= i then acked = redis.call('XACK', KEYS[2], ARGV[3], unpack(ARGV, i)) end
redis.call('HINCRBY', KEYS[3], 'acked', acked)
""" + AUDIT




class Leases:
    """One replica's view of run ownership. Not thread-safe: the consumer loop calls it."""

    def __init__(self, client: redis.Redis, consumer: str, ttl_ms: int):
        self.client = client
        self.consumer = consumer
        self.ttl_ms = ttl_ms
        self.held: set[str] = set()
        # run -> rank -> (agent start ns, high sequence) as this replica last committed (or found at the takeover):
        # what Redis must still hold at the next commit
        self.committed: dict[str, dict[int, tuple[int, int]]] = {}
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self.commit_script = client.register_script(_COMMIT)

    def replicas(self) -> int:
        """Heartbeat, and the number of live replicas (this one included)."""
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(REPLICAS_KEY, {self.consumer: now_ms})
        pipe.zremrangebyscore(REPLICAS_KEY, "-inf", now_ms - REPLICA_TIMEOUT_LEASES * self.ttl_ms)
        pipe.zcard(REPLICAS_KEY)
        return max(1, pipe.execute()[-1])

    def balance(self, runs: list[str]) -> tuple[list[str], list[str]]:
        """Renews what this replica holds, takes free runs up to its fair share of `runs`, gives one
        back when it holds more than its share; returns (runs gained, runs lost or given back)."""
        replicas = self.replicas()  # heartbeat even with no run: an idle replica counts when runs appear
        share = math.ceil(len(runs) / replicas) if runs else 0
        active = set(runs)
        lost: list[str] = []
        held = sorted(self.held)
        if held:  # one round trip (one per node on a cluster) renews them all
            gone = set(self.renew(held))
            lost += [run for run in held if run in gone or run not in active]
        for run in lost:
            self.held.discard(run)
            if run not in active:
                self.release(run)
        if len(self.held) > share:  # one at a time, so replicas joining and leaving do not make runs flap
            run = max(self.held)
            self.release(run)
            lost.append(run)
        gained: list[str] = []
        free = [r for r in runs if r not in self.held and r not in lost]
        random.shuffle(free)  # replicas starting together try different runs first
        for run in free:
            if len(self.held) >= share:
                break
            if self._acquire(keys=[lease_key(run)], args=[self.consumer, self.ttl_ms]):
                self.held.add(run)
                gained.append(run)
        return gained, lost

    def renew(self, runs: list[str]) -> list[str]:
        """Renews these leases now (a batch that takes long must not outlive them: its commit would be fenced, the
        run taken over and the same batch applied again, forever); returns the runs whose lease is no longer ours."""
        results = raise_first(eval_many(self.client, self._acquire,
                                        [([lease_key(run)], [self.consumer, self.ttl_ms]) for run in runs]))
        return [run for run, ok in zip(runs, results, strict=True) if not ok]

    def release(self, run: str) -> None:
        self.held.discard(run)
        self._release(keys=[lease_key(run)], args=[self.consumer])

    def release_all(self) -> None:
        """On a clean stop: the runs go to another replica at once instead of after the TTL."""
        for run in list(self.held):
            try:
                self.release(run)
            except REDIS_ERRORS:
                pass
        try:
            self.client.zrem(REPLICAS_KEY, self.consumer)
        except REDIS_ERRORS:
            pass

    def commit_call(self, run: str, stream: str, group: str, reports: int, summaries: int,
                    marks: dict[int, tuple[int, int]], ids: list) -> tuple[list, list]:
        """(keys, args) of the run's fenced commit (_COMMIT): totals, watermarks `marks` (rank -> (start, high)),
        the entries to ack."""
        committed = self.committed.get(run, {})
        args: list = [self.consumer, self.ttl_ms, group, reports, summaries, len(marks)]
        for rank, (start, high) in marks.items():
            was_start, was_high = committed.get(rank, (0, 0))
            args += [rank, start, high, was_start, was_high]
        return [lease_key(run), stream, applied_key(run)], args + list(ids)

    def committed_now(self, run: str, marks: dict[int, tuple[int, int]]) -> None:
        """The commit carrying `marks` succeeded: Redis holds at least these from now on."""
        committed = self.committed.setdefault(run, {})
        for rank, (start, high) in marks.items():
            was_start, was_high = committed.get(rank, (0, 0))
            if start != was_start or high > was_high:
                committed[rank] = (start, high)

    def checkpoint(self, run: str) -> dict[int, tuple[int, int]]:
        """rank -> (agent start ns, highest sequence applied) as committed by this run's owners; also what this
        replica expects Redis to hold from now on."""
        raw = self.client.hgetall(applied_key(run))
        out: dict[int, tuple[int, int]] = {}
        for k, v in raw.items():
            k = k.decode() if isinstance(k, bytes) else k
            if k.startswith("high:"):
                rank = k[5:]
                start = raw.get(f"start:{rank}".encode(), raw.get(f"start:{rank}", b"0"))
                out[int(rank)] = (int(start), int(v))
        self.committed[run] = dict(out)
        return out
