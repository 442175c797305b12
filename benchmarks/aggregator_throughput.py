"""Aggregator throughput: summaries per second one aggregator process applies from Redis, side by side
with the rules off, with every rule on, and with every rule on for runs of several ranks (the
cross-rank join and RankDivergence on top).

Each variant gets the same pre-filled streams on a fresh redis-server (this machine), then one
Aggregator drains them in this process (XREADGROUP, decode, state, rules, fenced XACK); wall time and
this process's CPU time are measured until the last entry is committed. Reports look like the agent's:
per layer a parameter, its gradient and its activation, each with a sparse log2 histogram.

Each variant runs --repeat times (default 3) and the fastest run counts: on a shared VM the slower
runs measure the neighbours, not the aggregator.

Run: python benchmarks/aggregator_throughput.py [--reports 2000] [--layers 34] [--repeat 3] [--json out.json]
Target (docs/architecture.md#performance-targets): >= 500k summaries/s per aggregator process with the rules on.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.service import Aggregator
from gradwatch.cli.redis_server import RedisServer
from gradwatch.streams import FIELD_REGISTRATION, FIELD_REPORT, RUNS_KEY, registrations_key, reports_key
from gradwatch.v1 import report_pb2, run_pb2

KINDS = (run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_ACTIVATION)


def registration(run: str, rank: int, world: int, layers: int) -> bytes:
    reg = run_pb2.RunRegistration(run_id=run, rank=rank, world_size=world)
    reg.start_time.FromNanoseconds(time.time_ns())
    for layer in range(layers):
        for k, kind in enumerate(KINDS):
            activation = kind == run_pb2.TENSOR_KIND_ACTIVATION
            part = run_pb2.PARTITION_PER_RANK if activation else run_pb2.PARTITION_REPLICATED
            reg.tensors.add(id=3 * layer + k, name=f"layer{layer}.{('weight', 'weight.grad', 'out')[k]}", kind=kind,
                            shape=[256, 256], dtype="float32", module_path=f"layer{layer}", order=layer, partition=part)
    return reg.SerializeToString()


def report(run: str, rank: int, step: int, layers: int, rng: random.Random) -> bytes:
    r = report_pb2.StepReport(run_id=run, rank=rank, step=step, sequence=step + 1, phase=report_pb2.PHASE_TRAIN,
                              loss=2.0 / (1 + 0.01 * step) + 0.01 * rng.random(), learning_rates=[1e-3])
    r.capture_time.FromNanoseconds(time.time_ns())
    for layer in range(layers):
        for k, kind in enumerate(KINDS):
            scale = (0.05, 1e-3, 0.5)[k]
            n = 65536
            ss = n * scale * scale * (1 + 0.01 * rng.random())
            # gradients are all-reduced: identical on every rank; parameters too
            s = r.tensors.add(tensor_id=3 * layer + k, count=n, zero_count=n // 3 if kind == KINDS[2] else 0,
                              sum=1e-3 * step, sum_squares=ss if kind == KINDS[2] else n * scale * scale,
                              min=-4 * scale, max=4 * scale)
            s.histogram_offset = 20
            s.histogram.extend([1, 4, 30, 200, 1500, 9000, 30000, 20000, 4000, 800])
    return r.SerializeToString()


def prefill(client: redis.Redis, runs: int, world: int, reports: int, layers: int) -> int:
    """`reports` reports in all, spread over `runs` runs of `world` ranks; returns the summaries written."""
    rng = random.Random(0)
    per_rank = max(1, reports // (runs * world))
    pipe = client.pipeline(transaction=False)
    for i in range(runs):
        run = f"bench-{world}-{i}"
        for rank in range(world):
            raw = registration(run, rank, world, layers)
            pipe.hset(registrations_key(run), str(rank), raw)
            pipe.xadd(reports_key(run), {FIELD_REGISTRATION: raw})
        for step in range(per_rank):
            for rank in range(world):
                pipe.xadd(reports_key(run), {FIELD_REPORT: report(run, rank, step, layers, rng)})
        pipe.zadd(RUNS_KEY, {run: time.time()})
        pipe.execute()
    return runs * world * per_rank * layers * len(KINDS)


def variant(url: str, client: redis.Redis, name: str, world: int, rules: bool, reports: int, layers: int) -> dict:
    client.flushall()
    summaries = prefill(client, runs=8 // world if world > 1 else 8, world=world, reports=reports, layers=layers)
    config = AggregatorConfig(redis_url=url, consumer=f"bench-{name}", block_ms=10, discover_interval_s=0.5,
                              claim_interval_s=60.0, lease_ttl_ms=60_000)
    agg = Aggregator(config, CollectorRegistry())
    if not rules:
        agg.rules = RuleEngine(config, agg.counters, rules=[])
    agg.leases.replicas()  # connect and load scripts first; discovery (leases, groups) is measured
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while agg.counters.get("reports") * layers * len(KINDS) < summaries:
        agg.run_once()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    alerts = sum(agg.counters.read()[1].values())
    agg.stop()
    return {"variant": name, "ranks": world, "rules": len(agg.rules.rules), "summaries": summaries,
            "summaries_per_s": summaries / wall, "cpu_us_per_summary": 1e6 * cpu / summaries, "alerts": alerts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", type=int, default=2000, help="reports per variant (default 2000)")
    ap.add_argument("--layers", type=int, default=34, help="layers per report, 3 summaries each (default 34)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest counts (default 3)")
    ap.add_argument("--json", type=Path, help="write the results there")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis", appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        rows = []
        for name, world, rules in (("rules off", 1, False), ("all rules", 1, True),
                                   ("all rules, 4 ranks (join)", 4, True)):
            runs = [variant(server.url, client, name, world, rules, a.reports, a.layers) for _ in range(a.repeat)]
            best = max(runs, key=lambda r: r["summaries_per_s"])
            best["all_summaries_per_s"] = [round(r["summaries_per_s"]) for r in runs]
            rows.append(best)
    base = rows[0]["summaries_per_s"]
    print(f"{'variant':<28} {'rules':>5} {'summaries':>10} {'summaries/s':>12} {'CPU us/summary':>15} {'vs off':>7}")
    for r in rows:
        print(f"{r['variant']:<28} {r['rules']:>5} {r['summaries']:>10} {r['summaries_per_s']:>12,.0f} "
              f"{r['cpu_us_per_summary']:>15.2f} {r['summaries_per_s'] / base:>7.2f}")
    print("target: >= 500,000 summaries/s per aggregator process with every rule on")
    if a.json:
        a.json.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                      "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
