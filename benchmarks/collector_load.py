"""Collector ingest under load: real processes on this machine, acknowledged summaries per second and CPU cost.

A redis-server (AOF everysec, as `gradwatch up` runs it) and a collector (`python -m gradwatch.collector`)
run as their own processes; N sender processes (multiprocessing, spawn) each keep `--concurrency` Export
calls in flight over loopback. Senders send PRE-ENCODED ExportRequest bytes through a raw unary call (no
request serializer), so the load generator spends its CPU on gRPC, not on protobuf encoding. Each sender
encodes a pool of distinct requests once (distinct step and sequence numbers) and cycles through it.

Reports are realistic: `--tensors` summaries per report (default 100) with log2-magnitude histograms as the
agent sends them, `--reports` reports per request (default 16). The same load without histograms runs in
the same invocation, side by side.

Measured per mode over a fixed window (`--seconds`):
  summaries/s       acknowledged (OK answers) tensor summaries per second
  requests/s, p50/p99 latency of Export calls as the senders see them
  collector CPU-s per million summaries (utime+stime of the collector process, from /proc/<pid>/stat)
  redis CPU-s per million summaries (the same for redis-server)
and the ratios to TARGET_SUMMARIES_PER_S and TARGET_CPU_S_PER_MILLION (<= 10 CPU-s per million).
Target (docs/architecture.md#performance-targets): >= 1M summaries/s per collector process, acked after the Redis write.

The load generator runs on the same machine and competes with the collector and Redis for cores: read
throughput on a small machine as a lower bound; CPU-s per million is the figure that carries over.

Run: python benchmarks/collector_load.py [--seconds 10] [--senders 4] [--concurrency 8] [--out result.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TARGET_SUMMARIES_PER_S = 1_000_000
TARGET_CPU_S_PER_MILLION = 10.0
EXPORT_METHOD = "/gradwatch.v1.IngestService/Export"
POOL_REQUESTS = 32          # distinct pre-encoded requests per sender
CALL_TIMEOUT_S = 30.0
UNAVAILABLE_PAUSE_S = 0.05  # a refused call (e.g. over the in-flight limit) waits this long before the next
HIST_SPAN = 24              # occupied log2 buckets of a typical weight/gradient tensor
HIST_LO = 12


# ---- request building (in the sender processes) ------------------------------------------------------------

def build_pool(run_id: str, rank: int, n_requests: int, reports_per_request: int, tensors: int,
               histogram: bool, seed: int) -> tuple[list[bytes], int]:
    """(encoded ExportRequests, summaries per request). Statistics are random but plausible."""
    from gradwatch.v1 import ingest_service_pb2, report_pb2

    rng = random.Random(seed)
    template = report_pb2.StepReport(run_id=run_id, rank=rank, step_seconds=0.032, learning_rates=[3e-4])
    template.capture_time.FromNanoseconds(time.time_ns())
    for tid in range(tensors):
        numel = rng.choice((768, 768 * 768, 3 * 768 * 768, 4 * 768 * 768))
        summary = template.tensors.add(
            tensor_id=tid, count=numel, zero_count=rng.randrange(0, 16), sum=rng.gauss(0.0, 1.0) * numel ** 0.5,
            sum_squares=numel * rng.uniform(1e-5, 1e-3), min=-rng.uniform(0.01, 1.0), max=rng.uniform(0.01, 1.0))
        if histogram:
            # A bell over HIST_SPAN buckets summing to numel: what a Gaussian-ish tensor's log2 histogram looks like.
            weights = [2.0 ** -abs(i - HIST_SPAN * 0.7) for i in range(HIST_SPAN)]
            total = sum(weights)
            summary.histogram_offset = HIST_LO + rng.randrange(0, 8)
            summary.histogram.extend(int(numel * w / total) for w in weights)
    pool = []
    sequence = 0
    for _ in range(n_requests):
        request = ingest_service_pb2.ExportRequest()
        for _ in range(reports_per_request):
            sequence += 1
            report = request.reports.add()
            report.CopyFrom(template)
            report.step, report.sequence = sequence - 1, sequence
            report.loss = rng.uniform(2.0, 4.0)
        pool.append(request.SerializeToString())
    return pool, reports_per_request * tensors


def sender_main(index: int, target: str, args: dict, ready, go, results) -> None:
    """One sender process: build its pool, wait for `go`, keep `concurrency` calls in flight until the end."""
    pool, per_request = build_pool(f"bench-{args['mode']}-{index}", 0, POOL_REQUESTS, args["reports"],
                                   args["tensors"], args["histogram"], seed=index)
    results.put(("size", index, len(pool[0]) / per_request))
    outcome = asyncio.run(_send(target, pool, per_request, args, ready, go))
    results.put(("done", index, outcome))


async def _send(target: str, pool: list[bytes], per_request: int, args: dict, ready, go) -> dict:
    import grpc

    from gradwatch.v1.ingest_service_pb2 import ExportResponse

    latencies: list[float] = []
    errors: dict[str, int] = {}
    acked = rejected = 0
    async with grpc.aio.insecure_channel(target) as channel:
        export = channel.unary_unary(EXPORT_METHOD, request_serializer=None,
                                     response_deserializer=ExportResponse.FromString)
        await channel.channel_ready()
        ready.release()
        await asyncio.to_thread(go.wait)
        started = time.perf_counter()
        deadline = started + args["seconds"]
        cpu_start = time.process_time()

        async def worker(offset: int) -> None:
            nonlocal acked, rejected
            i = offset
            while time.perf_counter() < deadline:  # bounded: stops at the window's end
                t0 = time.perf_counter()
                try:
                    response = await export(pool[i % len(pool)], timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                    await asyncio.sleep(UNAVAILABLE_PAUSE_S)
                    continue
                finally:
                    i += 1
                latencies.append(time.perf_counter() - t0)
                bad = response.partial_success.rejected_reports
                rejected += bad
                acked += per_request - bad * args["tensors"]

        await asyncio.gather(*(worker(k * 7) for k in range(args["concurrency"])))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_start
    return {"latencies": latencies, "errors": errors, "acked": acked, "rejected": rejected,
            "elapsed": elapsed, "cpu": cpu}


# ---- processes under test ----------------------------------------------------------------------------------

def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process in seconds, from /proc/<pid>/stat (no psutil needed)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_tcp(address: str, timeout: float, proc: subprocess.Popen) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited with {proc.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"collector not listening on {address} after {timeout}s")


def scrape_summaries(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("gradwatch_collector_summaries_total "):
                return float(line.split()[1])
    return 0.0


def run_mode(mode: str, histogram: bool, target: str, collector_pid: int, redis_pid: int, metrics: str,
             opts: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    args = {"mode": mode, "histogram": histogram, "seconds": opts.seconds, "concurrency": opts.concurrency,
            "reports": opts.reports, "tensors": opts.tensors}
    procs = [ctx.Process(target=sender_main, args=(i, target, args, ready, go, results), daemon=True)
             for i in range(opts.senders)]
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise RuntimeError("a sender did not get ready within 120 s")
    summaries_before = scrape_summaries(metrics)
    cpu_before = proc_cpu_s(collector_pid), proc_cpu_s(redis_pid)
    t0 = time.perf_counter()
    go.set()
    sizes, outcomes = [], []
    while len(outcomes) < len(procs):
        kind, _, value = results.get(timeout=opts.seconds + CALL_TIMEOUT_S + 120)
        (sizes if kind == "size" else outcomes).append(value)
    wall = time.perf_counter() - t0
    cpu_after = proc_cpu_s(collector_pid), proc_cpu_s(redis_pid)
    for p in procs:
        p.join(30)
    summaries_collector = scrape_summaries(metrics) - summaries_before
    latencies = sorted(x for o in outcomes for x in o["latencies"])
    acked = sum(o["acked"] for o in outcomes)
    errors: dict[str, int] = {}
    for o in outcomes:
        for code, n in o["errors"].items():
            errors[code] = errors.get(code, 0) + n
    million = max(acked, 1) / 1e6
    return {
        "mode": mode, "wall_s": wall, "bytes_per_summary": statistics.mean(sizes),
        "summaries_acked": acked, "summaries_counted_by_collector": summaries_collector,
        "summaries_per_s": acked / wall, "requests": len(latencies), "requests_per_s": len(latencies) / wall,
        "p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan"),
        "collector_cpu_s": cpu_after[0] - cpu_before[0], "redis_cpu_s": cpu_after[1] - cpu_before[1],
        "collector_cpu_s_per_million": (cpu_after[0] - cpu_before[0]) / million,
        "redis_cpu_s_per_million": (cpu_after[1] - cpu_before[1]) / million,
        "senders_cpu_s": sum(o["cpu"] for o in outcomes), "errors": errors,
        "rejected_reports": sum(o["rejected"] for o in outcomes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per mode (default 10)")
    parser.add_argument("--senders", type=int, default=4, help="sender processes (default 4)")
    parser.add_argument("--concurrency", type=int, default=8, help="Export calls in flight per sender (default 8)")
    parser.add_argument("--reports", type=int, default=16, help="reports per request (default 16)")
    parser.add_argument("--tensors", type=int, default=100, help="tensor summaries per report (default 100)")
    parser.add_argument("--stream-maxlen", type=int, default=2000,
                        help="collector --stream-maxlen: bounds Redis memory over the run (default 2000)")
    parser.add_argument("--modes", default="histogram,no_histogram", help="comma-separated subset to run")
    parser.add_argument("--out", help="also write the results as JSON here")
    opts = parser.parse_args()
    if not (opts.seconds > 0 and opts.senders >= 1 and opts.concurrency >= 1 and opts.reports >= 1
            and opts.tensors >= 1):
        parser.error("--seconds, --senders, --concurrency, --reports and --tensors must be positive")

    import redis

    from gradwatch.cli.processes import stop_process
    from gradwatch.cli.redis_server import RedisServer, free_port

    modes = [m for m in opts.modes.split(",") if m]
    results = []
    with tempfile.TemporaryDirectory(prefix="gw-collector-load-") as tmp, \
            RedisServer(Path(tmp) / "redis", appendonly=True) as server:
        target, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        collector = subprocess.Popen(
            [sys.executable, "-m", "gradwatch.collector", "--listen", target, "--redis-url", server.url,
             "--metrics-listen", metrics, "--stream-maxlen", str(opts.stream_maxlen), "--log-level", "WARNING"])
        client = redis.Redis.from_url(server.url)
        try:
            wait_tcp(target, 30, collector)
            for mode in modes:
                if mode not in ("histogram", "no_histogram"):
                    parser.error(f"unknown mode {mode!r}")
                result = run_mode(mode, mode == "histogram", target, collector.pid, server.proc.pid, metrics, opts)
                results.append(result)
                client.flushall()  # outside the window: the next mode starts from an empty Redis
        finally:
            client.close()
            stop_process(collector, 15)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"collector load: {opts.senders} sender processes x {opts.concurrency} in flight, {opts.reports} "
          f"reports x {opts.tensors} summaries per request, {opts.seconds:.0f} s per mode; {machine}")
    print("(senders, collector and redis-server share this machine's cores)")
    header = (f"{'mode':<13} {'B/summ':>7} {'summ/s':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'coll CPU-s/M':>12} {'redis CPU-s/M':>13} {'senders CPU-s':>13} {'errors':>8}")
    print(header)
    for r in results:
        print(f"{r['mode']:<13} {r['bytes_per_summary']:>7.1f} {r['summaries_per_s']:>9,.0f} "
              f"{r['requests_per_s']:>7.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
              f"{r['collector_cpu_s_per_million']:>12.2f} {r['redis_cpu_s_per_million']:>13.2f} "
              f"{r['senders_cpu_s']:>13.1f} {sum(r['errors'].values()):>8}")
    for r in results:
        ok = r["summaries_counted_by_collector"] == r["summaries_acked"]
        print(f"{r['mode']}: {r['summaries_per_s'] / TARGET_SUMMARIES_PER_S:.2f}x the "
              f"{TARGET_SUMMARIES_PER_S:,} summaries/s target; "
              f"collector {r['collector_cpu_s_per_million'] / TARGET_CPU_S_PER_MILLION:.2f}x the "
              f"{TARGET_CPU_S_PER_MILLION:.0f} CPU-s per million budget (<= 1 meets it); acked "
              f"{r['summaries_acked']:,} = collector counted {r['summaries_counted_by_collector']:,.0f}: "
              f"{'yes' if ok else 'NO'}" + (f"; errors {r['errors']}" if r["errors"] else ""))
    if opts.out:
        Path(opts.out).write_text(json.dumps({"machine": machine, "options": vars(opts), "results": results},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
