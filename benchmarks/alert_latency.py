"""Alert latency, bad step -> alert: the whole stack on this machine (redis-server, aggregator and
collector processes, and Debian's prometheus-alertmanager when installed), a small model trained in
this process, a learning-rate blow-up per trial.

Latency is measured from the moment the training loop finished the bad step (watcher.step returned)
to the moment the alert entry was written to Redis (its stream id is Redis' clock, the same machine's),
which covers the agent's export interval, the collector, the aggregator's read loop and the rules,
and to the moment Alertmanager's v2 API lists the alert (polled every 5 ms by a thread of this
process), which adds the aggregator's push.

Run: python benchmarks/alert_latency.py [--trials 20] [--no-alertmanager]
Target (docs/architecture.md#performance-targets): bad step to Alertmanager, worst of 20 <= 0.3 s, median <= 0.1 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import redis
import torch
from torch import nn

import gradwatch
from gradwatch.cli.processes import start_alertmanager, stop_process
from gradwatch.cli.redis_server import RedisServer, free_port
from gradwatch.cli.stack import Stack, StackConfig
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT


class AlertmanagerWatch(threading.Thread):
    """Polls Alertmanager for the run's first alert; `seen` is when it was first listed (time.time())."""

    def __init__(self, url: str, run: str):
        super().__init__(daemon=True)
        self.url = f"{url}/api/v2/alerts?filter=run%3D%22{run}%22"
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


def trial(cfg: StackConfig, client: redis.Redis, run: str, blowup_step: int = 60) -> tuple[float, float | None]:
    """(seconds to the Redis alert stream, seconds to Alertmanager or None without one)."""
    watch = AlertmanagerWatch(cfg.alertmanager_url, run) if cfg.alertmanager_url else None
    if watch:
        watch.start()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    done_at: dict[int, float] = {}
    with gradwatch.watch(model, opt, run=run, collector=cfg.collector_listen) as w:
        for step in range(blowup_step + 5):
            if step == blowup_step:
                for g in opt.param_groups:
                    g["lr"] *= 1e6
            x = torch.randn(64, 32)
            loss = nn.functional.cross_entropy(model(x), x[:, :10].argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss=loss)
            done_at[step] = time.time()
            time.sleep(0.01)  # ~100 steps/s: a realistic step time, not a tight loop
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry_id, fields in client.xrange(ALERTS_KEY):
            alert = json.loads(fields[FIELD_ALERT])
            if alert["run"] == run and alert["status"] == "firing":
                bad_step_done = done_at[alert["step"]]
                to_redis = int(entry_id.split(b"-")[0]) / 1000 - bad_step_done
                if watch is None:
                    return to_redis, None
                watch.join(max(0.0, deadline - time.monotonic()))
                watch.stop.set()
                if watch.seen is None:
                    raise RuntimeError(f"alert of {run} never reached Alertmanager")
                return to_redis, watch.seen - bad_step_done
        time.sleep(0.05)
    raise RuntimeError(f"no alert for {run}")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile: with fewer than 100 samples p99 is the maximum."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--no-alertmanager", action="store_true", help="measure to the Redis alert stream only")
    ap.add_argument("--json", type=Path, help="write the latencies there")
    a = ap.parse_args()
    use_am = not a.no_alertmanager and shutil.which("prometheus-alertmanager") is not None
    if not a.no_alertmanager and not use_am:
        print("prometheus-alertmanager not installed: measuring to the Redis alert stream only", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        am, am_url = start_alertmanager(Path(tmp)) if use_am else (None, None)
        try:
            cfg = StackConfig(redis_url=server.url, collector_listen=f"127.0.0.1:{free_port()}",
                              collector_metrics_listen=f"127.0.0.1:{free_port()}",
                              aggregator_metrics_listen=f"127.0.0.1:{free_port()}", alertmanager_url=am_url)
            client = redis.Redis.from_url(server.url)
            with Stack(cfg):
                trial(cfg, client, "latency-warmup")
                results = [trial(cfg, client, f"latency-{i}") for i in range(a.trials)]
        finally:
            if am is not None:
                stop_process(am)
    for name, xs in (("Redis alert stream", [r[0] for r in results]),
                     ("Alertmanager", [r[1] for r in results if r[1] is not None])):
        if xs:
            ms = [x * 1e3 for x in xs]
            print(f"bad step -> {name}, {len(ms)} trials: p50 {statistics.median(ms):.0f} ms, "
                  f"p99 {percentile(ms, 99):.0f} ms, worst {max(ms):.0f} ms, min {min(ms):.0f} ms "
                  f"(target: worst of 20 <= 300 ms, median <= 100 ms)")
    if a.json:
        a.json.write_text(json.dumps({"to_redis_s": [r[0] for r in results],
                                      "to_alertmanager_s": [r[1] for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
