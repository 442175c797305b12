"""End to end with real processes: a training loop with the agent -> collector -> redis-server ->
aggregator -> /metrics and the alert stream (and a real Alertmanager where one is installed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import redis

from gradwatch.cli.demo import train
from gradwatch.cli.processes import http_ok, start_alertmanager, stop_process, wait_until
from gradwatch.cli.redis_server import RedisServer, free_port
from gradwatch.cli.stack import Stack, StackConfig
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT

pytestmark = pytest.mark.e2e


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def stack_config(redis_url: str, **extra) -> StackConfig:
    return StackConfig(redis_url=redis_url, collector_listen=f"127.0.0.1:{free_port()}",
                       collector_metrics_listen=f"127.0.0.1:{free_port()}",
                       aggregator_metrics_listen=f"127.0.0.1:{free_port()}", **extra)


def alerts_for(client: redis.Redis, run: str) -> list[dict]:
    alerts = [json.loads(fields[FIELD_ALERT]) for _, fields in client.xrange(ALERTS_KEY)]
    return [a for a in alerts if a["run"] == run]


def train_with_blowup(cfg: StackConfig, run: str, steps: int = 215, blowup: int = 200):
    import io

    import gradwatch
    from gradwatch.agent import AgentConfig

    # Host slots to spare: with the whole stack on 2 cores the exporter thread can fall 4 reports behind this
    # tight loop, and the agent then skips a step rather than block (tests/agent covers that); here every
    # step must arrive.
    agent = AgentConfig(collector=cfg.collector_listen, host_slots=64)
    return train(lambda m, o: gradwatch.watch(m, o, run=run, config=agent), steps, blowup, 1e6, out=io.StringIO())


def test_training_loop_to_metrics_and_alert_stream(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        cfg = stack_config(server.url)
        with Stack(cfg):
            watcher = train_with_blowup(cfg, "e2e-1")
            assert watcher.counters.exported == 215 and watcher.counters.dropped == 0
            text = wait_until(lambda: (t := scrape(cfg.aggregator_metrics_listen)) and
                              sample(t, "gradwatch_run_step", run="e2e-1") == 214 and t, 20, "step 214 on /metrics")
            assert sample(text, "gradwatch_layer_grad_norm", run="e2e-1", layer="fc1") is not None
            assert sample(text, "gradwatch_run_loss", run="e2e-1") is not None
            client = redis.Redis.from_url(server.url)
            alerts = wait_until(lambda: [a for a in alerts_for(client, "e2e-1") if a["status"] == "firing"], 20,
                                "a firing alert")
        rules = {a["rule"]: a for a in alerts}
        explosion = rules["ExplodingGradient"]
        assert explosion["layer"] in {"fc1", "fc2", "fc3", "head"}
        assert explosion["step"] in (201, 202)  # the first steps with the blown-up learning rate's gradients
        assert explosion["run"] == "e2e-1" and explosion["rank"] == 0
        assert "NonFinite" in rules and rules["NonFinite"]["step"] > explosion["step"]


def test_collector_restart_loses_no_acknowledged_report(tmp_path):
    """The agent keeps what the dead collector did not acknowledge and delivers it after the restart."""
    import torch

    import gradwatch

    with RedisServer(tmp_path / "redis") as server:
        cfg = stack_config(server.url)
        stack = Stack(cfg).start()
        try:
            model = torch.nn.Linear(4, 4)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            w = gradwatch.watch(model, opt, run="e2e-restart", collector=cfg.collector_listen)
            for i in range(40):
                if i == 10:
                    stack.procs["collector"].kill()  # SIGKILL mid-run
                if i == 25:
                    stack._spawn("collector", ["--listen", cfg.collector_listen, "--redis-url", server.url,
                                               "--metrics-listen", cfg.collector_metrics_listen])
                model(torch.randn(2, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
                w.step()
                time.sleep(0.02)
            assert w.flush(30)
            w.close()
            # The aggregator trims its stream once applied: what reached Redis is what it applied, each report
            # once (its sequence watermarks and totals, written with the acks). 41: close() ends the run explicitly.
            from gradwatch.aggregator.ingest.leases import applied_key

            client = redis.Redis.from_url(server.url)
            record = wait_until(lambda: (r := client.hgetall(applied_key("e2e-restart"))) and
                                r.get(b"reports") == b"41" and r, 20, "every report applied")
        finally:
            stack.stop()
        assert record[b"high:0"] == b"41" and b"lost" not in record  # sequences 1..41, each applied once
        assert w.counters.dropped == 0


# Skipped only outside CI: .ci/run installs Debian's prometheus-alertmanager, so CI always runs this.
@pytest.mark.skipif(not shutil.which("prometheus-alertmanager") and not os.environ.get("CI"),
                    reason="Debian's prometheus-alertmanager is not installed (.ci/run installs it)")
def test_alert_reaches_a_real_alertmanager(tmp_path):
    am, am_url = start_alertmanager(tmp_path)
    try:
        with RedisServer(tmp_path / "redis") as server:
            cfg = stack_config(server.url, alertmanager_url=am_url)
            with Stack(cfg):
                train_with_blowup(cfg, "e2e-am", steps=203)  # stop while the explosion is still firing

                def fired():
                    with urllib.request.urlopen(f"{am_url}/api/v2/alerts?filter=run%3D%22e2e-am%22", timeout=5) as r:
                        return [a for a in json.load(r) if a["labels"]["alertname"] == "ExplodingGradient"]

                alerts = wait_until(fired, 20, "ExplodingGradient in Alertmanager")
        labels = alerts[0]["labels"]
        assert labels["run"] == "e2e-am" and labels["layer"] in {"fc1", "fc2", "fc3", "head"}
        assert labels["severity"] in {"warning", "critical"}
        assert "Gradient norm" in alerts[0]["annotations"]["summary"]
    finally:
        stop_process(am)


def test_demo_command_runs_from_the_cli(tmp_path):
    env = dict(os.environ, GRADWATCH_DATA_DIR=str(tmp_path / "data"))
    env.pop("GRADWATCH_REDIS_URL", None)
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "demo", "--steps", "215", "--blowup-step", "200"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALERT" in proc.stdout and "ExplodingGradient" in proc.stdout
    assert "OK: the blow-up was caught" in proc.stdout


def test_up_refuses_a_taken_port_with_a_clear_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gradwatch", "up", "--collector-listen", f"127.0.0.1:{port}",
                               "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}" in proc.stderr and "address in use" in proc.stderr


def test_up_serves_then_stops_cleanly_on_sigterm(tmp_path):
    """`gradwatch up` with its embedded Redis: agents can export, metrics answer, SIGTERM stops all."""
    import signal

    import torch

    import gradwatch

    collector, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    env.pop("GRADWATCH_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", "up", "--data-dir", str(tmp_path / "data"),
                             "--collector-listen", collector, "--metrics-listen", metrics,
                             "--collector-metrics-listen", f"127.0.0.1:{free_port()}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: http_ok(f"http://{metrics}/metrics") and _tcp_ok(collector), 60, "gradwatch up")
        model = torch.nn.Linear(3, 3)
        with gradwatch.watch(model, run="e2e-up", collector=collector) as w:
            for _ in range(3):
                model(torch.randn(2, 3)).sum().backward()
                w.step(loss=0.5)
                model.zero_grad()
            assert w.flush(10)
        wait_until(lambda: sample(scrape(metrics), "gradwatch_run_step", run="e2e-up") == 2, 20, "step 2 on /metrics")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "gradwatch is up" in out and "stopping" in out
    assert not _tcp_ok(collector) and not http_ok(f"http://{metrics}/metrics")
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists()


def _tcp_ok(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def test_nonfinite_alert_names_the_layer_where_the_nan_started(tmp_path):
    """With activations watched, a NaN born in the middle of the network is traced to that layer, not to
    the last layer (whose gradient is the first NaN in backward order)."""
    import torch
    from torch import nn

    import gradwatch
    from gradwatch.agent import AgentConfig

    class Log(nn.Module):
        def __init__(self):
            super().__init__()
            self.broken = False

        def forward(self, x):
            return torch.log(x) if self.broken else x  # log of negative activations: NaN

    model = nn.Sequential()
    model.add_module("embed", nn.Linear(8, 16))
    model.add_module("norm", Log())
    model.add_module("head", nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with RedisServer(tmp_path / "redis") as server:
        cfg = stack_config(server.url)
        with Stack(cfg):
            with gradwatch.watch(model, opt, run="e2e-origin", config=AgentConfig(
                    collector=cfg.collector_listen, select="preset:business")) as w:
                for step in range(12):
                    model.norm.broken = step >= 8
                    loss = model(torch.randn(4, 8)).pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    w.step(loss=loss)
            client = redis.Redis.from_url(server.url)
            alerts = wait_until(lambda: [a for a in alerts_for(client, "e2e-origin") if a["rule"] == "NonFinite"],
                                20, "a NonFinite alert")
    assert (alerts[0]["layer"], alerts[0]["tensor"], alerts[0]["step"]) == ("norm", "norm:output", 8)
    assert "started in layer norm in the forward pass" in alerts[0]["summary"]
