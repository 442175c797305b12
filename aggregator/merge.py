"""One step of a multi-rank run as one picture: every rank's report of the step merged by the partition the
agent declared for each tensor (run.proto), so that what /metrics, the API, the heatmap and the rules show
is what the same model, unsharded, in one process would show.

- SHARDED (FSDP, tensor parallel): each rank holds a disjoint part of the tensor, so the parts add up:
  counts, NaN/Inf/zero counts, sums, sums of squares, sums of cubes, histograms and the replica checksum (a
  wrapping sum of the bits, modulo 2^64) add; min and max fold. Under HSDP only the ranks at coordinate 0
  of the replica dims register their shards SHARDED; their copies elsewhere (PER_RANK) are left out.
- PER_RANK data (activations and their gradients, inputs, unit counts): each rank saw its own micro-batch;
  the global batch is their union, so they add up the same way. A PER_RANK parameter, gradient, update or
  optimizer state (an HSDP copy, a Partial placement's pending sum) is the lowest rank's.
- REPLICATED (DDP parameters and all-reduced gradients) and UNSPECIFIED (an agent that did not say): every
  rank holds the same values; they count once, from the lowest rank (RankDivergence checks the agreement).

A tensor's norm reads NaN when it holds a NaN and +Inf when it holds an Inf (report.sum_squares), so a merged
norm over a NaN is NaN, never the norm of the finite rest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gradwatch.aggregator.report import GRADIENT, PARAMETER, UNITS, ReportView, TensorMeta, sum_squares
from gradwatch.stats import HIST_BUCKETS
from gradwatch.v1 import report_pb2, run_pb2

CHECKSUM_MASK = (1 << 64) - 1
SHARDED, REPLICATED = run_pb2.PARTITION_SHARDED, run_pb2.PARTITION_REPLICATED
ADDITIVE = frozenset({SHARDED, run_pb2.PARTITION_PER_RANK})
# Kinds whose per-rank tensors are each rank's own data (its micro-batch): their union is the global batch.
# A per-rank parameter, gradient, update or optimizer state is a copy (HSDP replicas off coordinate 0) or a
# pending sum (a Partial placement): never added.
DATA_KINDS = frozenset({run_pb2.TENSOR_KIND_ACTIVATION, run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT,
                        run_pb2.TENSOR_KIND_INPUT, UNITS})

Summaries = dict[int, list[tuple[TensorMeta, report_pb2.TensorSummary]]]


def merge_reports(views: list[ReportView]) -> tuple[ReportView, Figures]:
    """The step's reports (one per rank, lowest rank first) as one report: the lowest rank's identity
    (rank, learning rate, scalars), the latest capture time, the mean of the ranks' losses (NaN when any
    is NaN: with equal micro-batches, the global batch's mean loss), and merged tensors."""
    first = views[0]
    by_kind = merge_tensors([v.by_kind for v in views]) if len(views) > 1 else first.by_kind
    losses = [v.loss for v in views if v.loss is not None]
    loss = mean(losses) if losses else None
    f = figures(by_kind)
    view = ReportView(first.run, first.rank, first.step, max(v.time for v in views), loss, f.grad_norms,
                      f.global_grad_norm, f.bad, first.layer_order, by_kind, True, first.learning_rate, time.time(),
                      scalars=first.scalars)
    return view, f


def merge_tensors(reports: list[Summaries]) -> Summaries:
    """kind -> [(entry, summary)] merged over ranks (lowest rank first), in the lowest rank's order; a
    tensor only some ranks hold comes after, in the order first seen."""
    first = reports[0]
    out: Summaries = {}
    for kind, items in first.items():
        columns = [r.get(kind) for r in reports]
        if all(c is not None and len(c) == len(items) for c in columns):
            # The common case: every rank reports the same tensors in the same order; one pass, no grouping.
            merged = []
            data = kind in DATA_KINDS
            for row in zip(*columns, strict=True):
                meta = row[0][0]
                if meta.partition != REPLICATED:
                    name = meta.name
                    if any(m.name != name for m, _ in row):
                        return _merge_grouped(reports)
                merged.append((meta, _merge_row(row, data)))
            out[kind] = merged
        else:
            return _merge_grouped(reports)
    if any(kind not in first for r in reports[1:] for kind in r):
        return _merge_grouped(reports)
    return out


def _merge_grouped(reports: list[Summaries]) -> Summaries:
    """merge_tensors for reports whose tensors differ between ranks: grouped by (kind, name)."""
    groups: dict[tuple[int, str], list[tuple[TensorMeta, report_pb2.TensorSummary]]] = {}
    for by_kind in reports:
        for kind, items in by_kind.items():
            for meta, s in items:
                key = (kind, meta.name)
                group = groups.get(key)
                if group is None:
                    groups[key] = [(meta, s)]
                else:
                    group.append((meta, s))
    out: Summaries = {}
    for (kind, _), group in groups.items():
        meta, s = group[0]
        if len(group) > 1:
            s = _merge_row(group, kind in DATA_KINDS)
        items = out.get(kind)
        if items is None:
            items = out[kind] = []
        items.append((meta, s))
    return out


def _merge_row(row, data: bool):
    """One tensor's parts (lowest rank first) as one summary: a data tensor's sharded or per-rank parts
    add; a model tensor's sharded parts add (HSDP's per-rank copies left out), and a replicated or
    per-rank one is the lowest rank's."""
    meta, first = row[0]
    if meta.partition == REPLICATED or len(row) == 1:
        return first
    if data and meta.partition in ADDITIVE:
        return Merged([s for _, s in row])
    shards = [s for m, s in row if m.partition == SHARDED]
    if len(shards) > 1:
        return Merged(shards)
    return shards[0] if shards else first


class Merged:
    """The summary of the union of several parts' values, read as a report_pb2.TensorSummary is (its fields
    as attributes, HasField): counts, sums, min and max are added up when it is made, in one pass over the
    parts; the histogram, the sum of cubes and the checksum when first read. The aggregator merges every
    additive tensor of every joined step, and most histograms are never read (scrapes, snapshot frames and
    SaturatedActivation read some), so building protobuf messages eagerly would cost the aggregator about a
    third of its throughput on 4-rank runs."""

    __slots__ = ("tensor_id", "count", "nan_count", "inf_count", "zero_count", "sum", "sum_squares", "min", "max",
                 "_parts", "_histogram", "_offset")

    def __init__(self, parts: list[report_pb2.TensorSummary]):
        first = parts[0]
        count = nan = inf = zero = 0
        total = squares = 0.0
        lo, hi = first.min, first.max
        for s in parts:
            count += s.count
            nan += s.nan_count
            inf += s.inf_count
            zero += s.zero_count
            total += s.sum
            squares += s.sum_squares
            if s.min < lo:
                lo = s.min
            if s.max > hi:
                hi = s.max
        self.tensor_id, self.count, self.nan_count, self.inf_count, self.zero_count = (
            first.tensor_id, count, nan, inf, zero)
        self.sum, self.sum_squares, self.min, self.max = total, squares, lo, hi
        self._parts = parts
        self._histogram: list[int] | None = None
        self._offset = 0

    def HasField(self, name: str) -> bool:  # noqa: N802 (protobuf's name)
        if name in ("sum_cubes", "checksum"):
            return all(s.HasField(name) for s in self._parts)
        raise ValueError(f"Merged has no optional field {name!r}")

    @property
    def sum_cubes(self) -> float:
        return math.fsum(s.sum_cubes for s in self._parts) if self.HasField("sum_cubes") else 0.0

    @property
    def checksum(self) -> int:  # a wrapping sum: the parts' add up to the whole's
        return sum(s.checksum for s in self._parts) & CHECKSUM_MASK if self.HasField("checksum") else 0

    @property
    def histogram(self) -> list[int]:
        if self._histogram is None:
            self._add_histograms()
        return self._histogram

    @property
    def histogram_offset(self) -> int:
        if self._histogram is None:
            self._add_histograms()
        return self._offset

    def _add_histograms(self) -> None:
        hists = [s for s in self._parts if len(s.histogram)]
        if not hists:
            self._histogram = []
            return
        off, n = hists[0].histogram_offset, len(hists[0].histogram)
        if all(s.histogram_offset == off and len(s.histogram) == n for s in hists):
            self._histogram, self._offset = list(map(sum, zip(*(s.histogram for s in hists), strict=True))), off
            return
        counts = [0] * HIST_BUCKETS
        for s in hists:
            o = s.histogram_offset
            for i, c in enumerate(s.histogram):
                counts[min(max(o + i, 0), HIST_BUCKETS - 1)] += c
        first = next((i for i, c in enumerate(counts) if c), 0)
        last = max((i for i, c in enumerate(counts) if c), default=-1)
        self._histogram, self._offset = counts[first:last + 1], first


def add(parts: list[report_pb2.TensorSummary]) -> report_pb2.TensorSummary:
    """The summary of the union of the parts' values, as a protobuf message (what a report would carry)."""
    return message(Merged(parts))


def message(m: Merged | report_pb2.TensorSummary) -> report_pb2.TensorSummary:
    """A merged summary as the protobuf message a report would carry (a message is returned as it is)."""
    if isinstance(m, report_pb2.TensorSummary):
        return m
    out = report_pb2.TensorSummary(tensor_id=m.tensor_id, count=m.count, nan_count=m.nan_count,
                                   inf_count=m.inf_count, zero_count=m.zero_count, sum=m.sum,
                                   sum_squares=m.sum_squares, min=m.min, max=m.max, histogram=m.histogram,
                                   histogram_offset=m.histogram_offset)
    if m.HasField("sum_cubes"):
        out.sum_cubes = m.sum_cubes
    if m.HasField("checksum"):
        out.checksum = m.checksum
    return out


@dataclass(slots=True)
class Figures:
    """The per-layer figures of one report's tensors (a rank's or a merged one)."""

    grad_sq: dict[str, float]                  # layer -> Σg² over its gradients (NaN/Inf: report.sum_squares)
    param_sq: dict[str, float]                 # layer -> Σw² over its parameters
    nonfinite: dict[str, dict[str, int]]       # layer -> kind name -> NaN and Inf values (0 too: seen, healthy)
    bad: list[tuple[TensorMeta, int]]          # tensors holding NaN/Inf, with their count

    @property
    def grad_norms(self) -> dict[str, float]:
        return {layer: root(sq) for layer, sq in self.grad_sq.items()}

    @property
    def param_norms(self) -> dict[str, float]:
        return {layer: root(sq) for layer, sq in self.param_sq.items()}

    @property
    def global_grad_norm(self) -> float | None:
        return root(math.fsum(self.grad_sq.values())) if self.grad_sq else None


def figures(by_kind: Summaries) -> Figures:
    out = Figures({}, {}, {}, [])
    for kind, items in by_kind.items():
        if kind == UNITS:
            continue  # counts, never non-finite: no per-layer series of their own
        for meta, s in items:
            n = s.nan_count + s.inf_count
            if kind == GRADIENT:
                out.grad_sq[meta.layer] = out.grad_sq.get(meta.layer, 0.0) + (sum_squares(s) if n else s.sum_squares)
            elif kind == PARAMETER:
                out.param_sq[meta.layer] = out.param_sq.get(meta.layer, 0.0) + (sum_squares(s) if n else s.sum_squares)
            if n:
                out.bad.append((meta, n))
            kinds = out.nonfinite.get(meta.layer)
            if kinds is None:
                kinds = out.nonfinite[meta.layer] = {}
            kinds[meta.kind_name] = kinds.get(meta.kind_name, 0) + n
    return out


def nonfinite_only(by_kind: Summaries) -> Figures:
    """Figures with only `bad` filled (a rank's part of a joined step: the merge gives the rest)."""
    bad = [(meta, n) for kind, items in by_kind.items() if kind != UNITS
           for meta, s in items if (n := s.nan_count + s.inf_count)]
    return Figures({}, {}, {}, bad)


def root(sq: float) -> float:
    """sqrt of a sum of squares; NaN and +Inf stay what they are."""
    return math.sqrt(sq) if sq > 0 else (0.0 if sq <= 0 else math.nan)


def mean(values: list[float]) -> float:
    """NaN when any value is NaN or both infinities occur, ±Inf when one infinity does."""
    try:
        return math.fsum(values) / len(values)
    except ValueError:  # fsum of +Inf and -Inf
        return math.nan
    except OverflowError:  # finite values whose sum overflows
        return math.fsum(v / len(values) for v in values)
