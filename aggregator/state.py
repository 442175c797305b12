"""Per-run state built from registrations and step reports: what /metrics shows and what rules see.

Each report is applied on its own (cross-rank joins come later), at most once per (run, rank,
sequence), within a fixed budget of layer series, and runs that stop reporting expire. A report may
hold no tensors (a step that was not due, sent for its NaN/Inf origins): it moves the step, the loss
and the rules on, and leaves the tensor gauges and the latest summaries as they were.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.ingest.sequence import SequenceTracker
from gradwatch.aggregator.join import JoinedStep, StepJoin
from gradwatch.aggregator.merge import figures, merge_reports, nonfinite_only
from gradwatch.aggregator.report import ReportView, TensorMeta, origins_of, unknown_tensor
from gradwatch.aggregator.runstate import LayerState, RankState, RunState, RunView, curve_scalars
from gradwatch.logs import DedupLog
from gradwatch.names import EVAL, GRADCHECK_PASSED, GRADCHECK_PREFIX, TRAIN
from gradwatch.v1 import report_pb2, run_pb2

log = logging.getLogger("gradwatch.aggregator")
MIN_HISTORY_ROWS = 100  # steps a run keeps in memory however many runs share history_memory_cells


def history_rows(cells: int, runs: int, layers: int, most: int) -> int:
    """Steps of history a run of `layers` layers keeps in memory when `runs` runs share `cells` layer-steps (0: no
    budget): at most `most` (history_reports), at least MIN_HISTORY_ROWS."""
    return min(most, max(MIN_HISTORY_ROWS, cells // max(1, runs) // max(1, layers))) if cells else most


class State:
    """All runs this aggregator follows. Not thread-safe: the consumer serialises access."""

    def __init__(self, config: AggregatorConfig, counters: Counters,
                 fetch_registration: Callable[[str, int], bytes | None] | None = None):
        self.config = config
        self.counters = counters
        # Raises on a transient error (the fetch is retried on the next report), None when absent.
        self._fetch_registration = fetch_registration
        self.runs: dict[str, RunState] = {}
        self.layer_series = 0
        self._over_budget = DedupLog(log, math.inf, suffix=None)  # one line per run that met the layer-series budget
        self.closed: list[JoinedStep] = []  # steps the join closed, for the cross-rank rules: take_closed()

    def register(self, run: str, reg: run_pb2.RunRegistration, restored: bool = False) -> None:
        rs = self._run(run)
        rank = rs.ranks.setdefault(reg.rank, RankState())
        start_ns = reg.start_time.ToNanoseconds() if reg.HasField("start_time") else 0
        if restored:
            # Read back from Redis for its metadata only: the sequence numbering follows the checkpoint and
            # the registrations the stream delivers.
            if rank.dictionary is not None:
                return
        elif start_ns and rank.start_ns:  # rank.start_ns: from an earlier registration or a checkpoint
            if start_ns < rank.start_ns and rank.dictionary is not None:
                return  # a redelivered registration of an earlier agent process
            if start_ns > rank.start_ns:
                # A restarted agent numbers its reports from 1 again.
                rank.seq = SequenceTracker()
                rank.rate.clear()
        if not restored:
            rank.start_ns = max(start_ns, rank.start_ns)
        rank.dictionary = {t.id: TensorMeta.of(t.name, t.kind, t.module_path or t.name, t.order, tuple(t.shape),
                                               t.partition, t.dtype) for t in reg.tensors}
        order: dict[str, int] = {}
        for meta in rank.dictionary.values():
            order[meta.layer] = min(order.get(meta.layer, meta.order), meta.order)
        rank.layer_order = order
        if len(order) > rs.layer_count:
            rs.layer_count = len(order)
            self.size_history()
        rank.host = reg.host
        rank.fetched = True
        rs.world_size = max(rs.world_size, reg.world_size)
        if reg.HasField("topology") and reg.topology.nodes and (rs.topology is None or reg.rank == 0):
            rs.topology = reg.topology
        if reg.rank == 0 or not rs.hyperparameters:
            rs.hyperparameters = {k: getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
                                  for k, v in reg.hyperparameters.items()}
            rs.labels = dict(reg.labels)
        if not restored:  # one read back from Redis at a takeover is not a new registration
            self.counters.add("registrations")

    def apply(self, run: str, report: report_pb2.StepReport) -> ReportView | None:
        """Applies one report; None when this (run, rank, sequence) was applied before."""
        rs = self._run(run)
        rank = rs.ranks.setdefault(report.rank, RankState())
        if not rank.seq.first_time(report.sequence):
            self.counters.add("duplicates")
            return None
        if report.final:  # the rank closed its watcher: no statistics, only the end of its run
            rs.last_seen = time.monotonic()
            return ReportView(run, report.rank, report.step, time.time(), None, {}, None, [], rank.layer_order,
                              applied_at=time.time(), final=True)
        if rank.dictionary is None and not rank.fetched:
            self._fetch(run, report.rank, rank)
        dictionary = rank.dictionary
        if dictionary is None:
            self.counters.add("unregistered_reports")
            dictionary = {}

        by_kind: dict[int, list[tuple[TensorMeta, report_pb2.TensorSummary]]] = {}
        for s in report.tensors:
            meta = dictionary.get(s.tensor_id) or unknown_tensor(s.tensor_id)
            group = by_kind.get(meta.kind)
            if group is None:
                group = by_kind[meta.kind] = []
            group.append((meta, s))
        # A training report of a multi-rank run is one rank's part of a step: the per-layer picture (norms,
        # tensors, loss, history) moves when the join closes the step, merged over every rank (_closed), and
        # the rules judge the merge; of the part itself only its NaN/Inf evidence is read (NonFinite).
        part = rs.world_size > 1 and report.phase != report_pb2.PHASE_EVAL
        f = nonfinite_only(by_kind) if part else figures(by_kind)

        step = report.step
        now = time.time()
        t = report.capture_time.seconds + report.capture_time.nanos * 1e-9 if report.HasField("capture_time") else now
        train = report.phase != report_pb2.PHASE_EVAL
        global_norm = f.global_grad_norm
        loss = report.loss if report.HasField("loss") else None
        scalars = dict(report.scalars) if report.scalars else {}
        if step >= rs.step:  # a late redelivery must not move the gauges backwards
            rs.step = step
            rs.phase = TRAIN if train else EVAL
            if loss is not None and not part:
                if train:
                    rs.loss = loss
                else:
                    rs.eval_loss = loss
            if report.learning_rates:
                rs.learning_rate = report.learning_rates[0]
            if global_norm is not None and not part:
                rs.grad_norm = global_norm
            rs.last_report_time = t
            if scalars:
                if train:
                    rs.scalars = scalars
                else:  # a gradient check's verdict stays until the next check replaces it
                    kept = {k: v for k, v in rs.eval_scalars.items() if k.startswith(GRADCHECK_PREFIX)}
                    rs.eval_scalars = {**kept, **scalars} if kept and GRADCHECK_PASSED not in scalars else scalars
            if by_kind and train and not part:
                rs.tensors = by_kind  # a reference: layer health and histograms are derived at scrape time
        rs.last_seen = time.monotonic()
        if train and (not rank.rate or step > rank.rate[-1][1]):
            rank.rate.append((t, step))
        self.counters.add("reports")

        grad_norms = {} if part else self._layers(rs, step, f.grad_norms, f.param_norms, f.nonfinite)
        lr = max(report.learning_rates) if report.learning_rates else None
        origins = origins_of(report) if report.nonfinite_origins else ()
        view = ReportView(run, report.rank, step, t, loss, grad_norms, global_norm, f.bad, rank.layer_order, by_kind,
                          train, lr, now, scalars=scalars, origins=origins, host=rank.host)
        if part:
            self._join(rs, view)
        elif report.rank == 0 or report.rank == min(rs.ranks):  # the lowest rank's reports
            rs.add_row((step, t, train, loss, global_norm, grad_norms, curve_scalars(scalars), f.param_norms))
        return view

    def _layers(self, rs: RunState, step: int, grads: dict[str, float], params: dict[str, float],
                nonfinite: dict[str, dict[str, int]]) -> dict[str, float]:
        """Moves the run's per-layer series to this step's norms (a single rank's report, a joined step's
        merge, or a history row read back), within the layer-series budget; returns layer -> gradient norm of
        the layers kept."""
        kept: dict[str, float] = {}
        dropped = 0
        for layer, kinds in nonfinite.items():
            ls = rs.layers.get(layer)
            if ls is None:
                if self.layer_series >= self.config.max_layer_series:
                    dropped += 1
                    continue
                ls = rs.layers[layer] = LayerState()
                self.layer_series += 1
            grad = grads.get(layer)
            if grad is not None:
                kept[layer] = grad
            if step < ls.step:
                continue
            ls.step = step
            if grad is not None:
                ls.grad_norm = grad
            if layer in params:
                ls.param_norm = params[layer]
            ls.nonfinite.update(kinds)
        if dropped:
            self.counters.add("series_dropped", dropped)
            self._over_budget.log(logging.WARNING, rs.run, "run %s: %d layers (and any more it reports) left without "
                                  "per-layer series: the state holds max_layer_series (%d) layers of all runs "
                                  "together; counted in gradwatch_aggregator_series_dropped_total "
                                  "(GRADWATCH_AGGREGATOR_MAX_LAYER_SERIES)",
                                  rs.run, dropped, self.config.max_layer_series)
        return kept

    def _join(self, rs: RunState, view: ReportView) -> None:
        if rs.join is None:
            rs.join = StepJoin(rs.run)
        late = rs.join.late
        self._closed(rs, rs.join.add(view, rs.world_size))
        if rs.join.late > late:
            view.late = True
            self.counters.add("late_reports")
        else:
            view.joined = True

    def _closed(self, rs: RunState, steps: list[JoinedStep]) -> None:
        for joined in steps:
            self.counters.add("steps_joined")
            if joined.reason != "complete":
                self.counters.add("steps_incomplete")
            views = [p.view for _, p in sorted(joined.parts.items()) if p.view is not None]
            if not views:
                continue
            merged, f = merge_reports(views)
            joined.merged = merged
            params = f.param_norms
            grad_norms = self._layers(rs, joined.step, f.grad_norms, params, f.nonfinite)
            if rs.last_joined is None or joined.step >= rs.last_joined.step:
                rs.last_joined = joined
                norm = joined.global_grad_norm
                if norm is not None:
                    rs.grad_norm = norm  # sharded gradients: the norm over every rank's shard
                if merged.loss is not None:
                    rs.loss = merged.loss
                if merged.by_kind:
                    rs.tensors = merged.by_kind
            rs.add_row((joined.step, merged.time, True, merged.loss, joined.global_grad_norm, grad_norms,
                        curve_scalars(merged.scalars), params))
        self.closed.extend(steps)

    def expire_joins(self, now: float | None = None) -> None:
        """Closes the steps that waited join_timeout_s for a rank; the consumer calls it periodically."""
        for rs in self.runs.values():
            if rs.join is not None and rs.join.open:
                self._closed(rs, rs.join.expire(rs.world_size, self.config.join_timeout_s, now))

    def take_unsaved(self) -> dict[str, list[tuple]]:
        """run -> history rows added since the last call, for the service to write before it acks."""
        out = {}
        for run, rs in self.runs.items():
            if rs.unsaved:
                out[run], rs.unsaved = rs.unsaved, []
        return out

    def restore_history(self, run: str, rows: list[tuple], registrations: list[bytes]) -> None:
        """A run taken over or found again after a restart: its registrations (topology, hyperparameters,
        layer order) and the latest rows of its history, from Redis; the latest training row sets the
        run's loss, gradient norm, scalars and per-layer norms until new reports arrive. A run nothing was
        applied of yet (no checkpoint, no history) is left to its stream."""
        rs = self._run(run)
        if not rows and not any(rank.start_ns for rank in rs.ranks.values()):
            return
        for raw in registrations:
            try:
                reg = run_pb2.RunRegistration.FromString(raw)
            except DecodeError:
                self.counters.add("decode_errors")
                continue
            if reg.run_id in ("", run):
                self.register(run, reg, restored=True)
        if not rows:
            return
        known = {(row[0], row[2]) for row in rs.history}
        rs.history.extend(row for row in rows if (row[0], row[2]) not in known)
        ordered = sorted(rs.history, key=lambda row: (row[0], not row[2]))
        rs.history.clear()
        rs.history.extend(ordered)
        train = [row for row in ordered if row[2]]
        if not train or train[-1][0] < rs.step:
            return
        step, t, _, loss, norm, grads, curve, params = train[-1][:8]
        rs.step, rs.loss, rs.grad_norm, rs.last_report_time = step, loss, norm, t
        rs.scalars = dict(curve) if curve and not rs.scalars else rs.scalars
        self._layers(rs, step, grads, params, {layer: {} for layer in set(grads) | set(params)})

    def take_closed(self) -> list[JoinedStep]:
        out, self.closed = self.closed, []
        return out

    def restore(self, run: str, checkpoint: dict[int, tuple[int, int]]) -> None:
        """Sequence watermarks committed by this run's previous owner: what it applied is not applied
        again. checkpoint: rank -> (agent start ns, highest sequence applied)."""
        rs = self._run(run)
        for rank_id, (start_ns, high) in checkpoint.items():
            rank = rs.ranks.setdefault(rank_id, RankState())
            if start_ns >= rank.start_ns:
                rank.start_ns = start_ns
                rank.seq.high = max(rank.seq.high, high)

    def watermarks(self, run: str, ranks: set[int]) -> dict[int, tuple[int, int]]:
        """rank -> (agent start ns, highest sequence applied), for the commit."""
        rs = self.runs.get(run)
        if rs is None:
            return {}
        return {r: (rank.start_ns, rank.seq.high) for r in ranks if (rank := rs.ranks.get(r)) is not None}

    def expire(self, now: float | None = None) -> list[str]:
        """Forgets runs without a report for run_expiry_s; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [r for r, rs in self.runs.items() if now - rs.last_seen > self.config.run_expiry_s]
        for run in gone:
            self.forget(run)
        if gone:
            self.counters.add("runs_expired", len(gone))
        return gone

    def forget(self, run: str) -> None:
        rs = self.runs.pop(run, None)
        if rs is not None:
            self.layer_series -= len(rs.layers)
            self.size_history()

    def size_history(self) -> None:
        """Shares history_memory_cells out among the runs held: each keeps min(history_reports, max(MIN_HISTORY_ROWS,
        cells / runs / its layers)) steps in memory (RunState.history, a cache of Redis' history: a query beyond it
        reads Redis). Called when a run comes, goes or registers more layers."""
        for rs in self.runs.values():
            rs.keep_rows(history_rows(self.config.history_memory_cells, len(self.runs), rs.layer_count,
                                      self.config.history_reports))

    def views(self) -> list[RunView]:
        out = []
        for rs in self.runs.values():
            sps = next((v for _, r in sorted(rs.ranks.items()) if (v := r.steps_per_second()) is not None), None)
            layers = tuple((name, ls.grad_norm, ls.param_norm, tuple(ls.nonfinite.items()))
                           for name, ls in rs.layers.items())
            out.append(RunView(rs.run, rs.step, rs.loss, rs.eval_loss, rs.learning_rate, rs.grad_norm, sps,
                                   rs.last_report_time, layers, rs.world_size, tuple(sorted(rs.ranks)),
                                   rs.last_joined, rs.scalars, rs.eval_scalars, rs.tensors, rs.hyperparameters,
                                   rs.labels, rs.reports_lost))
        return out

    def _run(self, run: str) -> RunState:
        rs = self.runs.get(run)
        if rs is None:
            rs = self.runs[run] = RunState(run, self.config.history_reports)
            self.size_history()
        return rs

    def _fetch(self, run: str, rank_id: int, rank: RankState) -> None:
        """The registration entry may have been trimmed from the stream or read by another replica:
        ask the registrations hash, once per (run, rank)."""
        if self._fetch_registration is None:
            rank.fetched = True
            return
        try:
            raw = self._fetch_registration(run, rank_id)
        except Exception:  # transient (Redis down): retried on the next report
            return
        rank.fetched = True
        if not raw:
            return
        try:
            reg = run_pb2.RunRegistration.FromString(raw)
        except DecodeError:
            self.counters.add("decode_errors")
            return
        if reg.rank == rank_id and reg.run_id in ("", run):
            self.register(run, reg)
