"""The agent's bounded pipeline between the training thread and the network.

  training thread --submit()--> pending (bounded by the host slots) --reader thread--> reports
  (bounded deque, drop oldest, counted) --exporter thread--> Export RPC

The report queue has two bounds, a count (queue_size) and a memory budget (queue_bytes: the encoded
size of the reports held, waiting or in the batch being exported); exceeding either drops the oldest.

submit() never blocks. The reader waits for each step's device->host copy (an event, off the training
thread) and encodes it (an item may make no report: a step whose NaN/Inf check found nothing). The
exporter batches reports, retries under one deadline and puts a batch back at the front of the queue
when the collector is unreachable, so a short outage loses nothing while a long one costs the oldest
reports, counted. A report with a NaN/Inf origin or a non-finite loss wakes the exporter at once
(`flush_nonfinite`): an alert must not wait for the batch to fill or the interval to pass.

shutdown(timeout) is one deadline: the flush, every export and backoff it starts, and the joins all end
by it; then the exporter is shut down (an RPC in flight cancelled) and what is left counts as dropped.
Export failures during the flush are not logged one by one: a single warning at the end says how many
reports were not delivered, to which collector, and why.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from gradwatch.agent.config import DEFAULT_QUEUE_BYTES
from gradwatch.agent.export.counters import AgentCounters
from gradwatch.agent.export.exporter import Exporter
from gradwatch.logs import DedupLog
from gradwatch.v1 import ingest_service_pb2, report_pb2, run_pb2

log = logging.getLogger("gradwatch.agent")


def _nonfinite(report: report_pb2.StepReport) -> bool:
    """Where NaN/Inf was born, a non-finite loss, or NaN/Inf in a watched tensor: what an alert is raised on.
    The last one matters on multi-rank runs: a rank whose gradients turned NaN in the all-reduce has no
    origin of its own, and the aggregator judges the step only once every rank's report is in."""
    if report.nonfinite_origins or (report.HasField("loss") and not math.isfinite(report.loss)):
        return True
    return any(t.nan_count or t.inf_count for t in report.tensors)


def _steps(items) -> int:
    """How many of these are step reports: the agent's final end-of-run marker is not one."""
    return sum(not getattr(item, "final", False) for item in items)


class ReportPipeline:
    def __init__(self, exporter: Exporter, encode: Callable[[object], report_pb2.StepReport],
                 registration: run_pb2.RunRegistration, counters: AgentCounters, *, queue_size: int,
                 batch_reports: int, batch_bytes: int, export_interval_s: float,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES, snapshots=None, flush_nonfinite: bool = True):
        self._exporter = exporter
        self._snapshots = snapshots  # agent/capture/snapshots.py SnapshotTaker: requests in, captured snapshots out
        self._encode = encode
        self._registration = registration
        self._registered = False
        self.counters = counters
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._batch_reports = batch_reports
        self._batch_bytes = batch_bytes
        self._interval = export_interval_s
        self._flush_nonfinite = flush_nonfinite
        self._pending: deque = deque()
        self._reports: deque[tuple[report_pb2.StepReport, int]] = deque()  # (report, its encoded size)
        self._waiting_bytes = 0   # sum of the sizes in _reports
        self._inflight_bytes = 0  # the batch the exporter thread holds (at most batch_bytes)
        self._lock = threading.Lock()
        self._wake_reader = threading.Event()
        self._wake_exporter = threading.Event()
        self._stopping = threading.Event()
        self._busy = 0  # items taken off a queue but not yet finished (for force_flush)
        # One line per error, again only after a different one: a dead collector must not flood the job's log.
        self._errors = DedupLog(log, math.inf, max_keys=1, suffix=None)
        self._dropped_reported = 0  # counters.dropped already announced to the collector
        self._deadline: float | None = None  # time.monotonic() by which shutdown() ends: caps every export
        self._failure: str | None = None  # code of the last failed export since the last success ("": none)
        self._inflight_steps = 0  # step reports in the batch being exported
        self._settled = False  # shutdown() counted what was left: late results change no counter
        self._dead = False
        self._threads = [
            threading.Thread(target=self._read_loop, name="gradwatch-reader", daemon=True),
            threading.Thread(target=self._export_loop, name="gradwatch-exporter", daemon=True),
        ]
        for t in self._threads:
            t.start()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (p := ref()) and p._after_fork())

    def set_registration(self, registration: run_pb2.RunRegistration) -> None:
        """Replace the registration (sent with the next export until one succeeds)."""
        with self._lock:
            self._registration = registration
            self._registered = False

    def _after_fork(self) -> None:
        # A forked child (a DataLoader worker) has no threads and shares the parent's socket: go quiet.
        self._dead = True

    def submit(self, captured) -> None:
        """Hand a captured step to the reader. Never blocks."""
        if self._dead:
            captured.release()
            return
        with self._lock:
            self._pending.append(captured)
        self._wake_reader.set()

    def _read_loop(self) -> None:
        while True:
            self._wake_reader.wait(0.1)
            self._wake_reader.clear()
            while True:
                with self._lock:
                    if not self._pending:
                        break
                    captured = self._pending.popleft()
                    self._busy += 1
                try:
                    report = self._encode(captured)
                    if report is not None:
                        self._offer(report)
                except Exception:
                    self.counters.internal_errors += 1
                    log.exception("gradwatch: could not encode a step report")
                finally:
                    captured.release()
                    with self._lock:
                        self._busy -= 1
            if self._stopping.is_set() and not self._pending:
                return

    @property
    def queued_bytes(self) -> int:
        """Encoded bytes of the reports held: waiting in the queue plus the batch being exported."""
        with self._lock:
            return self._waiting_bytes + self._inflight_bytes

    def _offer(self, report: report_pb2.StepReport) -> None:
        size = report.ByteSize()
        with self._lock:
            self._reports.append((report, size))
            self._waiting_bytes += size
            self._enforce_bounds()
            full = len(self._reports) >= self._batch_reports
        if full or (self._flush_nonfinite and _nonfinite(report)):
            self._wake_exporter.set()

    def _enforce_bounds(self) -> None:
        # Caller holds the lock. The in-flight batch cannot be dropped (validate() keeps it within
        # queue_bytes), so the budget left for waiting reports shrinks while a batch is out.
        budget = self._queue_bytes - self._inflight_bytes
        while self._reports and (len(self._reports) > self._queue_size or self._waiting_bytes > budget):
            report, n = self._reports.popleft()
            self._waiting_bytes -= n
            self.counters.dropped += _steps((report,))

    def _take_batch(self) -> list[report_pb2.StepReport]:
        batch, size = [], 0
        with self._lock:
            while self._reports and len(batch) < self._batch_reports:
                n = self._reports[0][1]
                if not batch and n > self._batch_bytes:
                    report, _ = self._reports.popleft()  # can never fit a request: drop it, counted, go on
                    self._waiting_bytes -= n
                    self.counters.dropped += _steps((report,))
                    self._log_once(f"dropping a {n} B report: larger than batch_bytes ({self._batch_bytes} B)")
                    continue
                if batch and size + n > self._batch_bytes:
                    break
                batch.append(self._reports.popleft()[0])
                self._waiting_bytes -= n
                size += n
            if batch:
                self._busy += 1
                self._inflight_bytes = size
                self._inflight_steps = _steps(batch)
        return batch

    def _export_loop(self) -> None:
        while True:
            self._wake_exporter.wait(self._interval)
            self._wake_exporter.clear()
            if self._stopping.is_set():
                return  # shutdown() flushed what it could and counts the rest
            while batch := self._take_batch():
                try:
                    sent = self._export(batch)
                finally:
                    with self._lock:
                        self._busy -= 1
                        self._inflight_bytes = self._inflight_steps = 0  # delivered, dropped, or queued again
                if not sent:
                    if self._deadline is not None:  # closing: that export had the budget; shutdown() counts the rest
                        self._stopping.wait(max(self._deadline - time.monotonic(), 0))
                    break  # collector unreachable: wait for the next interval
            if self._snapshots is not None and self._snapshots.waiting:
                self._export_snapshots()  # captured between reports, or requests to take: do not wait for one

    def _export(self, batch: list[report_pb2.StepReport]) -> bool:
        # The reports lost since the last delivered one travel with this batch, so the aggregator sees them (its
        # AgentDataLost alert): dropped from the queue, or never made for want of a host slot.
        dropped = self.counters.dropped + self.counters.skipped_busy - self._dropped_reported
        batch[0].dropped_reports = dropped
        request = ingest_service_pb2.ExportRequest(reports=batch)
        snapshots = self._snapshots.take() if self._snapshots is not None else []
        request.snapshots.extend(snapshots)
        with self._lock:
            registration = None if self._registered else self._registration
        if registration is not None:
            request.registrations.append(registration)
        result = self._exporter.export(request, self._deadline)
        self._after_snapshots(result, snapshots)
        with self._lock:
            if self._settled:
                return False  # shutdown() gave up on this batch and counted it as dropped
            if result.ok:
                self._failure = None
                self._dropped_reported += dropped
                if self._registration is registration:  # not replaced while this export was in flight
                    self._registered = True
                self.counters.exported += _steps(batch) - result.rejected_reports
                self.counters.rejected += result.rejected_reports
            else:
                self._failure = result.code or self._failure or ""  # "": cancelled at shutdown, no answer
                self.counters.export_errors += 1
                # The next attempt recomputes the drops to announce, maybe with another report first.
                batch[0].ClearField("dropped_reports")
                if result.retryable:  # back to the front, oldest first; both queue bounds still apply
                    sized = [(r, r.ByteSize()) for r in batch]
                    self._reports.extendleft(reversed(sized))
                    self._waiting_bytes += sum(n for _, n in sized)
                    self._inflight_bytes = 0
                    self._enforce_bounds()
                else:
                    self.counters.dropped += _steps(batch)
        if result.ok:
            if result.rejected_registrations:
                # Reports still flow, but the aggregator will not know this run's tensor names.
                self._log_once(f"collector refused the run registration: {result.error}")
            if result.rejected_reports:
                self._log_once(f"collector refused {result.rejected_reports} report(s): {result.error}")
            return True
        if self._deadline is None:  # while closing, shutdown() sums the failures up in one line
            # Keyed by the code: the details of one outage vary from call to call.
            key = f"export {result.code}" if result.code else None
            self._log_once(f"export to {self._exporter.target} failed: {result.error}", key)
        return False

    def _export_snapshots(self) -> None:
        snapshots = self._snapshots.take()
        if snapshots:
            self._after_snapshots(self._exporter.export(ingest_service_pb2.ExportRequest(snapshots=snapshots),
                                                        self._deadline), snapshots)

    def _after_snapshots(self, result, snapshots: list) -> None:
        if self._snapshots is None:
            return
        if result.ok:
            self._snapshots.request(result.snapshot_requests)
            if result.rejected_snapshots:
                self._log_once(f"collector refused {result.rejected_snapshots} snapshot(s): {result.error}")
        elif result.retryable and snapshots:
            self._snapshots.put_back(snapshots)

    def _log_once(self, message: str, key: str | None = None) -> None:
        self._errors.log(logging.WARNING, key or message, "gradwatch: %s (counting further failures silently)",
                         message)

    def force_flush(self, timeout: float) -> bool:
        """Wait until every submitted step was exported or dropped; False on timeout."""
        if self._dead:
            return True  # a forked child: its parent owns the queue
        deadline = time.monotonic() + timeout
        self._wake_reader.set()
        self._wake_exporter.set()
        while time.monotonic() < deadline:
            with self._lock:
                idle = not self._pending and not self._reports and not self._busy
            if idle:
                return True
            self._wake_exporter.set()
            time.sleep(0.01)
        return False

    def shutdown(self, timeout: float) -> None:
        """Flush, stop the threads and close the channel, all within `timeout` seconds; what is left then
        is dropped, counted, and told in one warning line. Idempotent."""
        if self._stopping.is_set() or self._dead:
            return
        self._deadline = deadline = time.monotonic() + timeout  # from here on every export ends by it
        dropped_before = self.counters.dropped
        self.force_flush(timeout)
        self._stopping.set()
        self._exporter.shutdown()  # interrupts a backoff, cancels an RPC in flight
        self._wake_reader.set()
        self._wake_exporter.set()
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.05))
        with self._lock:
            self._settled = True
            stuck = self._inflight_steps if self._threads[1].is_alive() else 0
            self.counters.dropped += stuck + _steps(r for r, _ in self._reports) + _steps(
                getattr(p, "report", None) or p for p in self._pending)
            self._reports.clear()
            self._waiting_bytes = 0
            self._pending.clear()
            lost = self.counters.dropped - dropped_before
            failure = "" if stuck and self._failure is None else self._failure  # stuck: it never answered
        if lost:
            self._warn_undelivered(lost, failure, timeout)

    def _warn_undelivered(self, lost: int, failure: str | None, timeout: float) -> None:
        # failure: the last failed export's code; "" when it got no answer (cancelled at the deadline);
        # None when the last export succeeded and the queue just did not drain in time.
        state = {None: "too slow", "": "not answering", "UNAVAILABLE": "unreachable (UNAVAILABLE)",
                 "DEADLINE_EXCEEDED": "not answering"}.get(failure, f"failing ({failure})")
        total = self.counters.dropped
        also = f", {total} in all this run" if total > lost else ""
        log.warning("gradwatch: collector %s %s; %d report%s not delivered at close%s (timeout %g s, see "
                    "shutdown_timeout_s)", self._exporter.target, state, lost, "" if lost == 1 else "s", also,
                    timeout)
