"""Alert latency, bad step -> alert: the whole stack on this machine (redis-server, aggregator and
collector processes), a small model trained in this process, a learning-rate blow-up per trial.

Latency is measured from the moment the training loop finished the bad step (watcher.step returned)
to the moment the alert entry was written to Redis (its stream id is Redis' clock, the same machine's),
so it covers the agent's export interval, the collector, the aggregator's read loop and the rules.

Run: python benchmarks/alert_latency.py [--trials 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import torch
from torch import nn

import gradwatch
from gradwatch.collector.streams import ALERTS_KEY, FIELD_ALERT
from gradwatch.redis_server import RedisServer, free_port
from gradwatch.stack import Stack, StackConfig


def trial(cfg: StackConfig, client: redis.Redis, run: str, blowup_step: int = 60) -> float:
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
                written_ms = int(entry_id.split(b"-")[0])
                return written_ms / 1000 - done_at[alert["step"]]
        time.sleep(0.05)
    raise RuntimeError(f"no alert for {run}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        cfg = StackConfig(redis_url=server.url, collector_listen=f"127.0.0.1:{free_port()}",
                          collector_metrics_listen=f"127.0.0.1:{free_port()}",
                          aggregator_metrics_listen=f"127.0.0.1:{free_port()}")
        client = redis.Redis.from_url(server.url)
        with Stack(cfg):
            trial(cfg, client, "latency-warmup")
            latencies = [trial(cfg, client, f"latency-{i}") for i in range(a.trials)]
    ms = sorted(x * 1e3 for x in latencies)
    print(f"alert latency over {len(ms)} trials: median {statistics.median(ms):.0f} ms, "
          f"max {ms[-1]:.0f} ms, min {ms[0]:.0f} ms (target: p99 <= 1000 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
