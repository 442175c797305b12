"""What the aggregator holds of each run it follows: the run (latest figures, recent history rows, the cross-rank
join), its ranks (tensor dictionary, sequence numbering, pace) and its layers' latest norms, plus the immutable
RunView a scrape or the API reads outside the lock. aggregator/state.py applies reports to them."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from gradwatch.aggregator.ingest.sequence import SequenceTracker
from gradwatch.aggregator.join import JoinedStep, StepJoin
from gradwatch.aggregator.report import TensorMeta
from gradwatch.names import NOT_USER_PREFIXES, TRAIN
from gradwatch.v1 import report_pb2, run_pb2

RATE_WINDOW = 10
MAX_CURVE_SCALARS = 16  # user scalars kept per history row (the live view's accuracy curves)


class RankState:
    __slots__ = ("dictionary", "layer_order", "start_ns", "fetched", "seq", "rate", "host")

    def __init__(self) -> None:
        self.dictionary: dict[int, TensorMeta] | None = None
        self.layer_order: dict[str, int] = {}
        self.start_ns = 0
        self.fetched = False
        self.seq = SequenceTracker()
        self.rate: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)
        self.host = ""  # from the registration: what rank-health alerts name

    def steps_per_second(self) -> float | None:
        if len(self.rate) < 2:
            return None
        (t0, s0), (t1, s1) = self.rate[0], self.rate[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 >= s0 else None


class LayerState:
    __slots__ = ("step", "grad_norm", "param_norm", "nonfinite")

    def __init__(self) -> None:
        self.step = -1
        self.grad_norm: float | None = None
        self.param_norm: float | None = None
        self.nonfinite: dict[str, int] = {}


class RunState:
    def __init__(self, run: str, history: int = 0):
        self.run = run
        self.ranks: dict[int, RankState] = {}
        self.world_size = 0
        self.step = -1
        self.phase = TRAIN
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.learning_rate: float | None = None
        self.grad_norm: float | None = None
        self.last_report_time: float | None = None
        self.last_seen = time.monotonic()
        self.layers: dict[str, LayerState] = {}
        self.scalars: dict[str, float] = {}       # user scalars of the latest training report
        self.eval_scalars: dict[str, float] = {}  # ... and of the latest evaluation report
        self.tensors: dict[int, list[tuple[TensorMeta, report_pb2.TensorSummary]]] = {}  # latest training report
        # Recent steps, for step-range queries: the reports of a single-rank run (the lowest rank's evaluation
        # reports too), the joined, merged steps of a multi-rank run: (step, capture time, train, loss, global
        # grad norm, layer -> grad norm, curve scalars such as accuracy, layer -> param norm)
        self.history: deque[tuple[int, float, bool, float | None, float | None, dict[str, float],
                                  dict[str, float], dict[str, float]]] = deque(maxlen=history)
        self.topology: run_pb2.ModelGraph | None = None  # the module graph, when an agent sent one
        self.hyperparameters: dict[str, float | int | str | bool | None] = {}  # from the registration
        self.labels: dict[str, str] = {}
        self.join: StepJoin | None = None          # only for runs of several ranks
        self.last_joined: JoinedStep | None = None
        self.unsaved: list[tuple] = []  # history rows not yet in Redis (aggregator/history.py; the service saves)
        self.layer_count = 0  # layers of the largest rank dictionary: what a history row holds (State.size_history)
        self.reports_lost = 0  # step reports its agents said they lost before delivery, since this replica followed it

    def keep_rows(self, rows: int) -> None:
        """The in-memory history keeps the latest `rows` steps from now on (every step stays in Redis)."""
        if self.history.maxlen != rows:
            self.history = deque(self.history, maxlen=rows)

    def add_row(self, row: tuple) -> None:
        self.history.append(row)
        self.unsaved.append(row)


@dataclass(frozen=True, slots=True)
class RunView:
    run: str
    step: int
    loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    steps_per_second: float | None
    last_report_time: float | None
    # (layer, grad norm, param norm, ((kind, non-finite count), ...))
    layers: tuple[tuple[str, float | None, float | None, tuple[tuple[str, int], ...]], ...]
    world_size: int = 0
    ranks: tuple[int, ...] = ()  # ranks that registered or reported
    joined: JoinedStep | None = None  # the latest step closed by the cross-rank join (world_size > 1)
    scalars: dict[str, float] = field(default_factory=dict)
    eval_scalars: dict[str, float] = field(default_factory=dict)
    # the latest training report's summaries by kind (never mutated: safe to read outside the lock)
    tensors: dict[int, list[tuple[TensorMeta, report_pb2.TensorSummary]]] = field(default_factory=dict)
    hyperparameters: dict[str, float | int | str | bool | None] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    reports_lost: int = 0  # step reports the run's agents lost before delivery (RunState.reports_lost)


def curve_scalars(scalars: dict[str, float]) -> dict[str, float]:
    """The user scalars worth a curve (accuracy, ...): not label counts or learning rates, at most
    MAX_CURVE_SCALARS of them."""
    if not scalars:
        return {}
    return dict(itertools.islice(((k, v) for k, v in scalars.items() if not k.startswith(NOT_USER_PREFIXES)),
                                 MAX_CURVE_SCALARS))
