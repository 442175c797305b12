"""The fenced commit of a batch: what applying its entries made is in Redis before those entries are acked.

In order: the history rows and frames the batch made (a row is in Redis before the entries behind it are
acked), then its alerts (the steps around each pinned in the history), then its dead letters, then the acks:
one fenced commit per run (aggregator/ingest/leases.py) that acks the entries, adds the applied totals and
commits the sequence watermarks, only while this replica still holds the run's lease. Each commit also trims
the stream; the entries it finds lost before any replica applied them are counted and alerted (StreamDataLost,
aggregator/ingest/retention.py), and written by the next pass. A failed step is retried, backed off, until it
succeeds or the aggregator stops: unacked entries are then redelivered, nothing is lost. While a long batch is
applied, its runs' leases are renewed (`keep_leases`), lest its commit be fenced off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradwatch.aggregator.ingest.client import REDIS_ERRORS, eval_many
from gradwatch.aggregator.ingest.leases import ROLLED_BACK
from gradwatch.aggregator.ingest.retention import lost_entries
from gradwatch.streams import AGGREGATOR_GROUP

if TYPE_CHECKING:
    import redis

    from gradwatch.aggregator.alerts.record import Alert
    from gradwatch.aggregator.alerts.sink import AlertSink
    from gradwatch.aggregator.config import AggregatorConfig
    from gradwatch.aggregator.counters import Counters
    from gradwatch.aggregator.frames import FrameHistory
    from gradwatch.aggregator.history import HistoryStore
    from gradwatch.aggregator.http.live import FrameStore
    from gradwatch.aggregator.ingest.holds import Holds
    from gradwatch.aggregator.ingest.leases import Leases
    from gradwatch.aggregator.rules.catalogue import RuleEngine
    from gradwatch.aggregator.state import State
    from gradwatch.logs import DedupLog

log = logging.getLogger("gradwatch.aggregator")


@dataclass
class Applied:
    """What one batch applied to one run: committed with its acks."""

    reports: int = 0
    summaries: int = 0
    ranks: set[int] = field(default_factory=set)


@dataclass
class Batch:
    """What one read, claim or idle pass leaves to commit."""

    alerts: list[Alert] = field(default_factory=list)
    dead: list[tuple[str, dict]] = field(default_factory=list)
    acks: dict[str, list[bytes]] = field(default_factory=dict)
    applied: dict[str, Applied] = field(default_factory=dict)  # run -> its part of the batch
    history: dict[str, list[tuple]] = field(default_factory=dict)  # run -> history rows to write first
    frames: dict[str, tuple] = field(default_factory=dict)  # run -> (stride, frames kept, thinned out): also first


class Committer:
    """Commits the aggregator's batches with the parts it shares with it. The loop's own decisions stay the
    loop's: `drop` stops following a run, `rediscover` makes the next discovery due now, `backoff` waits after a
    failure and `recovered` says a pass succeeded; `stop` set, a failed commit gives up."""

    def __init__(self, config: AggregatorConfig, client: redis.Redis, counters: Counters, errors: DedupLog, *,
                 lock: threading.Lock, state: State, rules: RuleEngine, frames: FrameStore,
                 history_store: HistoryStore, frame_history: FrameHistory, sink: AlertSink, leases: Leases,
                 holds: Holds, streams: Mapping[str, str], stop: threading.Event,
                 drop: Callable[[str, str], None], rediscover: Callable[[], None], backoff: Callable[[], None],
                 recovered: Callable[[], None]):
        self.config = config
        self.client = client
        self.counters = counters
        self._errors = errors
        self._lock = lock  # the aggregator's: state and rules
        self.state = state
        self.rules = rules
        self.frames = frames
        self.history_store = history_store
        self.frame_history = frame_history
        self.sink = sink
        self.leases = leases
        self.holds = holds
        self._streams = streams  # stream key -> run id, for the runs the aggregator holds
        self._stop = stop
        self._drop = drop
        self._rediscover = rediscover
        self._backoff = backoff
        self._recovered = recovered
        self.renewed_at = 0.0  # when the leases were last renewed in the middle of a batch (keep_leases)

    def keep_leases(self, batch: Batch) -> None:
        """Renews the leases of the batch's runs when applying it has taken a third of their TTL: a batch of huge
        reports (thousands of layers, dozens of ranks) can outlast a lease, and its commit would then be fenced off
        and the run taken over and applied again, batch after batch. A renewal that fails is left to the commit."""
        now = time.monotonic()
        if now - self.renewed_at < self.config.lease_ttl_ms / 3000:
            return
        self.renewed_at = now
        try:
            self.leases.renew(sorted(batch.applied))
        except REDIS_ERRORS as e:
            self.counters.add("redis_errors")
            self._errors.log(logging.WARNING, "renew", "cannot renew leases mid-batch: %s", e)

    def commit(self, batch: Batch) -> None:
        """Alerts, then dead letters, then acks; a failed step is retried until it succeeds or the
        aggregator stops (unacked entries are then redelivered, nothing is lost). The history rows the batch
        made are written before anything else: a row is in Redis before the entries behind it are acked."""
        with self._lock:
            for run, rows in self.state.take_unsaved().items():
                batch.history.setdefault(run, []).extend(rows)
        batch.frames.update(self.frames.take_changes())
        while batch.history or batch.frames or batch.alerts or batch.dead or any(batch.acks.values()):
            try:
                for run in list(batch.history):
                    self.history_store.save(run, batch.history[run])
                    del batch.history[run]
                for run in list(batch.frames):
                    self.frame_history.save(run, *batch.frames[run])
                    del batch.frames[run]
                if batch.alerts:
                    for run in {a.run for a in batch.alerts}:  # the steps around an alert stay whole in the history
                        self.history_store.pin(run, [a.step for a in batch.alerts if a.run == run])
                    self.sink.write(batch.alerts)
                    batch.alerts = []
                if batch.dead:
                    pipe = self.client.pipeline(transaction=False)
                    for key, fields in batch.dead:
                        pipe.xadd(key, fields, maxlen=self.config.dead_letter_maxlen, approximate=True)
                    pipe.execute()
                    batch.dead = []
                self._ack(batch)
                self._recovered()
            except REDIS_ERRORS as e:
                self.counters.add("redis_errors")
                self._errors.log(logging.WARNING, f"commit:{type(e).__name__}",
                                 "cannot write alerts or acks: %s; retrying", e)
                if self._stop.is_set():
                    log.warning("stopping with %d entries unacknowledged; they will be redelivered",
                                sum(map(len, batch.acks.values())))
                    return
                self._backoff()

    def _ack(self, batch: Batch) -> None:
        """One fenced commit per run in one round trip (one per node on a cluster): acks, applied totals and
        sequence watermarks, only while this replica still holds the run's lease. A run whose lease was lost is
        dropped; its unacked entries go to the new owner, which applies them once. Each commit also trims the
        stream to what the group acknowledged; the entries it finds lost become alerts, written next by
        `commit`. A commit that failed (its node down) raises after the others are taken off the batch: the
        retry runs only it, so no run's totals are added twice."""
        runs = [(key, self._streams.get(key) or _run_of(key), ids) for key, ids in batch.acks.items() if ids]
        calls, marked = [], []
        for key, run, ids in runs:
            applied = batch.applied.get(run, Applied())
            with self._lock:  # a held part's sequence is not committed before its step closes
                marks = self.holds.below(run, self.state.watermarks(run, applied.ranks))
            marked.append(marks)
            calls.append(self.leases.commit_call(run, key, AGGREGATOR_GROUP, applied.reports, applied.summaries,
                                                 marks, ids))
        results = eval_many(self.client, self.leases.commit_script, calls) if calls else []
        failed = None
        for (key, run, ids), marks, result in zip(runs, marked, results, strict=True):
            if isinstance(result, Exception):
                failed = failed or result
                continue
            del batch.acks[key]
            batch.applied.pop(run, None)
            if result == ROLLED_BACK:
                self.counters.add("redis_rollbacks")
                log.error("Redis no longer holds commits of run %s this aggregator saw succeed (restarted from an "
                          "older append-only file or snapshot, or a failover to a replica that lacked them): "
                          "following the run again from what Redis kept, so its entries are applied again", run)
                self._drop(run, "Redis lost some of its commits")
                self._rediscover()
            elif not result:
                self.counters.add("lease_lost")
                self._errors.log(logging.WARNING, f"fence:{run}",
                                 "lease of run %s lost before %d entries were acked; another replica applies them",
                                 run, len(ids))
                self._drop(run, "its lease expired before the commit")
            else:
                self.leases.committed_now(run, marks)
                batch.alerts += self._lost(run, result)
        if failed is not None:
            raise failed
        batch.acks = {}
        batch.applied = {}

    def _lost(self, run: str, result: list) -> list[Alert]:
        """Entries of the run's stream that left it before any replica applied them, as its commit counted them
        (aggregator/ingest/retention.py): logged, counted and alerted (StreamDataLost)."""
        new, total = lost_entries(run, result)
        if not new:
            return []
        self.counters.add("stream_lost", new)
        with self._lock:
            rs = self.state.runs.get(run)
            return self.rules.lost(run, new, total, rs.step if rs is not None else -1, time.time())


def _run_of(key: str) -> str:
    return key.partition("{")[2].rpartition("}")[0]
