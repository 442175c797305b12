"""How a run's data leaves Redis: it expires `history_retention_s` after the run's last report (the aggregator's
retention sweep), or goes at once when an operator deletes the run (`gradwatch runs delete`).

Both work from gradwatch.streams' list of a run's keys (`run_keys`, `durable_keys`), never from KEYS or SCAN over
the keyspace: a run's keys share its hash tag, so on a Redis Cluster they live in one slot, and every command here
names one run's keys or one cross-run key (gradwatch:runs, gradwatch:alerts), never both.

  retention  `Retention.tick()`, called every discovery interval, sweeps every `interval_s`: it walks gradwatch:runs
             with ZSCAN, one page per tick (the cursor carried, so a tick's work is bounded and every member present
             for the whole walk is seen), sets PEXPIREAT = last write + ttl on the durable keys of each run, then
             removes the members older than the ttl (ZREMRANGEBYSCORE). The expiry is absolute: every replica
             computes the same one, a repeated sweep changes nothing, a run that reports again gets a later one at the
             next sweep, and runs no replica follows (finished ones, those from before retention) are swept too. An
             expiry already past becomes now + RESUME_GRACE_S, so a run that resumes while it is swept keeps its keys
             until a later sweep sees its new score. ttl 0 (keep forever) PERSISTs the keys instead.
  delete     `delete_run()`: ZREM from gradwatch:runs (aggregators stop discovering the run), UNLINK every key of
             the run, XDEL its entries of gradwatch:alerts (their JSON's "run"). Refused for a run that reported
             within `active_s` unless forced: an agent still sending would make the run again, headless.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis

from gradwatch.aggregator.config import DEFAULT_RUN_EXPIRY_S
from gradwatch.streams import (
    ALERTS_KEY,
    FIELD_ALERT,
    RUNS_KEY,
    durable_keys,
    lease_key,
    run_keys,
    valid_run_id,
)

SWEEP_INTERVAL_S = 600.0  # a finished run's keys get their final expiry within this of its last report
SWEEP_PAGE = 200  # index members per tick: ~2,400 PEXPIREATs, one pipeline (one per node on a cluster)
# Longer than a sweep interval plus a slow sweep: a run resuming as it is swept is seen again before this passes.
RESUME_GRACE_S = 3 * SWEEP_INTERVAL_S
ALERT_PAGE = 1000  # gradwatch:alerts entries per XRANGE while looking for a run's alerts
# After deleting a run an aggregator held, its batch in flight may still write (history rows before the fenced ack,
# an alert): the keys that reappeared are deleted again after this long (a discovery interval and a batch).
SETTLE_S = 2.0
# A run that reported more recently than this is deleted only when forced: aggregators still follow it.
ACTIVE_S = DEFAULT_RUN_EXPIRY_S


# -- retention ---------------------------------------------------------------------------------------------------


def expire_runs(client: redis.Redis, last_writes: dict[str, float], ttl_s: float, now: float | None = None) -> int:
    """PEXPIREAT (last write + ttl_s, or now + RESUME_GRACE_S where that has passed) on the durable keys of each
    run, in one pipeline; ttl_s 0: PERSIST them. Returns the runs handled (invalid ids in the index are skipped)."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    runs = [run for run in last_writes if valid_run_id(run)]
    for run in runs:
        at_ms = int(max(last_writes[run] + ttl_s, now + RESUME_GRACE_S) * 1000)
        for key in durable_keys(run):
            if ttl_s:
                pipe.pexpireat(key, at_ms)
            else:
                pipe.persist(key)
    if runs:
        pipe.execute()
    return len(runs)


@dataclass
class Sweep:
    """What one sweep of gradwatch:runs did."""

    runs: int = 0  # index members whose keys got their expiry (seen twice by ZSCAN: counted twice)
    pruned: int = 0  # members older than the ttl removed from the index
    started: float = 0.0  # unix time


class Retention:
    """The aggregator's retention sweep (module docstring). `tick()` is cheap between sweeps (a clock read): call
    it once per discovery interval. Not thread-safe: the consumer loop calls it. Raises redis errors; the sweep
    goes on from the same cursor at the next tick."""

    def __init__(self, client: redis.Redis, ttl_s: float, interval_s: float = SWEEP_INTERVAL_S,
                 page: int = SWEEP_PAGE):
        self.client = client
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.page = page
        self.last: Sweep | None = None  # the latest finished sweep
        self._sweep: Sweep | None = None  # the one under way
        self._cursor = 0
        self._next = 0.0  # monotonic time the next sweep is due

    def tick(self, now: float | None = None) -> bool:
        """One page of a sweep when one is due or under way; True when this tick finished one."""
        mono = time.monotonic()
        if self._sweep is None:
            if mono < self._next:
                return False
            self._sweep = Sweep(started=time.time() if now is None else now)
            self._next = mono + self.interval_s
        sweep = self._sweep
        cursor, members = self.client.zscan(RUNS_KEY, self._cursor, count=self.page)
        last_writes = {_text(member): float(score) for member, score in members}
        sweep.runs += expire_runs(self.client, last_writes, self.ttl_s, now)
        self._cursor = int(cursor)
        if self._cursor:
            return False
        if self.ttl_s:  # every member older than this was seen above: its keys expire (or have)
            sweep.pruned = int(self.client.zremrangebyscore(RUNS_KEY, "-inf", f"({sweep.started - self.ttl_s!r}"))
        self.last, self._sweep = sweep, None
        return True

    def sweep(self, now: float | None = None) -> Sweep:
        """A whole sweep now, whatever the schedule (tests, operators)."""
        self._sweep, self._cursor, self._next = None, 0, 0.0
        while not self.tick(now):
            pass
        assert self.last is not None
        return self.last


# -- delete ------------------------------------------------------------------------------------------------------


class RunNotFound(LookupError):
    """Redis holds nothing of the run: no key, no index entry, no alert."""


class RunActive(RuntimeError):
    """The run reported too recently to be deleted without force."""

    def __init__(self, run: str, age_s: float, active_s: float):
        self.run, self.age_s, self.active_s = run, age_s, active_s
        super().__init__(f"run {run!r} last reported {ago(age_s)} (within {ago(active_s, suffix='')}, while "
                         f"aggregators still follow it): it may still be training, and an agent still sending "
                         f"would make it again; stop it first, or force the deletion")


@dataclass
class RunData:
    """What Redis holds of one run."""

    run: str
    keys: list[str] = field(default_factory=list)  # the run's keys that exist
    last_report: float | None = None  # unix time of the collector's last write (gradwatch:runs), None: not indexed
    alerts: list[bytes] = field(default_factory=list)  # ids of the run's entries in gradwatch:alerts
    held_by: str | None = None  # the aggregator replica holding its lease

    def age_s(self, now: float | None = None) -> float | None:
        return None if self.last_report is None else (time.time() if now is None else now) - self.last_report

    @property
    def empty(self) -> bool:
        return not self.keys and self.last_report is None and not self.alerts


def run_alert_ids(client: redis.Redis, run: str, page: int = ALERT_PAGE) -> list[bytes]:
    """Ids of the run's entries in gradwatch:alerts, oldest first (XRANGE in pages; the stream is MAXLEN-bounded)."""
    ids: list[bytes] = []
    start = "-"
    while True:
        entries = client.xrange(ALERTS_KEY, min=start, max="+", count=page)
        for entry_id, fields in entries:
            raw = fields.get(FIELD_ALERT) or fields.get(FIELD_ALERT.decode())
            try:
                alert = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if isinstance(alert, dict) and alert.get("run") == run:
                ids.append(entry_id)
        if len(entries) < page:
            return ids
        start = "(" + _text(entries[-1][0])


def inspect_run(client: redis.Redis, run: str) -> RunData:
    """What Redis holds of `run` (nothing is changed)."""
    keys = run_keys(run)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.exists(key)
    pipe.get(lease_key(run))
    pipe.zscore(RUNS_KEY, run)
    *exists, owner, score = pipe.execute()
    return RunData(run, [key for key, n in zip(keys, exists, strict=True) if n],
                   None if score is None else float(score), run_alert_ids(client, run),
                   None if owner is None else _text(owner))


def delete_run(client: redis.Redis, run: str, *, force: bool = False, active_s: float = ACTIVE_S,
               settle_s: float = SETTLE_S, now: float | None = None) -> dict:
    """Removes every key of `run`, its gradwatch:runs member and its gradwatch:alerts entries. Raises RunNotFound
    when Redis holds nothing of it, RunActive when it reported within `active_s` (default: the aggregator's
    run_expiry_s, as long as aggregators follow a run) unless `force`. When an aggregator held the run, what its
    batch in flight wrote is deleted again after `settle_s`. Returns what was removed: {"run", "keys" (names),
    "index" (0 or 1), "alerts" (entries), "last_report" (unix time or None), "held_by"}."""
    data = inspect_run(client, run)
    if data.empty:
        raise RunNotFound(f"no run {run!r} in Redis: no key, no entry in {RUNS_KEY}, no alert")
    age = data.age_s(now)
    if not force and age is not None and age < active_s:
        raise RunActive(run, age, active_s)
    index = int(client.zrem(RUNS_KEY, run))  # first: no aggregator discovers it again
    if data.keys:
        client.unlink(*data.keys)
    alerts = _xdel(client, data.alerts)
    keys = list(data.keys)
    if data.held_by is not None and settle_s > 0:
        time.sleep(settle_s)
        again = inspect_run(client, run)
        if again.keys:
            client.unlink(*again.keys)
            keys += [key for key in again.keys if key not in keys]
        alerts += _xdel(client, again.alerts)
        index += int(client.zrem(RUNS_KEY, run))
    return {"run": run, "keys": keys, "index": min(index, 1), "alerts": alerts, "last_report": data.last_report,
            "held_by": data.held_by}


def _xdel(client: redis.Redis, ids: list[bytes]) -> int:
    return sum(int(client.xdel(ALERTS_KEY, *ids[i:i + ALERT_PAGE])) for i in range(0, len(ids), ALERT_PAGE))


def ago(seconds: float, suffix: str = " ago") -> str:
    """12 s ago, 5 min ago, 3.2 h ago, 4.0 days ago."""
    if seconds < 120:
        return f"{seconds:.0f} s{suffix}"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min{suffix}"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h{suffix}"
    return f"{seconds / 86400:.1f} days{suffix}"


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
