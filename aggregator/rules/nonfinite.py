"""NonFinite: where NaN/Inf started in a step, from the agent's origins (its always-on check of every
leaf module's output and output gradient) and the non-finite tensors and loss of the step's reports.

The first of these that applies names the incident, in this precedence:

1. a parameter already non-finite (poisoned weights: it held NaN/Inf before this step's forward pass)
   whose module runs at or before the forward origin; with no forward origin, at or before the first
   non-finite module output (the origin of agents that do not check), else any parameter;
2. the forward origin: the first leaf module whose output held NaN/Inf;
3. non-finite inputs, then activations, the first in forward order;
4. the backward origin: the module whose backward turned a finite gradient non-finite ("(loss)": the
   gradient of the model's output was non-finite already);
5. non-finite gradients, the first in backward order (the highest forward order);
6. other tensors (updates, optimizer state, unknown ones), the first in forward order;
7. a non-finite loss.

Single-rank runs are judged report by report, as the reports arrive. Runs of several ranks are judged
on the step the cross-rank join closed (aggregator/join.py), with every rank's evidence pooled: under
DDP a NaN born in one rank's forward reaches every rank's gradients through the all-reduce, and only
that rank saw the origin, so the verdict must not depend on which report came first. Within a class
the earliest module wins, then the lowest rank (forward origins: lowest forward order, then rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from gradwatch.aggregator.alerts.record import FIRING, Alert, iso
from gradwatch.aggregator.join import JoinedStep
from gradwatch.aggregator.report import BACKWARD, FORWARD, Origin, ReportView, TensorMeta
from gradwatch.aggregator.rules.base import CRITICAL, LOSS_LAYER, Rule
from gradwatch.names import LOSS_MODULE
from gradwatch.v1 import run_pb2

PARAMETER = run_pb2.TENSOR_KIND_PARAMETER
INPUT = run_pb2.TENSOR_KIND_INPUT
ACTIVATION = run_pb2.TENSOR_KIND_ACTIVATION
GRADIENTS = (run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT)


class Evidence(NamedTuple):
    """One rank's NaN/Inf evidence at one step."""

    rank: int
    nonfinite: list[tuple[TensorMeta, int]]  # tensors holding NaN/Inf, with their count
    origins: tuple[Origin, ...]
    loss: float | None

    @property
    def loss_bad(self) -> bool:
        return self.loss is not None and not math.isfinite(self.loss)

    @property
    def bad(self) -> bool:
        return bool(self.nonfinite or self.origins) or self.loss_bad


@dataclass(frozen=True, slots=True)
class Blame:
    """The verdict: what started it, where, on which rank."""

    cause: str                  # "parameter", "origin", "tensor" or "loss"
    direction: str              # FORWARD or BACKWARD
    rank: int
    layer: str
    tensor: str                 # the parameter or gradient, the origin's observed tensor, or "loss"
    value: float                # non-finite values (NaN: not counted); the loss itself for "loss"
    meta: TensorMeta | None = None


def blame(pool: list[Evidence], layer_order: dict[str, int],
          keep: Callable[[str], bool] = lambda layer: True) -> Blame | None:
    """The precedence of the module docstring over the pooled evidence of one step; None when all is
    finite. `keep` filters layers (the rule's include/exclude); "(loss)" origins always count."""
    tensors = [(e.rank, m, n) for e in pool for m, n in e.nonfinite if keep(m.layer)]
    origins = [(e.rank, o) for e in pool for o in e.origins if o.module == LOSS_MODULE or keep(o.module)]

    def order(o: Origin) -> int:  # the registration's order where it knows the module: the parameters' scale
        return layer_order.get(o.module, o.order)

    def found_at(direction: str, r: int, o: Origin) -> Blame:
        # The agent checks without counting (count 0): the watched tensor it saw, if any, has the count.
        n = o.count or next((n for rank, m, n in tensors if rank == r and m.name == o.observed), math.nan)
        return Blame("origin", direction, r, o.module, o.observed, n)

    forward = min(((order(o), r, o) for r, o in origins if o.direction == FORWARD), key=lambda x: x[:2], default=None)
    if forward is not None:
        bound: float = forward[0]
    else:
        bound = min((m.order for _, m, _ in tensors if m.kind == ACTIVATION), default=math.inf)
    found = _first(tensors, lambda m: m.kind == PARAMETER and m.order <= bound, lambda m, r: (m.order, r))
    if found is not None:
        return Blame("parameter", FORWARD, *found)
    if forward is not None:
        return found_at(FORWARD, *forward[1:])
    found = _first(tensors, lambda m: m.kind in (INPUT, ACTIVATION), lambda m, r: (m.kind != INPUT, m.order, r))
    if found is not None:
        return Blame("tensor", FORWARD, *found)
    backward = [((-math.inf if o.module == LOSS_MODULE else -order(o), r), r, o) for r, o in origins
                if o.direction == BACKWARD]
    if backward:
        return found_at(BACKWARD, *min(backward, key=lambda x: x[0])[1:])
    found = _first(tensors, lambda m: m.kind in GRADIENTS, lambda m, r: (-m.order, r))
    if found is not None:
        return Blame("tensor", BACKWARD, *found)
    # updates, optimizer state, unknown tensors: the earliest module first
    found = _first(tensors, lambda m: True, lambda m, r: (m.order, r))
    if found is not None:
        return Blame("tensor", FORWARD, *found)
    e = next((e for e in pool if e.loss_bad), None)
    return None if e is None else Blame("loss", FORWARD, e.rank, LOSS_LAYER, "loss", float(e.loss))


def _first(tensors: list[tuple[int, TensorMeta, int]], which: Callable[[TensorMeta], bool],
           key: Callable[[TensorMeta, int], tuple]) -> tuple[int, str, str, int, TensorMeta] | None:
    """(rank, layer, tensor, count, entry) of the smallest `key` among the tensors `which` takes; the
    first in report order among equals."""
    best = None
    for rank, meta, n in tensors:
        if which(meta):
            k = key(meta, rank)
            if best is None or k < best[0]:
                best = (k, rank, meta, n)
    if best is None:
        return None
    _, rank, meta, n = best
    return rank, meta.layer, meta.name, n, meta


class _At(NamedTuple):
    """Where an incident is counted: one report of a rank, or (rank -1) the steps of a multi-rank run."""

    run: str
    step: int
    time: float
    rank: int = -1


class NonFinite(Rule):
    """NaN/Inf in any watched tensor or module output, or a non-finite loss; names where it started
    (see the module docstring). Always critical.

    Latency: single-rank runs alert on the report that shows it. Runs of several ranks alert when the
    join closes the step: once every rank reported it, which costs the slowest rank's export (a rank
    without an origin of its own does not flush at once: up to its export interval, 0.5 s by default);
    when a rank did not report the step (it was not due there), once every rank reported a later step,
    or after join_timeout_s (30 s). A report whose step had already closed is judged alone."""

    name = "NonFinite"
    JOINED = True

    def evaluate(self, view: ReportView) -> list[Alert]:
        if view.joined:
            return []  # judged with the other ranks' reports when the join closes its step
        pool = [Evidence(view.rank, view.nonfinite, view.origins, view.loss)]
        if view.late:  # its step closed without it: it may still raise an alert, never count as a clean step
            return self._judge(pool, view.layer_order, _At(view.run, view.step, view.time), clear=False)
        return self._judge(pool, view.layer_order, view)

    def evaluate_joined(self, joined: JoinedStep) -> list[Alert]:
        pool = [Evidence(r, p.nonfinite, p.origins, p.loss) for r, p in sorted(joined.parts.items())]
        return self._judge(pool, joined.layer_order, _At(joined.run, joined.step, joined.time))

    def _judge(self, pool: list[Evidence], layer_order: dict[str, int], at, clear: bool = True) -> list[Alert]:
        key = (at.run, self.name)
        found = blame(pool, layer_order, self.layers) if any(e.bad for e in pool) else None
        if found is not None:
            alert = self.incidents.bad(key, at, lambda: self._fire(found, pool, at))
        elif clear:
            alert = self.incidents.clear(key, at, lambda a: a.resolve(at.step, at.time, 0.0, self._resolved(a, at)))
        else:
            alert = None
        return [alert] if alert else []

    def _resolved(self, a: Alert, at) -> str:
        n = self.incidents.resolve_after
        if at.rank < 0:
            return (f"No NaN/Inf on any rank for at least {n} consecutive joined steps up to step {at.step}; the "
                    f"incident began at step {a.step} in layer {a.layer} on rank {a.rank} (run {at.run})")
        return (f"No NaN/Inf for at least {n} consecutive reports up to step {at.step}; the incident began at step "
                f"{a.step} in layer {a.layer} (run {at.run}, rank {at.rank})")

    def _fire(self, found: Blame, pool: list[Evidence], at) -> Alert:
        own = next(e for e in pool if e.rank == found.rank)
        head = f"NaN/Inf at step {at.step} started in layer {found.layer} in the {found.direction} pass: "
        n = int(found.value) if found.cause != "loss" and math.isfinite(found.value) else 0
        counted = f"{n} non-finite values in " if n else "NaN/Inf in "
        if found.cause == "parameter":
            what = (f"{n} non-finite values in parameter {found.tensor}, already there before this step's forward "
                    f"pass (poisoned weights)")
        elif found.cause == "origin" and found.direction == FORWARD:
            what = f"its output {found.tensor} is the first module output holding NaN/Inf"
            what += f" ({n} values)" if n else ""
        elif found.cause == "origin" and found.layer == LOSS_MODULE:
            what = (f"every module output was finite, but the gradient of the loss with respect to the model's "
                    f"output was not ({counted}{found.tensor})")
        elif found.cause == "origin":
            what = (f"every module output was finite, and its backward turned a finite gradient into a non-finite "
                    f"one ({counted}{found.tensor})")
        elif found.cause == "tensor":
            kind = found.meta.kind_name if found.meta is not None else "tensor"
            what = (f"{n} non-finite values in {kind} {found.tensor}, the first non-finite tensor in "
                    f"{found.direction} order")
        else:
            what = f"the loss is {found.value} while every watched tensor is finite"
        others = sum(1 for m, _ in own.nonfinite if m.name != found.tensor and self.layers(m.layer))
        if others > 0:
            what += f"; {others} more tensor{'s' if others != 1 else ''} non-finite"
        if found.cause != "loss" and own.loss_bad:
            what += f"; the loss is {own.loss}"
        peers = [e.rank for e in pool if e.rank != found.rank and e.bad]
        if peers:
            what += f"; rank{'s' if len(peers) > 1 else ''} {', '.join(map(str, peers))} non-finite too"
        summary = f"{head}{what} (run {at.run}, rank {found.rank})"
        return Alert(self.name, FIRING, at.run, at.step, found.rank, found.layer, found.tensor, found.value, 0.0,
                     self.settings.severity or CRITICAL, summary, iso(at.time))
