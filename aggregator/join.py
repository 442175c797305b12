"""The cross-rank step join: the reports of one step from every rank of a run, merged exactly.

A step closes when every rank of the run reported it, when the watermark passed it (every rank has
reported a later step: a rank in burst mode reports steps its peers skip), when it waited
join_timeout_s (a rank died or lags), or when more than MAX_OPEN_STEPS steps are open. A report for a
step that already closed is late: it was applied as usual but is not joined, and it is counted.

Statistics merge by their partition (run.proto): SHARDED tensors (FSDP, tensor parallel) add their
sums of squares over ranks; REPLICATED tensors (DDP parameters, all-reduced gradients) must agree
across ranks and count once; PER_RANK tensors (activations) stay per rank. Only the small per-rank
values the cross-rank rules need are kept: each replicated tensor's sum of squares, each rank's loss
and gradient norm, and its NaN/Inf evidence (non-finite tensors and origins, empty when healthy).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradwatch.aggregator.report import sum_squares
from gradwatch.v1 import run_pb2

if TYPE_CHECKING:
    from gradwatch.aggregator.report import Origin, ReportView, TensorMeta

PARAMETER = run_pb2.TENSOR_KIND_PARAMETER
GRADIENT = run_pb2.TENSOR_KIND_GRADIENT
SHARDED = run_pb2.PARTITION_SHARDED
PER_RANK = run_pb2.PARTITION_PER_RANK
MAX_OPEN_STEPS = 64


@dataclass(slots=True)
class RankPart:
    """What the join keeps of one rank's report."""

    loss: float | None
    sharded_sq: float                    # Σ g² over this rank's shards of sharded gradients
    replicated_sq: float                 # Σ g² over replicated gradients, as this rank saw them
    # replicated parameters and gradients, in report order: (kind, tensor name), entry, Σx²
    keys: tuple[tuple[int, str], ...]
    metas: tuple[TensorMeta, ...]
    values: tuple[float, ...]
    time: float
    nonfinite: list[tuple[TensorMeta, int]] = field(default_factory=list)  # the report's, as ReportView has them
    origins: tuple[Origin, ...] = ()
    # TensorSummary.checksum of each of `keys` (None where the agent sent none: agents before it), for exact
    # replica comparison (RankDivergence)
    checksums: tuple[int | None, ...] = ()
    view: ReportView | None = None  # the whole report, for the merged picture (aggregator/merge.py)

    @property
    def grad_norm(self) -> float:
        return math.sqrt(self.sharded_sq + self.replicated_sq)

    @property
    def replicated(self) -> dict[tuple[int, str], tuple[TensorMeta, float]]:
        return {k: (m, v) for k, m, v in zip(self.keys, self.metas, self.values, strict=True)}


@dataclass(slots=True)
class JoinedStep:
    """One closed step of a run, merged over its ranks (what cross-rank rules see)."""

    run: str
    step: int
    time: float                          # the latest capture time among the joined reports
    world_size: int
    parts: dict[int, RankPart]
    reason: str                          # "complete", "watermark", "timeout" or "overflow"
    rank: int = -1                       # the rank an alert names; rules set it
    layer_order: dict[str, int] = field(default_factory=dict)
    merged: ReportView | None = None    # every rank's report merged by partition (State sets it at close)

    @property
    def missing(self) -> tuple[int, ...]:
        return tuple(r for r in range(self.world_size) if r not in self.parts)

    @property
    def global_grad_norm(self) -> float | None:
        """sqrt(Σ over ranks of sharded Σg² + replicated Σg² counted once, from the lowest rank)."""
        if not self.parts:
            return None
        lowest = self.parts[min(self.parts)]
        return math.sqrt(sum(p.sharded_sq for p in self.parts.values()) + lowest.replicated_sq)


class StepJoin:
    """The open steps of one run. Not thread-safe: the state's lock covers it."""

    __slots__ = ("run", "open", "opened", "closed_through", "latest", "late")

    def __init__(self, run: str):
        self.run = run
        self.open: dict[int, dict[int, RankPart]] = {}
        self.opened: dict[int, float] = {}   # step -> monotonic time its first report arrived
        self.closed_through = -1 << 62       # every step <= this is closed
        self.latest: dict[int, int] = {}     # rank -> latest step it reported
        self.late = 0

    def add(self, view: ReportView, world_size: int) -> list[JoinedStep]:
        """Adds one rank's report; returns the steps this closed, in step order."""
        step, rank = view.step, view.rank
        if step > self.latest.get(rank, -1 << 62):
            self.latest[rank] = step
        if step <= self.closed_through and step not in self.open:
            self.late += 1
            return []
        parts = self.open.get(step)
        if parts is None:
            parts = self.open[step] = {}
            self.opened[step] = time.monotonic()
        part = parts[rank] = part_of(view)
        part.view = view
        return self._close_ready(world_size, view.layer_order)

    def expire(self, world_size: int, timeout_s: float, now: float | None = None) -> list[JoinedStep]:
        """Closes the steps that waited longer than timeout_s for their missing ranks."""
        now = time.monotonic() if now is None else now
        due = [s for s, t in self.opened.items() if now - t >= timeout_s]
        return self._close_through(max(due), world_size, "timeout", {}) if due else []

    def _close_ready(self, world_size: int, order: dict[str, int]) -> list[JoinedStep]:
        out: list[JoinedStep] = []
        watermark = min(self.latest.values()) if len(self.latest) >= world_size else None
        for step in sorted(self.open):
            parts = self.open[step]
            if len(parts) >= world_size:
                out += self._close_through(step, world_size, "complete", order)
            elif watermark is not None and watermark > step:
                out += self._close_through(step, world_size, "watermark", order)
            else:
                break
        while len(self.open) > MAX_OPEN_STEPS:
            out += self._close_through(min(self.open), world_size, "overflow", order)
        return out

    def _close_through(self, last: int, world_size: int, reason: str, order: dict[str, int]) -> list[JoinedStep]:
        out = []
        for step in sorted(s for s in self.open if s <= last):
            parts = self.open.pop(step)
            self.opened.pop(step, None)
            why = "complete" if len(parts) >= world_size else reason
            t = max(p.time for p in parts.values())
            out.append(JoinedStep(self.run, step, t, world_size, parts, why, layer_order=order))
        self.closed_through = max(self.closed_through, last)
        return out


def part_of(view: ReportView) -> RankPart:
    sharded = replicated_sq = 0.0
    keys: list[tuple[int, str]] = []
    metas: list[TensorMeta] = []
    values: list[float] = []
    checksums: list[int | None] = []
    for kind in (PARAMETER, GRADIENT):
        for meta, s in view.of_kind(kind):
            if meta.partition == PER_RANK:
                continue
            sq = sum_squares(s)
            if meta.partition == SHARDED:
                if kind == GRADIENT:
                    sharded += sq
                continue
            keys.append((kind, meta.name))
            metas.append(meta)
            values.append(sq)
            checksums.append(s.checksum if s.HasField("checksum") else None)
            if kind == GRADIENT:
                replicated_sq += sq
    return RankPart(view.loss, sharded, replicated_sq, tuple(keys), tuple(metas), tuple(values), view.time,
                    view.nonfinite, view.origins, checksums=tuple(checksums))
