"""Alert latency, bad step -> NonFinite alert: the whole stack on this machine (redis-server, aggregator and
collector processes, and Debian's prometheus-alertmanager when installed), a small model trained in this
process at about 100 steps/s, and per trial one bad step whose forward makes a NaN in a middle module.

Latency is measured from the moment the training loop finished the bad step (watcher.step returned) to the
moment the NonFinite alert entry was written to Redis (its stream id is Redis' clock, the same machine's),
which covers the agent's export, the collector, the aggregator's read loop and the rules, and to the moment
Alertmanager's v2 API lists the alert (polled every 5 ms by a thread of this process), which adds the
aggregator's push.

Two variants of the agent, trial by trial in one run (their order alternates): `flush` exports a step with a
NaN/Inf origin at once (AgentConfig.flush_nonfinite, GRADWATCH_AGENT_FLUSH_NONFINITE); `interval` leaves it
to the export interval (0.5 s) like any report. An agent without that setting runs as one variant, `agent`.

Run: python benchmarks/alert_latency.py [--trials 20] [--no-alertmanager] [--json FILE]
Target (docs/architecture.md#performance-targets): bad step to Alertmanager, worst of 20 <= 0.3 s, median <= 0.1 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path

import redis
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.cli.processes import start_alertmanager, stop_process
from gradwatch.cli.redis_server import RedisServer, free_port
from gradwatch.cli.stack import Stack, StackConfig
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT

RULE = "NonFinite"
BAD_STEP = 60  # the first step at or after this one once the aggregator follows the run
AFTER_S = 1.0  # training goes on this long after the bad step: close() must not be what flushes it


class AlertmanagerWatch(threading.Thread):
    """Polls Alertmanager for the run's NonFinite alert; `seen` is when it was first listed (time.time())."""

    def __init__(self, url: str, run: str):
        super().__init__(daemon=True)
        query = urllib.parse.urlencode([("filter", f'run="{run}"'), ("filter", f'alertname="{RULE}"')])
        self.url = f"{url}/api/v2/alerts?{query}"
        self.seen: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.seen is None:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if json.load(r):
                        self.seen = time.time()
            except OSError:
                pass
            time.sleep(0.005)


class Poison(nn.Module):
    """Identity until armed; armed, its output is NaN: a NaN born in the forward of a middle module."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        return x * math.nan if self.armed else x


def variants() -> dict[str, dict]:
    """Agent settings per variant."""
    if "flush_nonfinite" not in {f.name for f in dataclasses.fields(AgentConfig)}:
        print("this agent has no flush_nonfinite setting: measuring the one behaviour it has", file=sys.stderr)
        return {"agent": {}}
    return {"flush": {"flush_nonfinite": True}, "interval": {"flush_nonfinite": False}}


def followed(cfg: StackConfig, run: str) -> bool:
    """Whether the aggregator applied a report of the run: a new run is found at its next discovery (1 s), a
    delay that belongs to the start of a run, not to the alert."""
    try:
        with urllib.request.urlopen(f"http://{cfg.aggregator_metrics_listen}/api/v1/runs/{run}", timeout=2):
            return True
    except OSError:
        return False


def trial(cfg: StackConfig, client: redis.Redis, run: str, agent: dict) -> tuple[float, float | None, dict]:
    """(seconds to the Redis alert stream, seconds to Alertmanager or None without one, the alert)."""
    watch = AlertmanagerWatch(cfg.alertmanager_url, run) if cfg.alertmanager_url else None
    if watch:
        watch.start()
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(32, 128), act=nn.ReLU(), mid=Poison(), head=nn.Linear(128, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    done_at: dict[int, float] = {}
    config = AgentConfig(collector=cfg.collector_listen, **agent)
    bad_step = None
    with gradwatch.watch(model, opt, run=run, config=config) as w:
        step = 0
        while bad_step is None or time.time() - done_at[bad_step] < AFTER_S:
            if bad_step is None and step >= BAD_STEP and followed(cfg, run):
                bad_step = step
            model.mid.armed = step == bad_step
            x = torch.randn(64, 32)
            loss = nn.functional.cross_entropy(model(x), x[:, :10].argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss=loss)
            done_at[step] = time.time()
            step += 1
            time.sleep(0.01)  # ~100 steps/s: a realistic step time, not a tight loop
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry_id, fields in client.xrange(ALERTS_KEY):
            alert = json.loads(fields[FIELD_ALERT])
            if alert["run"] == run and alert["rule"] == RULE and alert["status"] == "firing":
                bad_step_done = done_at[bad_step]
                alert["bad_step"] = bad_step
                to_redis = int(entry_id.split(b"-")[0]) / 1000 - bad_step_done
                if watch is None:
                    return to_redis, None, alert
                watch.join(max(0.0, deadline - time.monotonic()))
                watch.stop.set()
                if watch.seen is None:
                    raise RuntimeError(f"the {RULE} alert of {run} never reached Alertmanager")
                return to_redis, watch.seen - bad_step_done, alert
        time.sleep(0.05)
    raise RuntimeError(f"no {RULE} alert for {run}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials per variant")
    ap.add_argument("--no-alertmanager", action="store_true", help="measure to the Redis alert stream only")
    ap.add_argument("--json", type=Path, help="write the latencies there")
    a = ap.parse_args()
    use_am = not a.no_alertmanager and shutil.which("prometheus-alertmanager") is not None
    if not a.no_alertmanager and not use_am:
        print("prometheus-alertmanager not installed: measuring to the Redis alert stream only", file=sys.stderr)
    agents = variants()
    results: dict[str, list[tuple[float, float | None, dict]]] = {name: [] for name in agents}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        am, am_url = start_alertmanager(Path(tmp)) if use_am else (None, None)
        try:
            cfg = StackConfig(redis_url=server.url, collector_listen=f"127.0.0.1:{free_port()}",
                              collector_metrics_listen=f"127.0.0.1:{free_port()}",
                              aggregator_metrics_listen=f"127.0.0.1:{free_port()}", alertmanager_url=am_url)
            client = redis.Redis.from_url(server.url)
            with Stack(cfg):
                trial(cfg, client, "latency-warmup", next(iter(agents.values())))
                for i in range(a.trials):
                    names = list(agents) if i % 2 == 0 else list(agents)[::-1]
                    for name in names:
                        results[name].append(trial(cfg, client, f"latency-{name}-{i}", agents[name]))
        finally:
            if am is not None:
                stop_process(am)
    for name, rows in results.items():
        alert = rows[0][2]
        late = sum(r[2]["step"] != r[2]["bad_step"] for r in rows)
        print(f"{name}: {RULE} names layer {alert['layer']} ({alert['tensor']}), rank {alert['rank']}; "
              f"{len(rows) - late} of {len(rows)} alerts name the bad step itself")
        for where, xs in (("Redis alert stream", [r[0] for r in rows]),
                          ("Alertmanager", [r[1] for r in rows if r[1] is not None])):
            if xs:
                ms = [x * 1e3 for x in xs]
                print(f"  bad step -> {where}, {len(ms)} trials: p50 {statistics.median(ms):.0f} ms, "
                      f"worst {max(ms):.0f} ms, min {min(ms):.0f} ms (target: worst of 20 <= 300 ms, median <= 100 ms)")
    if a.json:
        keys = ("layer", "tensor", "rank", "step", "bad_step")
        a.json.write_text(json.dumps({name: {"to_redis_s": [r[0] for r in rows],
                                             "to_alertmanager_s": [r[1] for r in rows],
                                             "alerts": [{k: r[2][k] for k in keys} for r in rows]}
                                      for name, rows in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
