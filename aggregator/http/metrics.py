"""Prometheus exposition: metric families built at scrape time from a bounded copy of the state (AggregatorView)
(api.py serves them on /metrics).

Series exist only while their run is in the state (runs expire, layers are capped by max_layer_series), so nothing
accumulates in long-lived labelled children; how many a run has is bounded by the series budget (budget.py:
top-k layers, layer groups, histogram slots; the formula is in docs/architecture.md#series-budget).

The statistics a richer selection sends (`full`, or the kinds one by one) get a few per-layer gauges of their own,
taken from the same per-layer figures as the API's /tensors and /optimizer (tensorstats.layer_figures): optimizer
state norms, the update's RMS, the norm of the output gradients and the spread of the outputs. A run whose agent
does not send a kind has none of its gauges.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric

from gradwatch.aggregator import tensorstats
from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.backlog import Backlog
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import COUNTERS, HTTP_REFUSALS
from gradwatch.aggregator.health import BOUNDS, layer_health, layer_histograms
from gradwatch.aggregator.http.budget import STATE_KEYS, RunSeries, SeriesBudget
from gradwatch.aggregator.pace import RankPace
from gradwatch.aggregator.runstate import RunView
from gradwatch.limits import EXPORTED_SCALARS
from gradwatch.names import NOT_USER_PREFIXES
from gradwatch.v1 import run_pb2


@dataclass(frozen=True)
class AggregatorView:
    runs: list[RunView] = field(default_factory=list)
    firing: list[Alert] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, int] = field(default_factory=dict)  # rule -> firing alerts raised
    layer_series: int = 0
    histogram_budget: int = 64  # (layer, kind) magnitude histograms exported, all runs together
    ranks: dict[str, tuple[RankPace, ...]] = field(default_factory=dict)  # run -> its ranks' pace
    now: float | None = None  # when the copy was taken (unix seconds); None: at scrape


# The kinds with per-layer gauges of their own (_statistics_families): what `full` adds to the default agent's.
STATISTICS_KINDS = frozenset({tensorstats.OPTIMIZER_STATE, tensorstats.UPDATE, run_pb2.TENSOR_KIND_ACTIVATION,
                              run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT})

# Hyperparameters exported per run (the first by name), and the length of a text value's label.
MAX_HYPERPARAMETERS = 32
MAX_HYPERPARAMETER_TEXT = 64


class AggregatorCollector:
    """A custom collector: every scrape calls collect(), which copies the state once (under the
    aggregator's lock, via `view`) and builds the families from that copy without the lock. `config` gives the
    series budget (metrics_top_layers, metrics_layer_group_depth; defaults without one); `backlog` the latest
    backlog of the runs this replica follows (aggregator/backlog.py's BacklogMeter.read)."""

    def __init__(self, view: Callable[[], AggregatorView], config: AggregatorConfig | None = None,
                 backlog: Callable[[], Mapping[str, Backlog]] | None = None):
        self._view = view
        config = config or AggregatorConfig()
        self._budget = SeriesBudget(config.metrics_top_layers, config.metrics_layer_group_depth)
        self._backlog = backlog or dict

    def describe(self) -> Iterator[Metric]:
        # Names only, so registering twice in one registry fails loudly as it should.
        return self._families(AggregatorView(), SeriesBudget(), {})

    def collect(self) -> Iterator[Metric]:
        return self._families(self._view(), self._budget, self._backlog())

    @staticmethod
    def _families(snap: AggregatorView, budget: SeriesBudget, backlog: Mapping[str, Backlog]) -> Iterator[Metric]:
        run_gauges = {
            "step": ("gradwatch_run_step", "Latest optimizer step reported."),
            "loss": ("gradwatch_run_loss", "Training loss of the latest step."),
            "eval_loss": ("gradwatch_run_eval_loss", "Loss of the latest evaluation step."),
            "learning_rate": ("gradwatch_run_learning_rate", "Learning rate of optimizer parameter group 0."),
            "grad_norm": ("gradwatch_run_grad_norm", "Global L2 norm of the gradients of the latest step."),
            "steps_per_second": ("gradwatch_run_steps_per_second", "Optimizer steps per second, recent reports."),
            "last_report_time": ("gradwatch_run_last_report_timestamp_seconds",
                                 "Capture time of the latest report, unix seconds."),
        }
        families = {attr: GaugeMetricFamily(name, doc, labels=["run"]) for attr, (name, doc) in run_gauges.items()}
        grad = GaugeMetricFamily("gradwatch_layer_grad_norm", "L2 norm of the layer's parameter gradients.",
                                 labels=["run", "layer"])
        param = GaugeMetricFamily("gradwatch_layer_param_norm", "L2 norm of the layer's parameters.",
                                  labels=["run", "layer"])
        nonfinite = GaugeMetricFamily("gradwatch_layer_nonfinite_values",
                                      "NaN and Inf values in the layer's tensors of one kind, latest report.",
                                      labels=["run", "layer", "kind"])
        update = GaugeMetricFamily("gradwatch_layer_update_ratio",
                                   "||update|| / ||weight|| of the layer in the latest step (the agent sends updates).",
                                   labels=["run", "layer"])
        dead = GaugeMetricFamily("gradwatch_layer_dead_fraction",
                                 "Units never active since the last report (ReLU/ReLU6 unit counts), else the "
                                 "fraction of exact zeros in the layer's ReLU-like (min >= 0) activations.",
                                 labels=["run", "layer"])
        saturated = GaugeMetricFamily("gradwatch_layer_saturated_fraction",
                                      "Fraction of the layer's [-1, 1]-bounded activations with |y| >= 0.5.",
                                      labels=["run", "layer"])
        magnitude = GaugeHistogramMetricFamily(
            "gradwatch_layer_magnitude", "log2-magnitude histogram of the layer's values of one kind, latest step "
            "(le: upper bound of |x|; a bounded set of layers)", labels=["run", "layer", "kind"])
        scalar = GaugeMetricFamily("gradwatch_run_scalar", "User scalar of the latest training report (accuracy, ...).",
                                   labels=["run", "name"])
        eval_scalar = GaugeMetricFamily("gradwatch_run_eval_scalar", "User scalar of the latest evaluation report.",
                                        labels=["run", "name"])
        world = GaugeMetricFamily("gradwatch_run_world_size", "Ranks of the run, from the registrations.",
                                  labels=["run"])
        joined_ranks = GaugeMetricFamily("gradwatch_run_ranks_joined",
                                         "Ranks that reported the latest step the cross-rank join closed.",
                                         labels=["run"])
        hyper = GaugeMetricFamily("gradwatch_run_hyperparameter",
                                  "Numeric hyperparameter of the run's registration (booleans as 0 and 1).",
                                  labels=["run", "name"])
        hyper_info = GaugeMetricFamily("gradwatch_run_hyperparameter_info",
                                       "1 for each text hyperparameter of the run's registration (value: its first "
                                       f"{MAX_HYPERPARAMETER_TEXT} characters).", labels=["run", "name", "value"])
        alerted: dict[str, set[str]] = {}
        for alert in snap.firing:
            alerted.setdefault(alert.run, set()).add(alert.layer)
        plan = budget.plan(snap.runs, alerted, snap.histogram_budget, snap.now)
        for run in snap.runs:
            exported = plan[run.run]
            if run.world_size:
                world.add_metric([run.run], run.world_size)
            if run.joined is not None:
                joined_ranks.add_metric([run.run], len(run.joined.parts))
            if run.hyperparameters:
                _hyperparameters(run, hyper, hyper_info)
            for family, values in ((scalar, run.scalars), (eval_scalar, run.eval_scalars)):
                # At most EXPORTED_SCALARS per run; label counts and learning rates have their own series or none.
                names = sorted(k for k in values if not k.startswith(NOT_USER_PREFIXES))[:EXPORTED_SCALARS]
                for name in names:
                    family.add_metric([run.run, name], values[name])
            if exported.tensors:
                for layer, h in layer_health(exported.tensors, exported.names).items():
                    for family, value in ((update, h.update_ratio), (dead, h.dead_fraction),
                                          (saturated, h.saturated_fraction)):
                        if value is not None:
                            family.add_metric([run.run, layer], value)
                if exported.histograms > 0:
                    hists = layer_histograms(exported.tensors, exported.names, exported.histograms)
                    for layer, kind, cumulative, total in hists:
                        buckets = [(_le(b), float(c)) for b, c in zip(BOUNDS, cumulative, strict=True)]
                        magnitude.add_metric([run.run, layer, kind], buckets, total)
            for attr, family in families.items():
                value = getattr(run, attr)
                if value is not None and (attr != "step" or value >= 0):
                    family.add_metric([run.run], float(value))
            for layer, grad_norm, param_norm, kinds in exported.layers:
                if grad_norm is not None:
                    grad.add_metric([run.run, layer], grad_norm)
                if param_norm is not None:
                    param.add_metric([run.run, layer], param_norm)
                for kind, count in kinds:
                    nonfinite.add_metric([run.run, layer, kind], count)
        yield from families.values()
        yield from (grad, param, nonfinite, update, dead, saturated, magnitude, scalar, eval_scalar, world,
                    joined_ranks, hyper, hyper_info)
        yield from _statistics_families(snap.runs, plan)
        yield from _rank_families(snap)
        yield from _backlog_families(snap, backlog)

        firing = GaugeMetricFamily("gradwatch_alert_firing", "1 while the rule's alert is firing for the run.",
                                   labels=["run", "rule", "layer"])
        for alert in snap.firing:
            firing.add_metric([alert.run, alert.rule, alert.layer], 1)
        yield firing

        own = budget.counts()  # what the series budget left out, counted here at scrape time
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"gradwatch_aggregator_{name}", doc,
                                      value=snap.counters.get(name, 0) + own.get(name, 0))
        alerts = CounterMetricFamily("gradwatch_aggregator_alerts", "Alerts raised (firing transitions).",
                                     labels=["rule"])
        for rule, count in sorted(snap.alerts.items()):
            alerts.add_metric([rule], count)
        yield alerts
        yield GaugeMetricFamily("gradwatch_aggregator_runs", "Runs held in the state.", value=len(snap.runs))
        yield GaugeMetricFamily("gradwatch_aggregator_layer_series", "Layers held in the state, all runs.",
                                value=snap.layer_series)


class RefusalCollector:
    """gradwatch_aggregator_http_refused_total{reason}: the requests the HTTP port turned away for want of a
    token (access.py), read at each scrape from the port's own tally."""

    NAME = "gradwatch_aggregator_http_refused"

    def __init__(self, read: Callable[[], dict[str, int]]):
        self._read = read

    def describe(self) -> Iterator[Metric]:
        yield self._family({})

    def collect(self) -> Iterator[Metric]:
        yield self._family(self._read())

    def _family(self, counts: dict[str, int]) -> Metric:
        doc = "HTTP requests refused for want of a token, by reason: " + "; ".join(
            f"{reason}: {what}" for reason, what in HTTP_REFUSALS.items()) + "."
        family = CounterMetricFamily(self.NAME, doc, labels=["reason"])
        for reason, count in sorted(counts.items()):
            family.add_metric([reason], count)
        return family


def _statistics_families(runs: list[RunView], plan: dict[str, RunSeries]) -> Iterator[Metric]:
    """Per exported layer (or group), from its tensors of a kind taken as one, exactly as /tensors and /optimizer
    figure them: NaN and Inf as values (a norm over a NaN is NaN, a std over a NaN or an Inf NaN), never 0. At most
    STATE_KEYS optimizer state keys per layer, the first in the report's order (Adam: exp_avg, exp_avg_sq)."""
    state = GaugeMetricFamily("gradwatch_layer_optimizer_state_norm",
                              "L2 norm of the optimizer's state of one key over the layer's parameters, latest "
                              "report (Adam: exp_avg, exp_avg_sq; SGD: momentum_buffer).",
                              labels=["run", "layer", "state"])
    update_rms = GaugeMetricFamily("gradwatch_layer_update_rms",
                                   "RMS of the update w_after - w_before over the layer's parameters in the latest "
                                   "step: the effective step size (the agent sends updates).", labels=["run", "layer"])
    grad = GaugeMetricFamily("gradwatch_layer_activation_grad_norm",
                             "L2 norm of the gradients of the layer's outputs, latest report.", labels=["run", "layer"])
    std = GaugeMetricFamily("gradwatch_layer_activation_std",
                            "Standard deviation of the layer's outputs over all their elements, latest report "
                            "(NaN when one is NaN or Inf).", labels=["run", "layer"])
    for run in runs:
        exported = plan[run.run]
        if not exported.tensors or not STATISTICS_KINDS.intersection(exported.tensors):
            continue
        keys: dict[str, int] = {}  # layer -> state keys given a series
        for (layer, kind, key), f in tensorstats.layer_figures(exported.tensors, STATISTICS_KINDS,
                                                               exported.names).items():
            if kind == "optimizer_state":
                if keys.get(layer, 0) < STATE_KEYS:
                    keys[layer] = keys.get(layer, 0) + 1
                    state.add_metric([run.run, layer, key], f["norm"])
            elif kind == "update":
                if f["count"]:
                    update_rms.add_metric([run.run, layer], f["norm"] / math.sqrt(f["count"]))
            elif kind == "activation_gradient":
                grad.add_metric([run.run, layer], f["norm"])
            elif f["std"] is not None:
                std.add_metric([run.run, layer], f["std"])
    yield from (state, update_rms, grad, std)


def _rank_families(snap: AggregatorView) -> Iterator[Metric]:
    step = GaugeMetricFamily("gradwatch_rank_step_seconds", "Seconds per optimizer step of the rank, from the "
                             "capture times of its last 10 training reports.", labels=["run", "rank"])
    lag = GaugeMetricFamily("gradwatch_rank_report_lag_seconds", "Seconds from the capture time of the rank's "
                            "latest training report to now (this aggregator's clock).", labels=["run", "rank"])
    now = time.time() if snap.now is None else snap.now
    for run, paces in snap.ranks.items():
        for p in paces:
            if p.seconds_per_step is not None:
                step.add_metric([run, str(p.rank)], p.seconds_per_step)
            lag.add_metric([run, str(p.rank)], max(0.0, now - p.last_capture))  # an agent clock ahead reads 0
    yield from (step, lag)


def _backlog_families(snap: AggregatorView, backlog: Mapping[str, Backlog]) -> Iterator[Metric]:
    seconds = GaugeMetricFamily("gradwatch_run_backlog_seconds", "Seconds since Redis added the oldest entry of the "
                                "run's report stream this aggregator has not yet applied and acknowledged; 0 when "
                                "none waits (measured once per discovery interval).", labels=["run"])
    entries = GaugeMetricFamily("gradwatch_run_backlog_entries", "Entries in the run's report stream: not yet applied "
                                "and acknowledged (each commit trims the rest).", labels=["run"])
    now = time.time() if snap.now is None else snap.now
    for run, b in sorted(backlog.items()):
        seconds.add_metric([run], b.seconds(now))
        entries.add_metric([run], b.entries)
    yield from (seconds, entries)


def _hyperparameters(run: RunView, numeric: GaugeMetricFamily, text: GaugeMetricFamily) -> None:
    """The first MAX_HYPERPARAMETERS of the run's hyperparameters by name: numbers (and booleans) as
    gauges, text as info series; unset ones are left out."""
    for name in sorted(run.hyperparameters)[:MAX_HYPERPARAMETERS]:
        value = run.hyperparameters[name]
        if isinstance(value, bool | int | float):
            numeric.add_metric([run.run, name], float(value))
        elif isinstance(value, str):
            text.add_metric([run.run, name, value[:MAX_HYPERPARAMETER_TEXT]], 1)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:.6g}"
