"""Grafana dashboards as code, built with grafana-foundation-sdk: run overview, layers, activation
health, histograms, runs compared and ingest health. Every query uses metrics the aggregator and
collector export (README, Metrics) or the recording rules in deploy/prometheus/rules; grafana.py writes
them to deploy/grafana/dashboards and pushes them to a Grafana.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'run=~"$run"'
RUN_LAYER = 'run=~"$run", layer=~"$layer"'
TAGS = ["gradwatch"]
ALERT_ANNOTATION = "gradwatch alerts"
# Prometheus annotation fields the SDK's AnnotationQuery does not model; render() adds them.
ALERT_ANNOTATION_FIELDS = {"titleFormat": "{{rule}}", "textFormat": "{{rule}} in layer {{layer}} of run {{run}}",
                           "tagKeys": "rule,layer,run", "step": "10s", "useValueForTime": False}


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).range()
    return q.legend_format(legend) if legend else q


def queries(panel, *targets: tuple[str, str]):
    """Attach (expr, legend) targets with ref ids A, B, ... and the dashboard's datasource."""
    panel.datasource(DATASOURCE)
    for i, (expr, legend) in enumerate(targets):
        panel.with_target(query(expr, legend, chr(ord("A") + i)).datasource(DATASOURCE))
    return panel


def series(title: str, *targets: tuple[str, str], unit: str = "short", log: bool = False, width: int = 12,
           description: str = "") -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).span(width).height(8).line_width(1).fill_opacity(10)
    if log:
        panel.scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10))
    if description:
        panel.description(description)
    return queries(panel, *targets)


def number(title: str, expr: str, unit: str = "short", width: int = 4, legend: str = "{{run}}") -> stat.Panel:
    panel = (stat.Panel().title(title).unit(unit).span(width).height(4)
             .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    return queries(panel, (expr, legend))


def states(title: str, expr: str, legend: str, description: str, width: int = 24) -> statetimeline.Panel:
    panel = (statetimeline.Panel().title(title).description(description).span(width).height(8)
             .show_value(cm.VisibilityMode.NEVER).merge_values(True)
             .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
                 dm.Threshold(value=None, color="green"), dm.Threshold(value=1, color="red")])))
    return queries(panel, (expr, legend))


def layer_heatmap(title: str, expr: str, description: str) -> heatmap.Panel:
    """One row per layer over time (the series are the rows: no bucketing), colour on a log-like scale."""
    panel = (heatmap.Panel().title(title).description(description).span(24).height(10).calculate(False)
             .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Spectral")
                    .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.3).steps(64).reverse(True))
             .y_axis(heatmap.YAxisConfig().axis_placement(cm.AxisPlacement.LEFT))
             .cell_gap(1).show_value(cm.VisibilityMode.NEVER))
    return queries(panel, (expr, "{{layer}}"))


LAYERS_WITH_GRADIENTS = 'label_values(gradwatch_layer_grad_norm{run=~"$run"}, layer)'
# Activation-only modules have no gradient: their layers come from the activation health series.
LAYERS_WITH_ACTIVATIONS = ('label_values({__name__=~"gradwatch_layer_(dead|saturated)_fraction", run=~"$run"}, '
                           'layer)')
LAYERS_WITH_HISTOGRAMS = 'label_values(gradwatch_layer_magnitude_bucket{run=~"$run"}, layer)'


def variables(dash: db.Dashboard, layers: str | None = None, all_runs: bool = False) -> db.Dashboard:
    """datasource and run (all_runs: with an All option, the default), and a multi-value layer variable
    (default: all) from the `layers` query."""
    dash.with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    run = (db.QueryVariable("run").label("run").datasource(DATASOURCE)
           .query("label_values(gradwatch_run_step, run)").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
           .sort(dm.VariableSort.ALPHABETICAL_ASC).multi(True))
    if all_runs:
        run.include_all(True).all_value(".*").current(dm.VariableOption(selected=True, text=["All"],
                                                                        value=["$__all"]))
    dash.with_variable(run)
    if layers:
        dash.with_variable(db.QueryVariable("layer").label("layer").datasource(DATASOURCE).query(layers)
                           .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
                           .multi(True).include_all(True).all_value(".*")
                           .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"])))
    return dash


def base(uid: str, title: str, description: str, layers: str | None = None,
         all_runs: bool = False) -> db.Dashboard:
    dash = (db.Dashboard(title).uid(uid).description(description).tags(TAGS).time("now-1h", "now").refresh("10s")
            .timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR).editable())
    dash.annotation(db.AnnotationQuery().name(ALERT_ANNOTATION).datasource(DATASOURCE).enable(True)
                    .icon_color("red").expr(f"gradwatch_alert_firing{{{RUN}}} > 0"))
    return variables(dash, layers, all_runs)


def run_overview() -> db.Dashboard:
    return (base("gradwatch-run-overview", "gradwatch / Run overview",
                 "Loss, gradient norm, speed and alerts of training runs; alerts show as annotations.")
            .with_row(db.Row("Now"))
            .with_panel(number("Step", f"gradwatch_run_step{{{RUN}}}"))
            .with_panel(number("Loss", f"gradwatch_run_loss{{{RUN}}}"))
            .with_panel(number("Gradient norm", f"gradwatch_run_grad_norm{{{RUN}}}", unit="sci"))
            .with_panel(number("Steps/s", f"gradwatch_run_steps_per_second{{{RUN}}}"))
            .with_panel(number("Firing alerts", f"count by (run) (gradwatch_alert_firing{{{RUN}}} > 0) "
                                                f"or on (run) 0 * gradwatch_run_step{{{RUN}}}"))
            .with_panel(number("Seconds since last report",
                               f"time() - gradwatch_run_last_report_timestamp_seconds{{{RUN}}}", unit="s"))
            .with_row(db.Row("Training"))
            .with_panel(series("Loss (train and validation)", (f"gradwatch_run_loss{{{RUN}}}", "train {{run}}"),
                               (f"gradwatch_run_eval_loss{{{RUN}}}", "validation {{run}}")))
            .with_panel(series("Global gradient norm", (f"gradwatch_run_grad_norm{{{RUN}}}", "{{run}}"), log=True))
            .with_panel(series("Steps per second", (f"gradwatch_run_steps_per_second{{{RUN}}}", "{{run}}")))
            .with_panel(series("Learning rate", (f"gradwatch_run_learning_rate{{{RUN}}}", "{{run}}"), log=True))
            .with_row(db.Row("Alerts"))
            .with_panel(states("Firing alerts", f"gradwatch_alert_firing{{{RUN}}}", "{{rule}} {{layer}} ({{run}})",
                               "1 while the aggregator's rule fires for the run (gradwatch_alert_firing).")))


def layers() -> db.Dashboard:
    return (base("gradwatch-layers", "gradwatch / Layers",
                 "Per-layer gradient norms, update ratios, parameter norms and NaN/Inf counts over steps.",
                 layers=LAYERS_WITH_GRADIENTS)
            .with_panel(layer_heatmap("Gradient norm per layer", f"gradwatch_layer_grad_norm{{{RUN_LAYER}}}",
                                      "L2 norm of each layer's gradients (gradwatch_layer_grad_norm)."))
            .with_panel(layer_heatmap(
                "Update ratio per layer (|ΔW|/|W|)", f"gradwatch_layer_update_ratio{{{RUN_LAYER}}}",
                "Norm of the optimizer step's change over the weight norm (gradwatch_layer_update_ratio; needs the "
                "agent's updates selection, e.g. select='preset:business,updates:1'); around 1e-3 is healthy."))
            .with_panel(series("Update ratio estimate lr·|g|/|W|",
                               (f"gradwatch:layer_update_ratio:sgd_estimate{{{RUN_LAYER}}}", "{{layer}} ({{run}})"),
                               log=True, width=24,
                               description="Learning rate times gradient norm over parameter norm (recording rule "
                                           "gradwatch:layer_update_ratio:sgd_estimate): the update ratio of plain SGD, "
                                           "an estimate with momentum or Adam; needs no updates selection."))
            .with_panel(series("Gradient norm", (f"gradwatch_layer_grad_norm{{{RUN_LAYER}}}", "{{layer}} ({{run}})"),
                               log=True))
            .with_panel(series("Parameter norm",
                               (f"gradwatch_layer_param_norm{{{RUN_LAYER}}}", "{{layer}} ({{run}})"), log=True))
            .with_panel(series("NaN and Inf values", (f"gradwatch_layer_nonfinite_values{{{RUN_LAYER}}}",
                                                      "{{layer}} {{kind}} ({{run}})"), width=24,
                               description="NaN + Inf values in the layer's tensors of each kind, latest report."))
            .with_panel(series("Update RMS (effective step size)",
                               (f"gradwatch_layer_update_rms{{{RUN_LAYER}}}", "{{layer}} ({{run}})"), log=True,
                               description="RMS of each layer's Δw in the latest step (gradwatch_layer_update_rms; "
                                           "needs select='full' or updates:on)."))
            .with_panel(series("Optimizer state norm",
                               (f"gradwatch_layer_optimizer_state_norm{{{RUN_LAYER}}}",
                                "{{layer}} {{state}} ({{run}})"), log=True,
                               description="Norm of each layer's optimizer state: Adam's exp_avg and exp_avg_sq, SGD's "
                                           "momentum_buffer (gradwatch_layer_optimizer_state_norm; needs select='full' "
                                           "or optimizer_state:on).")))


ACTIVATION_RULES = "DeadReLU|SaturatedActivation|TensorVariance"
GRADIENT_HEALTH_RULES = "VanishingGradient|AllZero|UnchangedTensor|PoorWeightInitialization"


def activations() -> db.Dashboard:
    return (base("gradwatch-activations", "gradwatch / Activation health",
                 "Dead and saturated units and other tensor-health findings of the aggregator's rules.",
                 layers=LAYERS_WITH_ACTIVATIONS)
            .with_panel(number("Dead-unit alerts", f'count by (run) (gradwatch_alert_firing{{{RUN}, rule="DeadReLU"}}) '
                                                   f"or on (run) 0 * gradwatch_run_step{{{RUN}}}", width=8))
            .with_panel(number("Saturation alerts",
                               f'count by (run) (gradwatch_alert_firing{{{RUN}, rule="SaturatedActivation"}}) '
                               f"or on (run) 0 * gradwatch_run_step{{{RUN}}}", width=8))
            .with_panel(number("Collapsed or huge activations",
                               f'count by (run) (gradwatch_alert_firing{{{RUN}, rule="TensorVariance"}}) '
                               f"or on (run) 0 * gradwatch_run_step{{{RUN}}}", width=8))
            .with_panel(series("Dead units (fraction of zeros, ReLU-like outputs)",
                               (f"gradwatch_layer_dead_fraction{{{RUN_LAYER}}}", "{{layer}} ({{run}})"),
                               unit="percentunit"))
            .with_panel(series("Saturated units (|y| >= 0.5, tanh-like outputs)",
                               (f"gradwatch_layer_saturated_fraction{{{RUN_LAYER}}}", "{{layer}} ({{run}})"),
                               unit="percentunit"))
            .with_panel(series("Activation std", (f"gradwatch_layer_activation_std{{{RUN_LAYER}}}",
                                                  "{{layer}} ({{run}})"), log=True,
                               description="Standard deviation of each layer's outputs "
                                           "(gradwatch_layer_activation_std)."))
            .with_panel(series("Activation-gradient norm",
                               (f"gradwatch_layer_activation_grad_norm{{{RUN_LAYER}}}", "{{layer}} ({{run}})"),
                               log=True,
                               description="Norm of the gradients of each layer's outputs "
                                           "(gradwatch_layer_activation_grad_norm; needs select='full' or "
                                           "activation_gradients:on)."))
            .with_panel(states("Dead and saturated units by layer (alerts)",
                               f'gradwatch_alert_firing{{{RUN_LAYER}, rule=~"{ACTIVATION_RULES}"}}',
                               "{{rule}} {{layer}} ({{run}})",
                               "DeadReLU: a ReLU-like output >= 99 % zeros; SaturatedActivation: a tanh-like output "
                               ">= 95 % at |y| >= 0.5; TensorVariance: std collapsed or huge (in 10 and 3 reports)."))
            .with_panel(states("Gradient and weight health by layer",
                               f'gradwatch_alert_firing{{{RUN_LAYER}, rule=~"{GRADIENT_HEALTH_RULES}"}}',
                               "{{rule}} {{layer}} ({{run}})",
                               "VanishingGradient, AllZero, UnchangedTensor and PoorWeightInitialization alerts.")))


def magnitude_heatmap(kind: str) -> heatmap.Panel:
    """The log2-magnitude histogram of one kind of tensor over time: a gauge histogram, one column per scrape."""
    panel = (heatmap.Panel().title(f"{kind.capitalize()}s: log2 |x|").span(12).height(10).calculate(False)
             .description(f"Share of the {kind} values of the selected layers per power-of-two magnitude bucket "
                          "(gradwatch_layer_magnitude, latest step at each scrape); NaN/Inf excluded.")
             .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Oranges")
                    .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64))
             .y_axis(heatmap.YAxisConfig().axis_placement(cm.AxisPlacement.LEFT).unit("short"))
             .cell_gap(0).show_value(cm.VisibilityMode.NEVER))
    panel.datasource(DATASOURCE)
    expr = (f'sum by (le) (gradwatch_layer_magnitude_bucket{{{RUN_LAYER}, kind="{kind}"}}) '
            f'/ scalar(sum(gradwatch_layer_magnitude_gcount{{{RUN_LAYER}, kind="{kind}"}}))')
    return panel.with_target(query(expr, "{{le}}").format(pm.PromQueryFormat.HEATMAP).datasource(DATASOURCE))


def histograms() -> db.Dashboard:
    dash = base("gradwatch-histograms", "gradwatch / Histograms",
                "log2-magnitude histograms of gradients, parameters, activations and updates over time.",
                layers=LAYERS_WITH_HISTOGRAMS)
    for kind in ("gradient", "parameter", "activation", "update"):
        dash.with_panel(magnitude_heatmap(kind))
    return dash


def column(expr: str, title: str) -> str:
    """The query with its column title in the `name` label (what the compare table names columns by)."""
    return f'label_replace({expr}, "name", "{title}", "", "")'


# (column title, query): one row per run once merged on `run`. Hyperparameters come first, each in
# a column named after its `name` label.
COMPARED = (
    ("Step", f"gradwatch_run_step{{{RUN}}}"),
    ("Loss", f"gradwatch_run_loss{{{RUN}}}"),
    ("Validation loss", f"gradwatch_run_eval_loss{{{RUN}}}"),
    ("Accuracy", f'gradwatch_run_scalar{{{RUN}, name="accuracy"}}'),
    ("Validation accuracy", f'gradwatch_run_eval_scalar{{{RUN}, name="accuracy"}}'),
    ("Gradient norm", f"gradwatch_run_grad_norm{{{RUN}}}"),
    ("Firing alerts", f"count by (run) (gradwatch_alert_firing{{{RUN}}} > 0) "
                      f"or on (run) 0 * gradwatch_run_step{{{RUN}}}"),
)


def transform(id_: str, **options) -> dm.DataTransformerConfig:
    return dm.DataTransformerConfig(id_val=id_, options=options)


def instant_table(title: str, description: str, exprs: list[str], fmt: pm.PromQueryFormat,
                  *transformations: dm.DataTransformerConfig, height: int = 8) -> table.Panel:
    panel = (table.Panel().title(title).description(description).span(24).height(height).show_header(True)
             .datasource(DATASOURCE).transformations(list(transformations)))
    for i, expr in enumerate(exprs):
        panel.with_target(prometheus.Dataquery().expr(expr).ref_id(chr(ord("A") + i)).instant().format(fmt)
                          .datasource(DATASOURCE))
    return panel


def compare_table() -> table.Panel:
    """Instant queries, one series per run each; labelsToFields names every value column after the
    series' `name` label and keeps `run` as a column, merge joins the frames on (Time, run)."""
    exprs = [f"gradwatch_run_hyperparameter{{{RUN}}}"] + [column(expr, title) for title, expr in COMPARED]
    alerts = [dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
              dm.DynamicConfigValue(id_val="thresholds", value={"mode": "absolute", "steps": [
                  {"color": "green", "value": None}, {"color": "red", "value": 1}]})]
    return (instant_table(
        "Runs", "One row per run: its numeric hyperparameters (gradwatch_run_hyperparameter), then the latest "
        "step, losses, accuracy, global gradient norm and firing alerts.", exprs, pm.PromQueryFormat.TIME_SERIES,
        transform("labelsToFields", mode="columns", valueLabel="name"), transform("merge"),
        transform("organize", excludeByName={"Time": True}, indexByName={"run": 0}, renameByName={},
                  fieldOrder="manual"))
            .override_by_name("Firing alerts", alerts))


def text_hyperparameters() -> table.Panel:
    return instant_table(
        "Text hyperparameters", "Hyperparameters with text values (gradwatch_run_hyperparameter_info): one row "
        "per run, one column per name.", [f"gradwatch_run_hyperparameter_info{{{RUN}}}"], pm.PromQueryFormat.TABLE,
        transform("groupingToMatrix", columnField="name", rowField="run", valueField="value"), height=5)


def runs_compared() -> db.Dashboard:
    return (base("gradwatch-runs-compared", "gradwatch / Runs compared",
                 "Runs side by side (a hyperparameter search): hyperparameters and latest values in a table, "
                 "curves overlaid.", all_runs=True)
            .with_panel(compare_table())
            .with_panel(text_hyperparameters())
            .with_panel(series("Loss", (f"gradwatch_run_loss{{{RUN}}}", "{{run}}")))
            .with_panel(series("Validation loss", (f"gradwatch_run_eval_loss{{{RUN}}}", "{{run}}")))
            .with_panel(series("Global gradient norm", (f"gradwatch_run_grad_norm{{{RUN}}}", "{{run}}"), log=True))
            .with_panel(series("Accuracy", (f'gradwatch_run_scalar{{{RUN}, name="accuracy"}}', "train {{run}}"),
                               (f'gradwatch_run_eval_scalar{{{RUN}, name="accuracy"}}', "validation {{run}}"),
                               unit="percentunit")))


def ingest() -> db.Dashboard:
    rate = "$__rate_interval"
    return (base("gradwatch-ingest", "gradwatch / Ingest health",
                 "Collectors, Redis streams and the aggregator: throughput, refusals, latency, lag and errors.")
            .with_panel(series("Reports per second", ("gradwatch:collector_reports:rate1m", "collectors: written"),
                               ("gradwatch:aggregator_reports:rate1m", "aggregators: applied"), unit="reqps"))
            .with_panel(series("Export calls by status",
                               (f"sum by (code) (rate(gradwatch_collector_requests_total[{rate}]))", "{{code}}"),
                               unit="reqps"))
            .with_panel(series("Refused by reason",
                               (f"sum by (reason) (rate(gradwatch_collector_refused_total[{rate}]))", "{{reason}}"),
                               unit="reqps"))
            .with_panel(series("Export latency", *[
                (f"histogram_quantile({q}, sum by (le) (rate(gradwatch_collector_request_duration_seconds_bucket"
                 f"[{rate}])))", f"p{round(q * 100)}") for q in (0.5, 0.99)], unit="s"))
            .with_panel(series("Collector in-flight bytes", ("sum by (instance) (gradwatch_collector_inflight_bytes)",
                                                            "{{instance}}"), unit="bytes"))
            .with_panel(series("Received bytes per second",
                               (f"sum by (instance) (rate(gradwatch_collector_received_bytes_total[{rate}]))",
                                "{{instance}}"), unit="Bps"))
            .with_panel(series("Aggregator delay behind the training runs",
                               (f"gradwatch:run_ingest_delay_seconds{{{RUN}}}", "{{run}}"), unit="s",
                               description="Now minus the capture time of the latest applied report, for runs "
                                           "whose step advances (recording rule gradwatch:run_ingest_delay_seconds)."))
            .with_panel(series("Errors", *[(f"sum(rate(gradwatch_{name}_total[{rate}]))", name) for name in (
                "collector_redis_errors", "aggregator_redis_errors", "aggregator_decode_errors",
                "aggregator_series_dropped", "aggregator_alertmanager_errors", "aggregator_alertmanager_dropped")],
                unit="reqps"))
            .with_panel(series("Runs and layer series", ("sum(gradwatch_aggregator_runs)", "runs"),
                               ("sum(gradwatch_aggregator_layer_series)", "layer series (budget 5000)")))
            .with_panel(series("Alerts raised", (f"sum by (rule) (increase(gradwatch_aggregator_alerts_total[{rate}]))",
                                                "{{rule}}"))))


DASHBOARDS: dict[str, Callable[[], db.Dashboard]] = {
    "gradwatch-run-overview": run_overview,
    "gradwatch-layers": layers,
    "gradwatch-activations": activations,
    "gradwatch-histograms": histograms,
    "gradwatch-runs-compared": runs_compared,
    "gradwatch-ingest": ingest,
}


def render(build: Callable[[], db.Dashboard]) -> dict:
    """The dashboard as Grafana's JSON model (a plain dict, stable key order)."""
    model = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    for annotation in model.get("annotations", {}).get("list", []):
        if annotation.get("name") == ALERT_ANNOTATION:
            annotation.update(ALERT_ANNOTATION_FIELDS)
    for number_, panel in enumerate(model.get("panels", []), 1):  # unique ids: links and the API need them
        panel["id"] = number_
    return model
