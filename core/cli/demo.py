"""`gradwatch demo`: the stack plus a small real model trained on the CPU, with a learning-rate blow-up
injected at a known step; prints progress and every alert as it fires, then a summary."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from gradwatch.cli.stack import Stack, StackConfig, port_taken, split_hostport
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT

DEFAULT_STEPS = 300
DEFAULT_BLOWUP_STEP = 200
DEFAULT_BLOWUP_FACTOR = 1e6
ALERT_WAIT_S = 20.0  # generous: a loaded 2-core CI machine must not make the demo flaky
# NonFinite's summary names the pass where the NaN/Inf started (aggregator/rules/nonfinite.py).
_PASS = re.compile(r" in the (forward|backward) pass: ")


@dataclass
class DemoResult:
    run: str
    steps: int
    alerts: list[dict] = field(default_factory=list)
    counters: object = None
    metrics_sample: list[str] = field(default_factory=list)


def free_defaults(cfg: StackConfig) -> None:
    """The demo must run beside a `gradwatch up`: move any taken default port to a free one."""
    from gradwatch.cli.redis_server import free_port

    for name in ("collector_listen", "collector_metrics_listen", "aggregator_metrics_listen"):
        host, port = split_hostport(getattr(cfg, name))
        if port_taken(host, port):
            setattr(cfg, name, f"{host}:{free_port(host)}")


class AlertPrinter(threading.Thread):
    """Tails the alert stream and prints each alert as it fires."""

    def __init__(self, redis_url: str, run: str, out=sys.stdout):
        super().__init__(name="gradwatch-demo-alerts", daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.run_id = run
        self.out = out
        self.alerts: list[dict] = []
        self.stopping = threading.Event()
        last = self.client.xrevrange(ALERTS_KEY, count=1)
        self.last_id = last[0][0] if last else b"0-0"

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                entries = self.client.xread({ALERTS_KEY: self.last_id}, block=200, count=100)
            except redis.RedisError:
                time.sleep(0.2)
                continue
            for _, items in entries:
                for entry_id, fields in items:
                    self.last_id = entry_id
                    alert = json.loads(fields[FIELD_ALERT])
                    if alert.get("run") != self.run_id:
                        continue
                    self.alerts.append(alert)
                    print(alert_line(alert), file=self.out, flush=True)

    def wait_for(self, rules: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not rules <= {a.get("rule") for a in self.alerts}:
            time.sleep(0.1)


def where(alert: dict) -> str:
    """Where an alert points: the layer, for NonFinite the pass (forward or backward) and the tensor, the
    rank and the step."""
    found = _PASS.search(alert.get("summary") or "") if alert.get("rule") == "NonFinite" else None
    detail = f" in the {found.group(1)} pass ({alert.get('tensor')})" if found else ""
    return f"layer {alert.get('layer')}{detail}, rank {alert.get('rank')}, step {alert.get('step')}"


def alert_line(alert: dict) -> str:
    mark = "ALERT" if alert.get("status") == "firing" else "resolved"
    return f"  >>> {mark} [{alert.get('severity')}] {alert.get('rule')} at {where(alert)}: {alert.get('summary')}"


def train(watcher_factory, steps: int, blowup_step: int, factor: float, out=sys.stdout) -> object:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        fc1=nn.Linear(32, 128), act1=nn.Tanh(), fc2=nn.Linear(128, 128), act2=nn.ReLU(),
        fc3=nn.Linear(128, 64), act3=nn.ReLU(), head=nn.Linear(64, 10),
    ))
    teacher = nn.Linear(32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = watcher_factory(model, optimizer)
    loss_fn = nn.CrossEntropyLoss()
    try:
        for step in range(steps):
            if step == blowup_step:
                for group in optimizer.param_groups:
                    group["lr"] *= factor
                print(f"  step {step:4d}: injecting a learning-rate blow-up (lr x{factor:g})", file=out, flush=True)
            x = torch.randn(64, 32)
            y = teacher(x).argmax(1)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)  # a tensor: the agent copies it on the device, no sync
            if step % 25 == 0 or step == steps - 1:
                value = loss.item()  # the demo's own progress line; the agent never does this
                shown = f"{value:.4f}" if math.isfinite(value) else str(value)
                print(f"  step {step:4d}/{steps}  loss {shown}", file=out, flush=True)
    finally:
        watcher.close()
    return watcher


def run_demo(cfg: StackConfig, steps: int = DEFAULT_STEPS, blowup_step: int = DEFAULT_BLOWUP_STEP,
             factor: float = DEFAULT_BLOWUP_FACTOR, out=sys.stdout,
             before_stop: Callable[[DemoResult], None] | None = None) -> DemoResult:
    """Runs the demo; `before_stop(result)` is called while the stack still runs (`--keep`)."""
    import gradwatch

    free_defaults(cfg)
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print("gradwatch demo: starting the stack (redis, aggregator, collector)...", file=out, flush=True)
    with Stack(cfg) as stack:
        print(f"  redis      {stack.redis_url}{' (embedded)' if stack.redis else ''}\n"
              f"  collector  {cfg.collector_listen} (gRPC)\n"
              f"  metrics    http://{cfg.aggregator_metrics_listen}/metrics\n"
              f"  live view  http://{cfg.aggregator_metrics_listen}/", file=out, flush=True)
        printer = AlertPrinter(stack.redis_url, run, out)
        printer.start()
        print(f"training a small MLP on synthetic data for {steps} steps as run {run!r}", file=out, flush=True)
        watcher = train(lambda m, o: gradwatch.watch(m, o, run=run, collector=cfg.collector_listen,
                                                     hyperparameters={"lr": 0.05, "momentum": 0.9}),
                        steps, blowup_step, factor, out)
        printer.wait_for({"ExplodingGradient", "NonFinite"}, ALERT_WAIT_S)
        printer.stopping.set()
        result = DemoResult(run, steps, printer.alerts, watcher.counters)
        request = urllib.request.Request(f"http://{cfg.aggregator_metrics_listen}/metrics")
        if token := os.environ.get("GRADWATCH_AGGREGATOR_READ_TOKEN"):  # the aggregator's reads may need it
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=5) as resp:
            text = resp.read().decode()
        result.metrics_sample = [line for line in text.splitlines()
                                 if line.startswith(("gradwatch_layer_grad_norm", "gradwatch_run_loss",
                                                     "gradwatch_run_step")) and run in line]
        if before_stop is not None:
            before_stop(result)
    return result


def print_summary(result: DemoResult, out=sys.stdout) -> bool:
    c = result.counters
    firing = [a for a in result.alerts if a.get("status") == "firing"]
    print("\nsummary", file=out)
    print(f"  run {result.run}: {result.steps} steps, {c.exported} reports exported, {c.dropped} dropped, "
          f"{c.skipped_busy} skipped, {c.internal_errors} agent errors", file=out)
    for a in firing:
        print(f"  alert {a.get('rule')} ({a.get('severity')}): {where(a)}", file=out)
    if result.metrics_sample:
        print("  a few of the series Prometheus would scrape:", file=out)
        for line in result.metrics_sample[:6]:
            print(f"    {line}", file=out)
    ok = any(a.get("rule") == "ExplodingGradient" for a in firing)
    print("  OK: the blow-up was caught" if ok else "  FAILED: no ExplodingGradient alert arrived", file=out)
    return ok
