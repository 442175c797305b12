"""End to end with the deploy files: a real training loop -> collector -> Redis -> aggregator, scraped by
a real Prometheus running deploy/prometheus (its rules included), alerts into a real Alertmanager running
deploy/alertmanager/alertmanager.yml. Every query of every generated dashboard must return data through
Prometheus' HTTP API, and the injected explosion's alert must reach Alertmanager by both paths."""

from __future__ import annotations

import io
import subprocess
import time
import urllib.parse
from collections import OrderedDict

import pytest
import yaml

from gradwatch.cli import grafana
from gradwatch.cli.processes import stop_process
from gradwatch.cli.redis_server import RedisServer, free_port
from gradwatch.cli.stack import Stack, StackConfig

pytestmark = pytest.mark.e2e

RUN = "e2e-prom"          # the demo's MLP with a learning-rate blow-up at step 200
SICK_RUN = "e2e-sick"     # dead ReLUs, saturated tanh, a badly initialised layer, updates and evaluations
# Registered with both runs: numbers, a flag and a text value for the "Runs compared" tables.
HYPERPARAMETERS = {"lr": 1e-3, "batch_size": 32, "nesterov": False, "optimizer": "sgd"}


def prometheus_config(kit, tmp_path, targets: dict[str, str], alertmanager: str) -> str:
    """deploy/prometheus/prometheus.yml with local addresses and 1 s intervals, and without the read tokens: the
    stack here listens on loopback, where /metrics needs none (test_compose_policy checks the tokens)."""
    config = yaml.safe_load((kit.DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(kit.DEPLOY / "prometheus" / pattern) for pattern in config["rule_files"]]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager]
    for job in config["scrape_configs"]:
        job["static_configs"][0]["targets"] = [targets[job["job_name"]]]
        job.pop("authorization", None)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def start(args: list[str], ready_url: str, kit) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        kit.wait_until(lambda: kit.http_ok(ready_url) or proc.poll() is not None, 30, f"{args[0]} ready")
    except AssertionError:
        stop_process(proc)
        raise
    if proc.poll() is not None:
        raise AssertionError(f"{args[0]} exited: {proc.stderr.read()[-3000:]}")
    return proc


def train_sick(collector: str) -> None:
    """A few slow steps (longer than two scrapes, so Prometheus sees the step advance) of a model with a
    dead ReLU layer (bias -1000) and a saturated tanh (weights x100), with everything (`full`: activations and
    their gradients, updates, SGD's momentum) and evaluation losses sent, so the aggregator's DeadReLU,
    SaturatedActivation and PoorWeightInitialization rules fire and every activation, update, optimizer-state
    and validation panel has data;
    accuracies of both phases for the compared runs' accuracy columns."""
    import torch
    from torch import nn

    import gradwatch

    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act1=nn.Tanh(), fc2=nn.Linear(32, 32),
                                      act2=nn.ReLU(), head=nn.Linear(32, 4)))
    with torch.no_grad():
        model.fc1.weight.mul_(100)
        model.fc2.bias.fill_(-1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # a state: the optimizer panel
    with gradwatch.watch(model, optimizer, run=SICK_RUN, collector=collector, select="preset:full",
                         hyperparameters=HYPERPARAMETERS) as watcher:
        for step in range(14):
            loss = model(torch.randn(32, 16)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss, accuracy=0.25 + step / 100)
            if step % 4 == 3:
                with torch.no_grad():
                    watcher.step(phase="eval", loss=model(torch.randn(32, 16)).pow(2).mean(), accuracy=0.25)
            time.sleep(0.25)


def am_alerts(kit, url: str, **labels) -> list[dict]:
    query = urllib.parse.urlencode([("filter", f'{k}="{v}"') for k, v in labels.items()])
    return kit.http_json(f"{url}/api/v2/alerts?{query}")


def test_dashboards_and_alerts_through_prometheus_and_alertmanager(kit, tmp_path):
    prometheus_bin = kit.tool("prometheus", "Debian's prometheus package")
    alertmanager_bin = kit.tool("prometheus-alertmanager", "Debian's prometheus-alertmanager package")
    started = time.monotonic()
    am_port, prom_port = free_port(), free_port()
    am_url, prom_url = f"http://127.0.0.1:{am_port}", f"http://127.0.0.1:{prom_port}"
    procs = []
    try:
        procs.append(start([alertmanager_bin, f"--config.file={kit.ALERTMANAGER_CONFIG}",
                            f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
                            "--cluster.listen-address="], f"{am_url}/-/ready", kit))
        with RedisServer(tmp_path / "redis") as redis_server:
            cfg = StackConfig(redis_url=redis_server.url, collector_listen=f"127.0.0.1:{free_port()}",
                              collector_metrics_listen=f"127.0.0.1:{free_port()}",
                              aggregator_metrics_listen=f"127.0.0.1:{free_port()}", alertmanager_url=am_url)
            with Stack(cfg):
                config = prometheus_config(kit, tmp_path, {
                    "gradwatch-aggregator": cfg.aggregator_metrics_listen,
                    "gradwatch-collector": cfg.collector_metrics_listen,
                    "prometheus": f"127.0.0.1:{prom_port}"}, f"127.0.0.1:{am_port}")
                procs.append(start([prometheus_bin, f"--config.file={config}",
                                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{prom_port}"], f"{prom_url}/-/ready", kit))
                up = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": 'up{job=~"gradwatch-.*"} == 1'})
                kit.wait_until(lambda: len(kit.http_json(up)["data"]["result"]) == 2, 30,
                               "Prometheus to scrape the aggregator and the collector")
                import gradwatch
                from gradwatch.cli.demo import train

                train(lambda m, o: gradwatch.watch(m, o, run=RUN, collector=cfg.collector_listen,
                                                   hyperparameters={**HYPERPARAMETERS, "lr": 0.05}),
                      215, 200, 1e6, out=io.StringIO())
                train_sick(cfg.collector_listen)

                check_dashboard_queries(kit, prom_url)
                check_alert_paths(kit, am_url)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
    assert time.monotonic() - started < 90


def check_dashboard_queries(kit, prom_url: str) -> None:
    """Every panel target and annotation of every dashboard returns at least one sample."""
    values = {"datasource": "prometheus", "run": f"{RUN}|{SICK_RUN}", "layer": ".*"}
    queries = [(f"{name} / {where}", grafana.substitute(expr, values))
               for name, model in grafana.dashboards().items() for where, expr in grafana.expressions(model)]
    assert len(queries) > 30

    def empty() -> list[str]:
        missing = []
        for where, expr in queries:
            answer = kit.http_json(f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            assert answer["status"] == "success", (where, answer)
            if not answer["data"]["result"]:
                missing.append(f"{where}: {expr}")
        return missing

    last: list[str] = []

    def all_answered() -> bool:
        nonlocal last
        last = empty()
        return not last

    try:
        kit.wait_until(all_answered, 30, "every dashboard query to return data")
    except AssertionError:
        raise AssertionError("queries without data:\n  " + "\n  ".join(last)) from None


def check_alert_paths(kit, am_url: str) -> None:
    """The explosion reached Alertmanager from the aggregator (no source label) and from Prometheus' rule
    (source="prometheus"); once NonFinite fires for the run, it inhibits both."""
    def both() -> list[dict] | None:
        alerts = am_alerts(kit, am_url, alertname="ExplodingGradient", run=RUN)
        sources = {a["labels"].get("source", "aggregator") for a in alerts}
        return alerts if sources == {"aggregator", "prometheus"} else None

    alerts = kit.wait_until(both, 30, "ExplodingGradient in Alertmanager from the aggregator and from Prometheus")
    pushed = next(a for a in alerts if "source" not in a["labels"])
    ruled = next(a for a in alerts if a["labels"].get("source") == "prometheus")
    assert pushed["labels"]["layer"] == ruled["labels"]["layer"]
    assert pushed["labels"]["rank"] == "0" and "Gradient norm" in pushed["annotations"]["summary"]
    assert ruled["labels"]["severity"] == "critical"

    kit.wait_until(lambda: {a["labels"].get("source", "aggregator") for a in
                            am_alerts(kit, am_url, alertname="NonFinite", run=RUN)} == {"aggregator", "prometheus"},
                   30, "NonFinite in Alertmanager by both paths")
    inhibited = kit.wait_until(
        lambda: (found := am_alerts(kit, am_url, alertname="ExplodingGradient", run=RUN))
        and all(a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"] for a in found) and found,
        30, "NonFinite to inhibit ExplodingGradient")
    assert len(inhibited) == 2
