"""The stream loop: discover runs, take the leases of this replica's share of them, read their report
streams in one consumer group, apply each entry to the state and the rules, and hand each batch to the
fenced commit (aggregator/ingest/commit.py); take over what a dead replica left.

At-least-once delivery plus per-(run, rank, sequence) deduplication gives each report one effect: the
state skips what it applied, and the watermarks the commit writes with each ack (aggregator/ingest/leases.py)
carry that across replicas. Nothing an entry holds can stop the loop: what cannot be decoded goes to the
run's dead-letter stream; Redis errors are counted and backed off.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from prometheus_client import CollectorRegistry

from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.alerts.sink import AlertSink
from gradwatch.aggregator.backlog import BacklogMeter
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.frames import FrameHistory
from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.http import views
from gradwatch.aggregator.http.live import FrameStore
from gradwatch.aggregator.http.metrics import AggregatorCollector, AggregatorView
from gradwatch.aggregator.ingest.claim import autoclaim
from gradwatch.aggregator.ingest.client import REDIS_ERRORS, connect
from gradwatch.aggregator.ingest.commit import Applied, Batch, Committer
from gradwatch.aggregator.ingest.entries import dead_letter, decode_entry
from gradwatch.aggregator.ingest.holds import Held, Holds
from gradwatch.aggregator.ingest.leases import Leases
from gradwatch.aggregator.ingest.read import read_new
from gradwatch.aggregator.lifecycle import Retention
from gradwatch.aggregator.pace import rank_paces
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.runstate import RunState
from gradwatch.aggregator.state import State
from gradwatch.logs import DedupLog
from gradwatch.streams import (
    AGGREGATOR_GROUP,
    RUNS_KEY,
    dead_letter_key,
    registrations_key,
    reports_key,
    valid_run_id,
)
from gradwatch.v1 import report_pb2

log = logging.getLogger("gradwatch.aggregator")
BACKOFF_CAP_S = 5.0
# After a failed registration lookup, reports of unknown ranks skip it for this long instead of
# waiting on a dead Redis one by one.
FETCH_RETRY_S = 5.0
COMPACT_INTERVAL_S = 5.0  # how often runs' old history steps are folded into tiers


class Aggregator:
    """One aggregator process: `start()` runs the loop on a daemon thread, `stop()` ends it after the
    current batch; tests drive it with `run_once()`. Metrics go to `registry` (a fresh one if None)."""

    def __init__(self, config: AggregatorConfig, registry: CollectorRegistry | None = None, *,
                 client: redis.Redis | None = None):
        self.config = config
        self.counters = Counters()
        self._own_client = client is None
        self.client = client or connect(config)  # one Redis, or a Redis Cluster (aggregator/ingest/client.py)
        self._lock = threading.Lock()  # state and rules: the consumer writes, scrapes read
        self.state = State(config, self.counters, self._fetch_registration)
        self.history_store = HistoryStore(self.client)  # runs' step history in Redis (aggregator/history.py)
        self.frame_history = FrameHistory(self.client)  # ... and the same frames in Redis (aggregator/frames.py)
        # every training report's histograms, thinned: the live view's animation
        self.frames = FrameStore(load=lambda run: self.frame_history.load(run)[1])
        self.rules = RuleEngine(config, self.counters, client=self.client)  # OutOfRange reads the runs' ranges
        self.sink = AlertSink(self.client, config, self.counters)
        self.leases = Leases(self.client, config.consumer, config.lease_ttl_ms)
        self.retention = Retention(self.client, config.history_retention_s)  # runs' keys expire (lifecycle.py)
        self.holds = Holds()  # parts of open steps, acked when the join closes them (aggregator/ingest/holds.py)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.backlog = BacklogMeter(self.client, self.counters)  # how far behind the held streams (backlog.py)
        self.registry.register(AggregatorCollector(self.view, config, self.backlog.read))
        self._streams: dict[str, str] = {}  # stream key -> run id, for the runs this replica holds
        self._cursors: dict[str, str] = {}  # stream key -> XAUTOCLAIM cursor, carried between sweeps
        self._next_discover = 0.0
        self._next_claim = 0.0
        self._fetch_retry_at = 0.0
        self._failures = 0
        self._compact_at = 0.0
        self._errors = DedupLog(log)
        self._stop = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.committer = Committer(  # the fenced commit of each batch (aggregator/ingest/commit.py)
            config, self.client, self.counters, self._errors, lock=self._lock, state=self.state, rules=self.rules,
            frames=self.frames, history_store=self.history_store, frame_history=self.frame_history, sink=self.sink,
            leases=self.leases, holds=self.holds, streams=self._streams, stop=self._stop, drop=self._drop,
            rediscover=self._rediscover, backoff=self._backoff, recovered=self._recovered)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Aggregator:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gradwatch-aggregator", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes the current batch (its acks included), stops Alertmanager pushes. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self.sink.shutdown(max(0.0, deadline - time.monotonic()))
        if not (self._thread and self._thread.is_alive()):
            self.leases.release_all()  # the last batch is acked: hand the runs over now, not after the TTL
            if self._own_client:
                self.client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a bug must not silence every run's alerts: log, pause, go on
                self._errors.log(logging.ERROR, "loop", "unexpected error in the aggregator loop; continuing",
                                 exc_info=True)
                self._stop.wait(1.0)

    # -- one iteration ------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Discovery and claiming when due, then one read of the held streams (one XREADGROUP, or one per slot
        on a cluster: aggregator/ingest/read.py); returns the number of entries handled."""
        try:
            now = time.monotonic()
            handled = 0
            if now >= self._next_discover:
                self._expire()
                handled += self._discover()
                self._idle()
                self._retain()
                self.backlog.update(self._streams)
                self._next_discover = now + self.config.discover_interval_s
            if now >= self._next_claim and self._streams:
                handled += self._claim()
                self._next_claim = now + self.config.claim_interval_s
            handled += self._read()
            self._failures = 0
            return handled
        except REDIS_ERRORS as e:
            self.counters.add("redis_errors")
            if "NOGROUP" in str(e):  # a stream or its group was deleted (the run too?): read each run again
                for run in list(self._streams.values()):
                    self._drop(run, "its stream or consumer group is gone")
                self._next_discover = 0.0
            self._errors.log(logging.WARNING, f"loop:{type(e).__name__}", "Redis error: %s; retrying", e)
            self._backoff()
            return 0

    def _backoff(self) -> None:
        self._failures += 1
        self._stop.wait(min(BACKOFF_CAP_S, 0.1 * 2 ** min(self._failures, 10)))

    def _recovered(self) -> None:
        self._failures = 0

    def _rediscover(self) -> None:
        self._next_discover = 0.0

    def _discover(self) -> int:
        """Balances the leases over the active runs; a run just taken over has its watermarks restored
        and the entries its previous owner left pending processed first. Returns entries handled."""
        # Only runs written to within run_expiry_s: finished runs of last month are not read again.
        raw = self.client.zrangebyscore(RUNS_KEY, time.time() - self.config.run_expiry_s, "+inf")
        active: list[str] = []
        for member in raw:
            run = member.decode(errors="replace") if isinstance(member, bytes) else str(member)
            if valid_run_id(run):
                active.append(run)
            else:
                self._errors.log(logging.WARNING, "bad-run-id", "ignoring invalid run id %r in %s", run, RUNS_KEY)
        gained, lost = self.leases.balance(active)
        for run in lost:
            self._drop(run, "its lease went to another replica" if run in active else "it is no longer active")
        handled = 0
        for i, run in enumerate(gained):
            key = reports_key(run)
            try:
                try:
                    # From "0": a run's entries written before this group existed are processed too.
                    self.client.xgroup_create(key, AGGREGATOR_GROUP, id="0", mkstream=True)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
                checkpoint = self.leases.checkpoint(run)
                rows = self.history_store.rows(run, limit=self.config.history_reports)
                registrations = list(self.client.hgetall(registrations_key(run)).values())
                stride, frames = self.frame_history.load(run)
            except BaseException:
                # Not set up (Redis away): held but unread, these runs would never be set up again. Out of
                # `held`, the next discovery gains them again (the lease is ours: acquiring it succeeds).
                for rest in gained[i:]:
                    self.leases.held.discard(rest)
                raise
            with self._lock:
                self.state.restore(run, checkpoint)
                self.state.restore_history(run, rows, registrations)
            self.frames.restore(run, stride, frames)
            self._streams[key] = run
            self._cursors[key] = "0-0"
            log.info("following run %s%s", run, " (taken over)" if checkpoint else "")
            # Whatever another consumer read and never acked is ours now: before any new entry.
            handled += self._claim_stream(key, run, min_idle_ms=0)
        return handled

    def _drop(self, run: str, why: str) -> None:
        """Stops following a run: its state and incidents go (the next owner rebuilds them)."""
        key = reports_key(run)
        self._streams.pop(key, None)
        self._cursors.pop(key, None)
        self.leases.held.discard(run)  # the lease stays ours until it expires: the next discovery may re-gain it
        self.leases.committed.pop(run, None)
        self.holds.forget(run, key)
        with self._lock:
            self.state.forget(run)
            self.rules.forget(run)
        self.frames.forget(run)
        self.frame_history.forget(run)
        self.history_store.forget(run)
        self.sink.forget(run)
        log.info("no longer following run %s: %s", run, why)

    def _expire(self) -> None:
        with self._lock:
            gone = self.state.expire()
            for run in gone:
                self.rules.forget(run)
        for run in gone:
            self.sink.forget(run)
            self.frames.forget(run)
            log.info("run %s expired: no report for %.0f s", run, self.config.run_expiry_s)

    def _read(self) -> int:
        if not self._streams:
            self._stop.wait(self.config.block_ms / 1000)
            return 0
        response = read_new(self.client, self.config.consumer, self._streams, self.config.read_count,
                            self.config.block_ms, self._stop.wait)
        self.committer.renewed_at = time.monotonic()  # renewed by the last commit or discovery: at most an interval ago
        batch = Batch()
        handled = 0
        for key, entries in response:
            key = key.decode() if isinstance(key, bytes) else key
            run = self._streams.get(key)
            if run is not None:
                handled += self._handle(key, run, entries, batch)
        self.committer.commit(batch)
        return handled

    def _claim(self) -> int:
        """Takes over entries idle for claim_idle_ms: their consumer died between read and ack."""
        return sum(self._claim_stream(key, run, self.config.claim_idle_ms) for key, run in list(self._streams.items()))

    def _claim_stream(self, key: str, run: str, min_idle_ms: int) -> int:
        handled = 0
        budget = 10 * self.config.read_count  # bounded work per sweep; the carried cursor resumes it
        while budget > 0 and key in self._streams:
            cursor, entries, done = autoclaim(self.client, key, self.config.consumer, min_idle_ms,
                                              self._cursors.get(key, "0-0"), self.config.read_count)
            self._cursors[key] = cursor
            held = self.holds.ids(key)
            entries = [e for e in entries if e[0] not in held]  # ours, waiting for their step: not taken back
            if entries:
                self.counters.add("claimed", len(entries))
                batch = Batch()
                handled += self._handle(key, run, entries, batch)
                self.committer.commit(batch)
            budget -= self.config.read_count
            if done:
                break
        return handled

    def _idle(self) -> None:
        """Time-driven rules (StalledTraining) and joined steps that timed out: their alerts are written
        like any other."""
        batch = Batch()
        with self._lock:
            batch.alerts = self.rules.evaluate_idle(time.time())
            self.state.expire_joins()  # steps still waiting for a rank after join_timeout_s
            batch.alerts += self._joined(batch)
        self.committer.commit(batch)  # and the history rows and held entries of steps that timed out
        self._compact()

    def _retain(self) -> None:
        """A page of the retention sweep when one is due (aggregator/lifecycle.py); a failed page is read again."""
        try:
            self.retention.tick()
        except REDIS_ERRORS as e:
            self.counters.add("redis_errors")
            self._errors.log(logging.WARNING, "retention", "cannot set the runs' expiry: %s", e)

    def _compact(self) -> None:
        """Folds each followed run's old history steps into tiers (aggregator/history.py), a bounded batch per
        run and pass, at most every COMPACT_INTERVAL_S."""
        now = time.monotonic()
        if now < self._compact_at:
            return
        self._compact_at = now + COMPACT_INTERVAL_S
        with self._lock:
            latest = {run: rs.step for run, rs in self.state.runs.items() if rs.step > self.config.history_full_steps}
        for run, step in latest.items():
            try:
                self.history_store.compact(run, step, self.config.history_full_steps, self.config.history_alert_window)
            except REDIS_ERRORS as e:
                self.counters.add("redis_errors")
                self._errors.log(logging.WARNING, "compact", "cannot fold the history of %s into tiers: %s", run, e)

    def _joined(self, batch: Batch) -> list[Alert]:
        """The steps the join closed (under the lock): their held entries join the batch's acks, their merged
        tensors become snapshot frames, and the rules judge them."""
        alerts: list[Alert] = []
        for joined in self.state.take_closed():
            released = self.holds.release(joined.run, joined.step)
            if released:
                applied = batch.applied.setdefault(joined.run, Applied())
                for held in released:
                    batch.acks.setdefault(held.stream, []).append(held.entry_id)
                    applied.reports += 1
                    applied.summaries += held.summaries
                    applied.ranks.add(held.rank)
            if joined.merged is not None and joined.merged.by_kind:
                self.frames.add(joined.run, joined.step, joined.merged.by_kind)
            alerts += self.rules.evaluate_joined(joined)
        return alerts

    # -- entries ------------------------------------------------------------------------------------

    def _handle(self, key: str, run: str, entries: list, batch: Batch) -> int:
        acks = batch.acks.setdefault(key, [])
        applied = batch.applied.setdefault(run, Applied())
        for i, (entry_id, fields) in enumerate(entries):
            if i % 16 == 15:
                self.committer.keep_leases(batch)
            try:
                alerts, hold = self._apply(run, fields or {}, applied, batch)
                batch.alerts.extend(alerts)
                if hold is not None:
                    self.holds.hold(run, hold[0], Held(key, entry_id, *hold[1:]))
                    continue
            except Exception as e:  # undecodable or unexpected: park it, never retry it forever
                self.counters.add("decode_errors")
                reason = f"{type(e).__name__}: {e}"[:300]
                self._errors.log(logging.WARNING, f"entry:{run}:{type(e).__name__}",
                                 "cannot process entry %s of %s (%s); moved to %s", entry_id, key, reason,
                                 dead_letter_key(run))
                batch.dead.append((dead_letter_key(run), dead_letter(fields or {}, key, entry_id, reason)))
            acks.append(entry_id)
        return len(entries)

    def _apply(self, run: str, fields: dict, applied: Applied,
               batch: Batch) -> tuple[list[Alert], tuple[int, int, int, int] | None]:
        """Applies one entry: its alerts, and (step, rank, sequence, summaries) when it is a part of a step still
        open in the join, to be held (aggregator/ingest/holds.py) rather than acked."""
        item = decode_entry(run, fields)
        with self._lock:
            if isinstance(item, report_pb2.StepReport):
                applied.ranks.add(item.rank)  # a repeat too: the commit checks its rank's watermark still holds
                view = self.state.apply(run, item)
                if view is None:
                    return [], None
                rs = self.state.runs[run]
                lost = self._agent_lost(rs, item) if item.dropped_reports else []
                hold = None
                if view.joined and rs.join is not None and view.step in rs.join.open:
                    hold = (view.step, item.rank, item.sequence, len(item.tensors))
                else:
                    applied.reports += 1
                    applied.summaries += len(item.tensors)
                if view.train and not view.joined and not view.late and (
                        view.rank == 0 or view.rank == min(rs.ranks)):
                    self.frames.add(run, view.step, view.by_kind)  # a single-rank run's (or an unjoined) step
                alerts = lost + self.rules.evaluate(view)
                if self.state.closed:  # steps of a multi-rank run this report completed
                    alerts += self._joined(batch)
                return alerts, hold
            self.state.register(run, item)
            return [], None

    def _agent_lost(self, rs: RunState, report: report_pb2.StepReport) -> list[Alert]:
        """The reports an agent lost before delivery, as this (first-time) report says: counted, kept with the run,
        alerted (AgentDataLost). Caller holds the lock."""
        n = report.dropped_reports
        self.counters.add("agent_lost", n)
        rs.reports_lost += n
        self._errors.log(logging.WARNING, f"agent_lost:{rs.run}", "run %s rank %d lost %d step report(s) before "
                         "delivery (%d in all for the run): see its agent's counters (dropped, skipped_busy)", rs.run,
                         report.rank, n, rs.reports_lost)
        return self.rules.agent_lost(rs.run, report.rank, n, rs.reports_lost, rs.step, time.time())

    def _fetch_registration(self, run: str, rank: int) -> bytes | None:
        now = time.monotonic()
        if now < self._fetch_retry_at:
            raise redis.ConnectionError("registration lookup paused after a Redis error")
        try:
            return self.client.hget(registrations_key(run), str(rank))
        except REDIS_ERRORS as e:
            self._fetch_retry_at = now + FETCH_RETRY_S
            self.counters.add("redis_errors")
            self._errors.log(logging.WARNING, "hget", "cannot look up the registration of %s rank %d: %s",
                             run, rank, e)
            raise

    # -- metrics ------------------------------------------------------------------------------------

    def history(self, run: str, first: int | None, last: int | None, limit: int) -> list[dict] | None:
        """Rows from memory when it holds the range; else from Redis (a run this replica does not follow, or
        steps before the latest history_reports). None when neither knows the run."""
        with self._lock:
            rs = self.state.runs.get(run)
            if rs is not None and rs.history:
                whole = len(rs.history) < (rs.history.maxlen or 0)  # every row since this run was followed
                if whole or (first is not None and first >= rs.history[0][0]) or (
                        first is None and limit <= len(rs.history)):
                    return views.history_rows(rs, first, last, limit)
        try:
            rows = self.history_store.rows(run, first, last, limit)
        except REDIS_ERRORS as e:
            self.counters.add("redis_errors")
            self._errors.log(logging.WARNING, "history", "cannot read the history of %s: %s", run, e)
            rows = []
        if not rows and rs is None:
            return None
        return views.rows_of(rows)

    def topology(self, run: str) -> dict | None:
        with self._lock:
            return views.topology(self.state.runs.get(run))

    def view(self) -> AggregatorView:
        """A consistent copy for one scrape: the lock is held only while copying."""
        with self._lock:
            runs = self.state.views()
            ranks = rank_paces(self.state)
            firing = self.rules.firing()
            series = self.state.layer_series
        values, raised = self.counters.read()
        alerts = {rule.name: 0 for rule in self.rules.rules}  # every rule's series exists from the start
        alerts.update(raised)
        return AggregatorView(runs, firing, values, alerts, series, self.config.max_histogram_layers, ranks,
                              time.time())
