"""What one applied report is to the rules: its tensors with their dictionary entries (kind, layer, forward
order), grouped by kind, and where the agent saw NaN/Inf born. aggregator/state.py builds these views."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from gradwatch.names import UNITS_SUFFIX
from gradwatch.v1 import report_pb2, run_pb2

PARAMETER = run_pb2.TENSOR_KIND_PARAMETER
GRADIENT = run_pb2.TENSOR_KIND_GRADIENT
KIND_NAMES = {v: run_pb2.TensorKind.Name(v).removeprefix("TENSOR_KIND_").lower() for v in run_pb2.TensorKind.values()}
# The agent's per-unit activity counts of a rectifier (agent/capture/units.py) come as ACTIVATION tensors named
# "<module>:units" (count: units, zero count: units that never fired). They are filed under this
# aggregator-local kind (no proto kind is negative), so rules and health that read module outputs never
# mistake counts for outputs; DeadReLU and the layer health read them as the dead-unit fraction.
UNITS = -1
KIND_NAMES[UNITS] = "activation_units"
# Tensors without a dictionary entry sort after every known one in forward order.
UNKNOWN_ORDER = 1 << 32


@dataclass(frozen=True, slots=True)
class TensorMeta:
    name: str
    kind: int
    layer: str
    order: int
    kind_name: str  # label value of `kind`, precomputed: it is needed for every tensor of every report
    shape: tuple[int, ...] = ()
    partition: int = run_pb2.PARTITION_UNSPECIFIED  # how ranks hold it: replicated, sharded, per rank
    dtype: str = ""

    @classmethod
    def of(cls, name: str, kind: int, layer: str, order: int, shape: tuple[int, ...] = (),
           partition: int = run_pb2.PARTITION_UNSPECIFIED, dtype: str = "") -> TensorMeta:
        if kind == run_pb2.TENSOR_KIND_ACTIVATION and name.endswith(UNITS_SUFFIX):
            kind = UNITS
        return cls(name, kind, layer, order, KIND_NAMES.get(kind, "unspecified"), shape, partition, dtype)


def unknown_tensor(tensor_id: int) -> TensorMeta:
    name = f"tensor_{tensor_id}"
    return TensorMeta.of(name, run_pb2.TENSOR_KIND_UNSPECIFIED, name, UNKNOWN_ORDER)


FORWARD, BACKWARD = "forward", "backward"
_DIRECTIONS = {report_pb2.DIRECTION_FORWARD: FORWARD, report_pb2.DIRECTION_BACKWARD: BACKWARD}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the agent's always-on check saw NaN/Inf born on one rank in one step (report.proto's
    NonFiniteOrigin): the first leaf module whose output held NaN/Inf in forward, or the module whose
    backward turned a finite output gradient into a non-finite one ("(loss)": the loss's own gradient)."""

    direction: str   # FORWARD or BACKWARD
    module: str      # the blamed leaf module's path
    order: int       # its forward execution index in the step
    observed: str    # the tensor that held the values: "<module>:output" or "<module>:output.grad"
    count: int       # NaN and Inf elements of `observed`


def sum_squares(s: report_pb2.TensorSummary) -> float:
    """The tensor's sum of squares as a norm must read it: NaN when it holds a NaN, +Inf when it holds an
    Inf, else the agent's sum over its (all finite) values. The agent sums finite values only, so reading
    `s.sum_squares` alone would show a tensor full of NaN as norm 0."""
    if s.nan_count:
        return math.nan
    if s.inf_count:
        return math.inf
    return s.sum_squares


def origins_of(report: report_pb2.StepReport) -> tuple[Origin, ...]:
    """The report's origins; one of a direction this aggregator does not know is skipped."""
    return tuple(Origin(d, o.module, o.order, o.observed, o.nonfinite_count) for o in report.nonfinite_origins
                 if (d := _DIRECTIONS.get(o.direction)) is not None)


@dataclass(slots=True)
class ReportView:
    """What the rules see of one applied report. `tensors` holds the report's summaries as they came
    (protobuf TensorSummary: count, nan_count, inf_count, zero_count, sum, sum_squares, min, max,
    histogram, histogram_offset) with their dictionary entry, grouped by tensor kind; rules read only
    the fields they need (decoding a whole Stats for every tensor would cost more than the rules)."""

    run: str
    rank: int
    step: int
    time: float                            # capture time (unix seconds), else when it was applied
    loss: float | None
    grad_norms: dict[str, float]           # layer -> gradient norm, layers within the series budget (a rank's
                                           # part of a joined step: none, the merged step carries them)
    global_grad_norm: float | None
    nonfinite: list[tuple[TensorMeta, int]]  # tensors holding NaN/Inf, with their count
    layer_order: dict[str, int]
    # kind -> [(dictionary entry, summary)], in report order
    by_kind: dict[int, list[tuple[TensorMeta, report_pb2.TensorSummary]]] = field(default_factory=dict)
    train: bool = True
    learning_rate: float | None = None    # the largest of the report's learning rates
    applied_at: float = 0.0                # this aggregator's clock when the report was applied
    final: bool = False                    # the rank's end-of-run marker: only StalledTraining looks at it
    scalars: dict[str, float] = field(default_factory=dict)  # the report's user scalars (accuracy, labels/<c>)
    origins: tuple[Origin, ...] = ()       # where the agent saw NaN/Inf born (at most one per direction)
    # A training report of a multi-rank run: `joined` when the cross-rank join took it (rules that judge
    # across ranks wait for its step to close), `late` when that step had already closed without it.
    joined: bool = False
    late: bool = False
    host: str = ""                         # the rank's host, from its registration ("" when unknown)

    def of_kind(self, kind: int) -> list[tuple[TensorMeta, report_pb2.TensorSummary]]:
        return self.by_kind.get(kind, [])

    @property
    def tensors(self) -> Iterator[tuple[TensorMeta, report_pb2.TensorSummary]]:
        return itertools.chain.from_iterable(self.by_kind.values())
