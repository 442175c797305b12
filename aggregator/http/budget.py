"""The /metrics series budget: which layers of each run get per-layer series, and which (layer, kind) magnitude
histograms get one of the `max_histogram_layers` slots; decided at every scrape from the state's copy, and what is
left out counted and logged once per run (docs/architecture.md#series-budget).

  grouping  metrics_layer_group_depth N > 0: layers fold into the first N components of their module path
            (`model.layers.3.mlp.up_proj` -> `model.layers.3`). A group's norm is the root of its layers' summed
            squares (NaN when one is NaN, else +Inf when one is +Inf: never 0); NaN/Inf counts, health fractions,
            statistics gauges and histograms are taken over the group's tensors, as over one layer's.
  top-k     metrics_top_layers k > 0: per-layer series for k layers (or groups) of each run: those holding NaN/Inf
            first, then those a firing alert names, then the largest gradient norms; 0: every one.
  slots     max_histogram_layers (layer, kind) pairs for all runs together. Live runs (a report captured within
            LIVE_S) share them max-min fairly (none gets more than its fair share while another wants more);
            finished runs get what is left, the most recent first, so they are evicted first.

Counted (gradwatch_aggregator_layers_unexported_total, gradwatch_aggregator_histograms_dropped_total) once per run:
the most it went without at one scrape, so a run missing 10 histograms at every scrape counts 10, not 10 a scrape.

What that bounds, per run with R ranks, A firing alerts, E exported layers (or groups), H histogram slots:

    series ≤ 107 + A + 2·R + E·(5 + K + F) + 18·H

K: tensor kinds of a layer (one nonfinite_values each); 5: grad_norm, param_norm, update_ratio, dead_fraction,
saturated_fraction; F: the statistics gauges of the kinds beyond the default agent's (metrics.py
_statistics_families): update_rms, activation_std and activation_grad_norm where the layer has updates, outputs and
output gradients, and one optimizer_state_norm per state key, at most STATE_KEYS: F ≤ 5, 0 for the default agent.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from gradwatch.aggregator.health import HIST_KINDS
from gradwatch.aggregator.runstate import RunView

log = logging.getLogger("gradwatch.aggregator")

# A run that reported within this long (capture time, the agent's clock) is live: it is served histogram slots
# before any finished run. Five minutes covers a report every few hundred steps and an evaluation pause.
LIVE_S = 300.0
# Optimizer state keys per exported layer with a gradwatch_layer_optimizer_state_norm series: the agent sends at most
# two per parameter (Adam's exp_avg and exp_avg_sq; SGD's momentum_buffer is one), and a layer's parameters share
# their optimizer's keys; a layer whose parameters differ (Adafactor's factored and unfactored moments) is cut here.
STATE_KEYS = 2

Layer = tuple[str, float | None, float | None, tuple[tuple[str, int], ...]]  # as RunView.layers


@dataclass(frozen=True, slots=True)
class RunSeries:
    """What /metrics exports of one run's layers."""

    layers: list[Layer]  # the layers (or groups) with per-layer series
    names: frozenset[str]  # their names
    tensors: dict  # the latest training report's summaries by kind, under group names where grouped
    histograms: int  # (layer, kind) magnitude histograms this run is given


def group_of(layer: str, depth: int) -> str:
    """The first `depth` dot-separated components of a module path; the path itself when depth is 0 or the path
    is no longer."""
    if depth <= 0:
        return layer
    parts = layer.split(".", depth)
    return ".".join(parts[:depth]) if len(parts) > depth else layer


def root_of_squares(values: Iterable[float]) -> float:
    """sqrt(sum of squares), exactly (no overflow of the squares); NaN when any is NaN, else +Inf when any is
    infinite."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return math.hypot(*values)


def grouped(layers: Sequence[Layer], depth: int) -> list[Layer]:
    """The run's layers folded into groups (in the order their first layer comes)."""
    members: dict[str, list[Layer]] = {}
    for layer in layers:
        members.setdefault(group_of(layer[0], depth), []).append(layer)
    out = []
    for name, group in members.items():
        if len(group) == 1 and group[0][0] == name:
            out.append(group[0])
            continue
        grads = [g for _, g, _, _ in group if g is not None]
        params = [p for _, _, p, _ in group if p is not None]
        kinds: dict[str, int] = {}
        for *_, counts in group:
            for kind, n in counts:
                kinds[kind] = kinds.get(kind, 0) + n
        out.append((name, root_of_squares(grads) if grads else None, root_of_squares(params) if params else None,
                    tuple(kinds.items())))
    return out


def regrouped(tensors: dict, depth: int) -> dict:
    """The report's summaries with each tensor filed under its layer's group, so layer health and histograms are
    taken per group."""
    out = {}
    for kind, items in tensors.items():
        out[kind] = [(meta if (g := group_of(meta.layer, depth)) == meta.layer else replace(meta, layer=g), s)
                     for meta, s in items]
    return out


def _nonfinite(layer: Layer) -> bool:
    _, grad, param, kinds = layer
    return any(v is not None and not math.isfinite(v) for v in (grad, param)) or any(n for _, n in kinds)


def top(layers: Sequence[Layer], k: int, alerted: Iterable[str] = ()) -> list[Layer]:
    """The k layers to export, in the run's order: NaN/Inf first, then those a firing alert names, then by
    gradient norm, largest first (a layer without one last)."""
    if k <= 0 or len(layers) <= k:
        return list(layers)
    alerted = set(alerted)

    def rank(i: int) -> tuple:
        name, grad, _, _ = layers[i]
        tier = 0 if _nonfinite(layers[i]) else 1 if name in alerted else 2
        return tier, -grad if grad is not None else math.inf, i

    chosen = sorted(sorted(range(len(layers)), key=rank)[:k])
    return [layers[i] for i in chosen]


def histogram_pairs(tensors: dict, layers: frozenset[str]) -> int:
    """(layer, kind) pairs of the report with a histogram, among `layers`: what the run would fill."""
    return len({(meta.layer, kind) for kind in HIST_KINDS for meta, s in tensors.get(kind, ())
                if meta.layer in layers and len(s.histogram)})


def fair_shares(wants: Sequence[int], budget: int) -> list[int]:
    """Max-min fair split of `budget` slots: each gets min(want, level), the level as high as the budget allows; the
    few slots integer division leaves go to the first (in the given order) that want more than the level."""
    given = list(wants)
    left = budget
    rest = sorted(range(len(wants)), key=lambda i: wants[i])
    while rest:
        level = left // len(rest)
        if wants[rest[0]] > level:  # this one and every one after it want more than the level: they get it
            extra = left - level * len(rest)
            for n, i in enumerate(sorted(rest)):
                given[i] = level + (n < extra)
            break
        left -= wants[rest.pop(0)]
    return given


class SeriesBudget:
    """The policy above, with what each run went without (its most at one scrape) for the counters and the log.
    Thread-safe: concurrent scrapes share it."""

    def __init__(self, top_layers: int = 0, group_depth: int = 0):
        self.top_layers = top_layers
        self.group_depth = group_depth
        self._lock = threading.Lock()
        self._unexported: dict[str, int] = {}  # run -> most layers left without series at one scrape
        self._dropped: dict[str, int] = {}  # run -> most histograms left without a slot at one scrape
        self._totals = {"layers_unexported": 0, "histograms_dropped": 0}

    def plan(self, runs: Sequence[RunView], alerted: dict[str, set[str]], slots: int,
             now: float | None = None) -> dict[str, RunSeries]:
        """run -> what to export of it; `alerted`: run -> layers firing alerts name; `slots`: histogram slots."""
        now = time.time() if now is None else now
        depth, k = self.group_depth, self.top_layers
        layers, tensors, names, wants = {}, {}, {}, {}
        hidden = {}
        for run in runs:
            held = grouped(run.layers, depth) if depth else list(run.layers)
            named = {group_of(layer, depth) for layer in alerted.get(run.run, ())}
            layers[run.run] = top(held, k, named)
            hidden[run.run] = len(held) - len(layers[run.run])
            names[run.run] = frozenset(name for name, *_ in layers[run.run])
            tensors[run.run] = regrouped(run.tensors, depth) if depth and run.tensors else run.tensors
            wants[run.run] = histogram_pairs(tensors[run.run], names[run.run]) if run.tensors else 0
        given = self._slots(runs, wants, slots, now)
        self._tally(runs, hidden, {r: wants[r] - given[r] for r in wants}, wants, slots, now)
        return {r: RunSeries(layers[r], names[r], tensors[r], given[r]) for r in layers}

    @staticmethod
    def _slots(runs: Sequence[RunView], wants: dict[str, int], slots: int, now: float) -> dict[str, int]:
        live = [r.run for r in runs if wants[r.run] and _live(r, now)]
        finished = sorted((r for r in runs if wants[r.run] and not _live(r, now)),
                          key=lambda r: -(r.last_report_time or 0.0))
        given = dict.fromkeys(wants, 0)
        for run, share in zip(live, fair_shares([wants[r] for r in live], slots), strict=True):
            given[run] = share
        left = slots - sum(given.values())
        for r in finished:
            given[r.run] = min(wants[r.run], left)
            left -= given[r.run]
        return given

    def _tally(self, runs: Sequence[RunView], hidden: dict[str, int], dropped: dict[str, int],
               wants: dict[str, int], slots: int, now: float) -> None:
        """Counts what each run newly went without and logs a run's first time; forgets runs no longer held."""
        lines = []
        with self._lock:
            for name, most, counts in (("layers_unexported", self._unexported, hidden),
                                       ("histograms_dropped", self._dropped, dropped)):
                for run, n in counts.items():
                    before = most.get(run, 0)
                    if n > before:
                        most[run] = n
                        self._totals[name] += n - before
                        if not before:
                            lines.append((name, run, n))
                for run in [r for r in most if r not in counts]:
                    del most[run]
        live = {r.run for r in runs if _live(r, now)}
        for name, run, n in lines:
            if name == "layers_unexported":
                log.info("run %s: per-layer series on /metrics for %d of its %d layers%s, NaN/Inf and alerted "
                         "first, then by gradient norm (GRADWATCH_AGGREGATOR_METRICS_TOP_LAYERS=%d; the API and the "
                         "live view show every layer)", run, self.top_layers, self.top_layers + n,
                         " (groups)" if self.group_depth else "", self.top_layers)
            elif run in live:
                log.warning("run %s: %d of its %d magnitude histograms are left off /metrics: the %d slots "
                            "(GRADWATCH_AGGREGATOR_MAX_HISTOGRAM_LAYERS) are shared by the live runs; counted in "
                            "gradwatch_aggregator_histograms_dropped_total", run, n, wants[run], slots)
            else:
                log.info("run %s finished: %d of its %d magnitude histograms evicted from /metrics for live runs",
                         run, n, wants[run])

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._totals)


def _live(run: RunView, now: float) -> bool:
    return run.last_report_time is not None and now - run.last_report_time <= LIVE_S
