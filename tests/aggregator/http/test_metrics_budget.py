"""The /metrics series budget (aggregator/http/budget.py), read from the real exposition: a run's series follow the
formula of docs/architecture.md#series-budget, top-k layers and layer groups as configured, histogram slots for
live runs first and finished runs evicted first; what is left out is counted and logged once per run."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.backlog import Backlog
from gradwatch.aggregator.config import DEFAULT_METRICS_TOP_LAYERS, AggregatorConfig
from gradwatch.aggregator.http.budget import LIVE_S, fair_shares, group_of, grouped, root_of_squares, top
from gradwatch.aggregator.http.metrics import MAX_HYPERPARAMETERS, AggregatorCollector, AggregatorView
from gradwatch.aggregator.join import JoinedStep
from gradwatch.aggregator.pace import RankPace
from gradwatch.aggregator.report import TensorMeta
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.runstate import RunView
from gradwatch.limits import EXPORTED_SCALARS
from gradwatch.v1 import report_pb2, run_pb2

NOW = 1_800_000_000.0
KIND = {"parameter": run_pb2.TENSOR_KIND_PARAMETER, "gradient": run_pb2.TENSOR_KIND_GRADIENT,
        "activation": run_pb2.TENSOR_KIND_ACTIVATION, "update": run_pb2.TENSOR_KIND_UPDATE,
        "optimizer_state": run_pb2.TENSOR_KIND_OPTIMIZER_STATE,
        "activation_gradient": run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT}
WATCHED = ("parameter", "gradient", "activation", "update")  # activations and updates watched
FULL = tuple(KIND)  # select="full": every kind, Adam's two moments per parameter
STATISTICS = {"gradwatch_layer_optimizer_state_norm", "gradwatch_layer_update_rms",
              "gradwatch_layer_activation_grad_norm", "gradwatch_layer_activation_std"}
PER_LAYER = {"gradwatch_layer_grad_norm", "gradwatch_layer_param_norm", "gradwatch_layer_nonfinite_values",
             "gradwatch_layer_update_ratio", "gradwatch_layer_dead_fraction", "gradwatch_layer_saturated_fraction",
             *STATISTICS}
HISTOGRAM = "gradwatch_layer_magnitude"


def summary(kind: str, norm: float = 1.0, histogram: bool = True) -> report_pb2.TensorSummary:
    s = report_pb2.TensorSummary(count=100, sum_squares=norm * norm, min=-norm, max=norm)
    if kind == "activation":  # ReLU-like and [-1, 1]-bounded: a dead and a saturated fraction
        s.min, s.max, s.zero_count, s.sum_squares = 0.0, 0.9, 10, 40.0
    if histogram:
        s.histogram_offset = 40
        s.histogram.extend([50, 50])
    return s


def run_view(run: str, norms: dict[str, float | None], *, t: float = NOW, kinds=("parameter", "gradient"),
             histograms: bool = True, ranks: int = 1, states=("exp_avg", "exp_avg_sq"), **extra) -> RunView:
    """A run as State.views() makes it: one latest report with `kinds` for each layer of `norms`
    (layer -> gradient norm), in that order; optimizer state as one tensor per key of `states`."""
    tensors: dict[int, list] = {}
    layers = []
    for order, (layer, norm) in enumerate(norms.items()):
        for kind in kinds:
            names = [f"{layer}.weight.{key}" for key in states] if kind == "optimizer_state" else [f"{layer}.{kind}"]
            for name in names:
                meta = TensorMeta.of(name, KIND[kind], layer, order)
                tensors.setdefault(KIND[kind], []).append((meta, summary(kind, 1.0 if norm is None else norm,
                                                                         histograms)))
        nonfinite = tuple((kind, 0 if norm is None or math.isfinite(norm) else 5) for kind in kinds)
        layers.append((layer, norm, 10.0, nonfinite))
    joined = JoinedStep(run, 7, t, ranks, dict.fromkeys(range(ranks)), "complete") if ranks > 1 else None
    return RunView(run, 7, 0.5, 0.6, 1e-3, 2.0, 3.0, t, tuple(layers), ranks, tuple(range(ranks)), joined,
                   tensors=tensors, **extra)


def exposition(registry: CollectorRegistry) -> list:
    """Every sample of one scrape, parsed back from the text format Prometheus reads."""
    text = generate_latest(registry).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


class Scraper:
    """One collector (its budget remembers what each run went without) scraped over changing views."""

    def __init__(self, backlog=None, **config):
        self.view = AggregatorView()
        self.registry = CollectorRegistry()
        self.registry.register(AggregatorCollector(lambda: self.view, AggregatorConfig(**config), backlog))

    def __call__(self, view: AggregatorView) -> list:
        self.view = view
        return exposition(self.registry)


def scrape(view: AggregatorView, **config) -> list:
    return Scraper(**config)(view)


def per_run(samples: list, run: str) -> Counter:
    """family -> series of `run` in a scrape (histogram samples under the histogram's name)."""
    out: Counter = Counter()
    for s in samples:
        if s.labels.get("run") == run:
            out[HISTOGRAM if s.name.startswith(HISTOGRAM) else s.name] += 1
    return out


def layers_of(samples: list, run: str, family: str = "gradwatch_layer_grad_norm") -> dict[str, float]:
    return {s.labels["layer"]: s.value for s in samples if s.name == family and s.labels["run"] == run}


def counter(samples: list, name: str) -> float:
    (value,) = [s.value for s in samples if s.name == f"gradwatch_aggregator_{name}_total"]
    return value


# -- the formula ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("layers", "kinds", "config", "exported", "per_layer"), [
    (4, ("parameter", "gradient"), {}, 4, 4),  # a small model, defaults: every layer, as before the budget
    (2000, ("parameter", "gradient"), {}, DEFAULT_METRICS_TOP_LAYERS, 4),  # the default agent on a big model
    (2000, WATCHED, {}, DEFAULT_METRICS_TOP_LAYERS, 11),  # K = 4, three health gauges, F = 2 (update, std)
    (2000, FULL, {}, DEFAULT_METRICS_TOP_LAYERS, 16),  # select="full" with Adam: K = 6, F = 2 + 3
    (4, FULL, {}, 4, 16),  # a small full model: every layer
    (2000, ("parameter", "gradient"), {"metrics_top_layers": 0}, 2000, 4),  # top-k off
    (2000, ("parameter", "gradient"), {"metrics_layer_group_depth": 2}, 20, 4),  # blocks.<i>: 20 groups
    (2000, FULL, {"metrics_layer_group_depth": 2}, 20, 16),  # groups of full layers: still two state keys each
])
def test_series_per_run_follow_the_documented_formula(layers, kinds, config, exported, per_layer):
    """Everything a run can have at once: 8 ranks, a joined step, more scalars and hyperparameters than exported,
    an alert of every rule, a backlog and every histogram slot. The count is the formula's
    107 + A + 2R + E(5 + K + F) + 18H, with E exported layers of `per_layer` = 5 + K + F series where all health
    applies (F: one optimizer_state_norm per state key, update_rms, activation_std, activation_grad_norm)."""
    ranks = 8
    norms = {f"blocks.{i // 100}.layer{i % 100}": 1.0 + i for i in range(layers)}
    scalars = {f"acc{i}": 0.5 for i in range(EXPORTED_SCALARS + 5)}
    hyper = {f"h{i:02d}": i for i in range(MAX_HYPERPARAMETERS + 5)}
    run = run_view("big", norms, kinds=kinds, ranks=ranks, scalars=scalars, eval_scalars=scalars,
                   hyperparameters=hyper)
    rules = [rule.name for rule in RuleEngine(AggregatorConfig()).rules]
    firing = [Alert(rule, "firing", "big", 7, 0, "blocks.0.layer0", "", 1.0, 0.0, "warning", "s", "t")
              for rule in rules]
    paces = {"big": tuple(RankPace(r, 0.1, NOW) for r in range(ranks))}
    view = AggregatorView([run], firing, histogram_budget=64, ranks=paces, now=NOW)
    samples = Scraper(lambda: {"big": Backlog(3, 1, NOW - 5)}, **config)(view)
    got = per_run(samples, "big")
    histograms = min(64, exported * len(set(kinds) - {"optimizer_state", "activation_gradient"}))
    statistics = 2 * ("optimizer_state" in kinds) + sum(k in kinds for k in ("update", "activation",
                                                                              "activation_gradient"))

    assert len(layers_of(samples, "big")) == exported
    assert sum(got[f] for f in STATISTICS) == exported * statistics
    assert sum(got[f] for f in PER_LAYER) == exported * per_layer
    assert got[HISTOGRAM] == 18 * histograms
    assert got["gradwatch_alert_firing"] == len(rules)
    assert sum(got.values()) == 107 + len(rules) + 2 * ranks + exported * per_layer + 18 * histograms


@pytest.mark.parametrize(("kinds", "top_k", "untrimmed"), [
    (("parameter", "gradient"), 2299, 9275),  # the default agent
    (FULL, 5371, 33275),  # select="full" with Adam: 16 series per layer
])
def test_a_2000_layer_run_stays_within_the_documented_budget(kinds, top_k, untrimmed):
    """docs/architecture.md#series-budget: 2,299 series plus its firing alerts for a 2,000-layer run of 8 ranks with
    the default agent and settings (9,275 without top-k), 5,371 with select="full" (33,275)."""
    run = run_view("big", {f"l{i}": float(i) for i in range(2000)}, kinds=kinds, ranks=8)
    view = AggregatorView([run], histogram_budget=64, ranks={"big": tuple(RankPace(r, 0.1, NOW) for r in range(8))},
                          now=NOW)
    assert sum(per_run(scrape(view), "big").values()) <= top_k
    assert sum(per_run(scrape(view, metrics_top_layers=0), "big").values()) <= untrimmed


# -- top-k and groups -----------------------------------------------------------------------------------------------

def test_top_layers_put_nan_inf_and_alerted_layers_first_then_the_largest_norms():
    norms = {"embed": 1.0, "fc1": math.nan, "fc2": 50.0, "fc3": 0.5, "fc4": 20.0, "head": math.inf, "out": None}
    firing = [Alert("VanishingGradient", "firing", "r", 7, 0, "fc3", "", 1.0, 0.0, "warning", "s", "t")]
    samples = scrape(AggregatorView([run_view("r", norms)], firing, now=NOW), metrics_top_layers=4)
    shown = layers_of(samples, "r")
    assert set(shown) == {"fc1", "head", "fc3", "fc2"}
    assert math.isnan(shown["fc1"]) and shown["head"] == math.inf  # NaN and Inf as values, never 0
    assert set(layers_of(samples, "r", "gradwatch_layer_nonfinite_values")) == set(shown)
    assert {s.labels["layer"] for s in samples if s.name.startswith(HISTOGRAM)} <= set(shown)
    assert top([(n, g, None, ()) for n, g in norms.items()], 0) == [(n, g, None, ()) for n, g in norms.items()]


def test_groups_fold_norms_as_the_root_of_summed_squares_and_keep_nan_and_inf():
    norms = {"model.layers.0.attn": 3.0, "model.layers.0.mlp": 4.0, "model.layers.1.attn": math.nan,
             "model.layers.1.mlp": 1.0, "model.layers.2.attn": math.inf, "model.layers.2.mlp": 1e200,
             "model.norm": 2.0, "lm_head": 0.0}
    samples = scrape(AggregatorView([run_view("r", norms)], now=NOW), metrics_layer_group_depth=3)
    shown = layers_of(samples, "r")
    assert set(shown) == {"model.layers.0", "model.layers.1", "model.layers.2", "model.norm", "lm_head"}
    assert shown["model.layers.0"] == pytest.approx(5.0)
    assert math.isnan(shown["model.layers.1"])
    assert shown["model.layers.2"] == math.inf
    assert shown["lm_head"] == 0.0  # a true zero stays 0
    assert layers_of(samples, "r", "gradwatch_layer_param_norm")["model.layers.0"] == pytest.approx(math.hypot(10, 10))
    nonfinite = {(s.labels["layer"], s.labels["kind"]): s.value for s in samples
                 if s.name == "gradwatch_layer_nonfinite_values"}
    assert nonfinite[("model.layers.1", "gradient")] == 5 and nonfinite[("model.layers.0", "gradient")] == 0
    # the group's histogram adds its layers' (log2 histograms add exactly)
    gcount = {(s.labels["layer"], s.labels["kind"]): s.value for s in samples if s.name == f"{HISTOGRAM}_gcount"}
    assert gcount[("model.layers.0", "gradient")] == 200


@pytest.mark.parametrize(("layer", "depth", "group"), [
    ("model.layers.3.mlp.up_proj", 3, "model.layers.3"),
    ("model.layers.3.mlp.up_proj", 1, "model"),
    ("model.norm", 3, "model.norm"),
    ("fc1", 2, "fc1"),
    ("a.b", 0, "a.b"),
])
def test_group_of_a_module_path(layer, depth, group):
    assert group_of(layer, depth) == group


def test_root_of_squares_never_overflows_or_hides_nan():
    assert root_of_squares([1e200, 1e200]) == pytest.approx(math.sqrt(2) * 1e200)
    assert math.isnan(root_of_squares([math.inf, math.nan]))
    assert root_of_squares([math.inf, 1.0]) == math.inf
    assert grouped([("a.x", None, None, ()), ("a.y", None, None, ())], 1) == [("a", None, None, ())]


def test_layers_left_out_are_counted_and_logged_once_per_run(caplog):
    view = AggregatorView([run_view("r1", {f"l{i}": float(i) for i in range(10)}),
                           run_view("r2", {f"l{i}": float(i) for i in range(3)})], now=NOW)
    scraper = Scraper(metrics_top_layers=4)
    with caplog.at_level(logging.INFO, logger="gradwatch.aggregator"):
        samples, again = scraper(view), scraper(view)
    assert set(layers_of(samples, "r1")) == {"l6", "l7", "l8", "l9"} and len(layers_of(samples, "r2")) == 3
    assert counter(samples, "layers_unexported") == counter(again, "layers_unexported") == 6  # once, not per scrape
    lines = [r.getMessage() for r in caplog.records]
    assert sum("run r1:" in line for line in lines) == 1 and not any("run r2" in line for line in lines)


# -- histogram slots ------------------------------------------------------------------------------------------------

def test_fair_shares():
    assert fair_shares([], 64) == []
    assert fair_shares([100, 100], 64) == [32, 32]
    assert fair_shares([10, 100, 100], 64) == [10, 27, 27]
    assert fair_shares([4, 4, 4], 2) == [1, 1, 0]  # the remainder to the first: the runs followed longest
    assert fair_shares([4, 1, 4], 4) == [2, 1, 1]
    assert fair_shares([3, 3], 100) == [3, 3]
    assert sum(fair_shares([7, 9, 11, 13], 31)) == 31


def slot_view(now: float, **runs: tuple[float, int]) -> AggregatorView:
    """runs: name -> (capture time of its latest report, layers with a gradient and a parameter histogram)."""
    return AggregatorView([run_view(name, {f"{name}.l{i}": 1.0 for i in range(n)}, t=t)
                           for name, (t, n) in runs.items()], histogram_budget=64, now=now)


def histograms_of(samples: list) -> Counter:
    return Counter(s.labels["run"] for s in samples if s.name == f"{HISTOGRAM}_gcount")


def test_two_finished_runs_filling_the_slots_give_them_up_to_a_live_run(caplog):
    """The issue's case: two finished runs took all 64 slots; a live run that starts gets what it wants, and the
    finished runs give it up, the one that finished first first."""
    old, older = NOW - 2 * LIVE_S, NOW - 3 * LIVE_S
    scraper = Scraper()
    samples = scraper(slot_view(NOW, a=(older, 16), b=(old, 16)))  # 16 layers x 2 kinds each
    assert histograms_of(samples) == {"a": 32, "b": 32}
    assert counter(samples, "histograms_dropped") == 0

    with caplog.at_level(logging.INFO, logger="gradwatch.aggregator"):
        samples = scraper(slot_view(NOW, a=(older, 16), b=(old, 16), live=(NOW - 1, 10)))
    assert histograms_of(samples) == {"live": 20, "b": 32, "a": 12}
    assert counter(samples, "histograms_dropped") == 20  # a's, once
    assert [r.levelno for r in caplog.records if "run a" in r.getMessage()] == [logging.INFO]  # finished: no warning

    # two live runs wanting 40 each share the slots evenly (not the newest first), the finished ones get none
    samples = scraper(slot_view(NOW, a=(older, 16), b=(old, 16), live=(NOW - 1, 20), next=(NOW, 20)))
    assert histograms_of(samples) == {"live": 32, "next": 32}


def test_a_live_run_without_a_slot_is_counted_and_warned_about_once(caplog):
    view = dataclasses.replace(slot_view(NOW, r1=(NOW, 2), r2=(NOW, 2), r3=(NOW, 2)), histogram_budget=2)
    scraper = Scraper()
    with caplog.at_level(logging.INFO, logger="gradwatch.aggregator"):
        samples, again = scraper(view), scraper(view)
    assert histograms_of(samples) == {"r1": 1, "r2": 1}  # fair: one each while the slots last
    assert counter(samples, "histograms_dropped") == counter(again, "histograms_dropped") == 3 + 3 + 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and sum("run r3:" in w for w in warnings) == 1


def test_histogram_slots_on_a_real_aggregator(make_aggregator, build, publish, run_all):
    """Real Redis, reports with histograms (4 layers x 3 kinds: 12 each): two runs whose latest reports are an hour
    old hold the 4 slots, the more recent first; a live run that reports takes them all and, wanting 12, is
    counted."""
    agg = make_aggregator(max_histogram_layers=4)
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(agg.view, agg.config))

    def report(run: str, t: float) -> None:
        publish.registration(build.registration(run=run))
        r = build.report(0, run=run, t=t)
        for s in r.tensors:
            s.histogram_offset = 40
            s.histogram.extend([100, 156])
        publish.report(r)
        run_all(agg)

    report("old-a", time.time() - 3600)
    report("old-b", time.time() - 3500)
    before = exposition(registry)
    assert histograms_of(before) == {"old-b": 4}
    assert counter(before, "histograms_dropped") == 12 + 8

    report("live", time.time())
    after = exposition(registry)
    assert histograms_of(after) == {"live": 4}
    assert counter(after, "histograms_dropped") == 12 + 12 + 8
