"""Stream retention: a run's report stream is trimmed by what the consumer group has acknowledged, and
whatever left it unacknowledged is counted exactly (docs/architecture.md#stream-retention).

Both happen in the fenced commit (aggregator/ingest/leases.py), right after its XACK and atomically with it:
`AUDIT` is the end of that Lua script. Nothing re-reads an applied entry (registrations are also in the
run's hash, the state and history are the aggregator's), so none is kept.

  trim   XTRIM MINID (exact) to the oldest entry some group still needs: per group, its oldest pending
         entry, else the entry after its last-delivered-id. Never an unacknowledged entry of any group.
  count  every entry ever added (XINFO STREAM entries-added) is still in the stream, pending in the group,
         acknowledged by a commit (`acked` in the run's applied hash, from XACK's own count, so a redelivered
         entry counts once) or lost. When the stream holds no entry at or before the group's
         last-delivered-id (after the trim, unless another group or a pending entry holds it back), every
         entry in it is undelivered and

             lost = entries-added - length - pending - acked - base

         is exact. It counts what the collector's hard cap (`XADD MAXLEN ~`) trimmed unread and the pending
         entries XAUTOCLAIM dropped because they were trimmed before a dead replica's successor claimed
         them. Redis' own `entries-read`/`lag` are not used: how they treat trimmed entries changed
         between releases.

The applied hash keeps `acked`, `lost` (counted so far) and `base`. `base` is re-taken, keeping `lost`,
when the count would go down (the stream was deleted and made again) and at the first audit of a run
whose commits predate `acked` (`rebase`, set by the commit). Redis before 7.0 has no entries-added:
the trim still happens, the count does not.
"""

from __future__ import annotations

import logging
import math

from gradwatch.logs import DedupLog

log = logging.getLogger("gradwatch.aggregator")
_once = DedupLog(log, math.inf)
_losses = DedupLog(log)  # a backlog trimmed on every commit: one line a minute per run, the counter has the rest

# The commit's result past its fence: [1, entries newly found lost, entries lost in all]; a negative
# second value means no count was taken.
NOT_NOW = -1  # the stream still holds entries delivered to the group (another group's, or pending ones)
UNSUPPORTED = -2  # Redis before 7.0: XINFO STREAM has no entries-added
DENIED = -3  # the aggregator's Redis user lacks XINFO or XTRIM on the stream (deploy/redis/users.acl)

# Runs inside the commit script after its XACK (KEYS[2] the stream, KEYS[3] the applied hash, ARGV[3]
# the group); returns the result above.
AUDIT = """
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, tonumber(seq)
end
local function before(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  am, bm = tonumber(am), tonumber(bm)
  return am < bm or (am == bm and as < bs)
end
local function map(flat)
  local out = {}
  for j = 1, #flat, 2 do out[flat[j]] = flat[j + 1] end
  return out
end
local function failed(reply)  -- an error must not fail the commit: its acks are done
  if type(reply) == 'table' and reply.err then
    local err = reply.err
    local denied = string.find(err, 'NOPERM', 1, true) or string.find(err, "can't run this command", 1, true)
    return {1, denied and -3 or -1, 0}
  end
end
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[2])
if failed(groups) then return failed(groups) end
local floor, ours = nil, nil
for _, flat in ipairs(groups) do
  local g = map(flat)
  local keep
  if g['pending'] > 0 then
    keep = redis.call('XPENDING', KEYS[2], g['name'])[2]
  else
    local ms, seq = parts(g['last-delivered-id'])
    keep = ms .. '-' .. string.format('%d', seq + 1)
  end
  if floor == nil or before(keep, floor) then floor = keep end
  if g['name'] == ARGV[3] then ours = g end
end
if ours == nil then return {1, -1, 0} end
local trimmed = redis.pcall('XTRIM', KEYS[2], 'MINID', floor)
if failed(trimmed) then return failed(trimmed) end
local info = redis.pcall('XINFO', 'STREAM', KEYS[2])
if failed(info) then return failed(info) end
local s = map(info)
if not s['entries-added'] then return {1, -2, 0} end
if s['length'] > 0 and not before(ours['last-delivered-id'], s['first-entry'][1]) then return {1, -1, 0} end
local gone = s['entries-added'] - s['length'] - ours['pending'] - tonumber(redis.call('HGET', KEYS[3], 'acked') or '0')
local known = tonumber(redis.call('HGET', KEYS[3], 'lost') or '0')
local base = tonumber(redis.call('HGET', KEYS[3], 'base') or '0')
if redis.call('HGET', KEYS[3], 'rebase') == '1' or gone - base < known then
  redis.call('HSET', KEYS[3], 'base', gone - known, 'rebase', 0)
  return {1, 0, known}
end
local lost = gone - base
if lost > known then redis.call('HSET', KEYS[3], 'lost', lost) end
return {1, lost - known, lost}
"""


def lost_entries(run: str, result: list) -> tuple[int, int]:
    """(entries newly found lost, entries lost in all) from the result of a commit that passed its fence;
    a loss is logged as an error, a Redis that cannot count once."""
    _, new, total = (int(x) for x in result)
    if new == UNSUPPORTED:
        _once.log(logging.WARNING, "unsupported", "Redis before 7.0 has no entries-added (XINFO STREAM): report-stream "
                  "entries the collector's hard cap trims unread cannot be counted or alerted (Redis 7 can: for "
                  "`gradwatch up`, GRADWATCH_REDIS_SERVER=<its redis-server>, or --redis-url)")
    elif new == DENIED:
        _once.log(logging.ERROR, "denied", "the aggregator's Redis user may not run XINFO or XTRIM on the report "
                  "streams: they are not trimmed to what was applied, and what the collector's hard cap trims "
                  "unread is not counted; grant them as deploy/redis/users.acl does")
    elif new > 0:
        _losses.log(logging.ERROR, f"lost:{run}", "run %s: %d report-stream entries left the stream before any "
                    "aggregator applied them (%d in all): the collector's hard cap (stream_maxlen) trimmed them unread",
                    run, new, total)
    return max(new, 0), total
