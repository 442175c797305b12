"""One step of a multi-rank run as one picture: every rank's report of the step merged by the partition the
agent declared for each tensor (run.proto), so that what /metrics, the API, the heatmap and the rules show
is what the same model, unsharded, in one process would show.

- SHARDED (FSDP, tensor parallel): each rank holds a disjoint part of the tensor, so the parts add up:
  counts, NaN/Inf/zero counts, sums, sums of squares, sums of cubes and histograms add; min and max fold.
- PER_RANK (activations, inputs, unit counts): each rank saw its own micro-batch; the global batch is their
  union, so they add up the same way.
  The replica checksum (a wrapping sum of the bits) adds modulo 2^64.
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
ADDITIVE = frozenset({run_pb2.PARTITION_SHARDED, run_pb2.PARTITION_PER_RANK})

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
        if len(group) > 1 and meta.partition in ADDITIVE:
            s = add(s for _, s in group)
        items = out.get(kind)
        if items is None:
            items = out[kind] = []
        items.append((meta, s))
    return out


def add(summaries) -> report_pb2.TensorSummary:
    """The summary of the union of the summarized values."""
    it = iter(summaries)
    first = next(it)
    out = report_pb2.TensorSummary()
    out.CopyFrom(first)
    counts = None
    cubes = first.HasField("sum_cubes")
    checksum = first.HasField("checksum")
    for s in it:
        out.count += s.count
        out.nan_count += s.nan_count
        out.inf_count += s.inf_count
        out.zero_count += s.zero_count
        out.sum += s.sum
        out.sum_squares += s.sum_squares
        out.min = min(out.min, s.min)
        out.max = max(out.max, s.max)
        if cubes and s.HasField("sum_cubes"):
            out.sum_cubes += s.sum_cubes
        else:
            cubes = False
        if checksum and s.HasField("checksum"):  # a wrapping sum: the parts' add up to the whole's
            out.checksum = (out.checksum + s.checksum) & CHECKSUM_MASK
        else:
            checksum = False
        if len(s.histogram):
            if counts is None:
                counts = _buckets(first)
            off = s.histogram_offset
            for i, c in enumerate(s.histogram):
                counts[min(max(off + i, 0), HIST_BUCKETS - 1)] += c
    if not cubes:
        out.ClearField("sum_cubes")
    if not checksum:
        out.ClearField("checksum")
    if counts is not None:
        lo = next((i for i, c in enumerate(counts) if c), 0)
        hi = max((i for i, c in enumerate(counts) if c), default=-1)
        del out.histogram[:]
        out.histogram.extend(counts[lo:hi + 1])
        out.histogram_offset = lo
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


def root(sq: float) -> float:
    """sqrt of a sum of squares; NaN and +Inf stay what they are."""
    return math.sqrt(sq) if sq > 0 else (0.0 if sq <= 0 else math.nan)


def _buckets(s: report_pb2.TensorSummary) -> list[int]:
    counts = [0] * HIST_BUCKETS
    for i, c in enumerate(s.histogram):
        counts[min(max(s.histogram_offset + i, 0), HIST_BUCKETS - 1)] += c
    return counts


def mean(values: list[float]) -> float:
    """NaN when any value is NaN or both infinities occur, ±Inf when one infinity does."""
    try:
        return math.fsum(values) / len(values)
    except ValueError:  # fsum of +Inf and -Inf
        return math.nan
    except OverflowError:  # finite values whose sum overflows
        return math.fsum(v / len(values) for v in values)
