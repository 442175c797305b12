"""Scale: the whole server side as separate processes on one machine, and what each component costs per summary.

R ranks x T tensors (runs of `--ranks` ranks) go through real collector processes (`python -m gradwatch.collector`,
gRPC on loopback) into a real three-master Redis Cluster (redis-server 7, tests/scenarios/cluster/local_cluster.py)
and out of M aggregator replica processes (`python -m gradwatch.aggregator --redis-cluster`). The load generator
is sender processes (multiprocessing, spawn) holding one coroutine per rank: each rank sends its own Export
calls, one at a time, as an agent's exporter thread does. Reports are encoded by the agent's own encoder
(agent/export/encode.py: DDP parameters and gradients, replica checksums, sparse log2 histograms); per step
only the header (step, sequence, capture time, loss) is encoded again and put in front of the encoded
summaries, byte for byte what `step_report` makes (checked at start-up).

Two phases:

1. Saturation, (1 collector, 1 aggregator) and (2 collectors, 2 aggregators), interleaved `--repeat` times;
   the fastest fill and the fastest drain count (on a shared machine the slower ones measure the neighbours).
   - fill: once the replicas have shared the leases out they are paused (SIGSTOP); every rank sends
     `--fill-steps` steps as fast as its collector acknowledges them (ranks of a run kept within 2 steps of
     each other, as training keeps them). Collector summaries/s per process, CPU-s per million summaries of
     the collectors, Redis and the load generator, stream bytes per summary in Redis.
   - drain: the replicas resume (SIGCONT) and apply the backlog; done when each run's `applied` hash counts
     every report. Aggregator summaries/s per process, CPU-s per million of the aggregators and Redis, and
     Redis bytes per step once the streams are trimmed (history rows, watermarks).
2. Paced, 2 collectors and 2 aggregators: every rank sends a step every 1/S s. End-to-end lag from the
   report's capture time to (a) the step served by the aggregator's API (/api/v1/runs, the value of
   `gradwatch_run_step`) and (b) the joined step's history row in Redis, written before its entries are
   acked; p50 and p99 over every step of every run, to within the poll interval (`--poll-ms`). Also CPU-s
   per million at that load and Redis bytes per step. Each step goes out when it is captured: the agent's
   export interval (0.5 s by default, agent/config.py) is not in these lags.

CPU seconds are utime + stime from /proc/<pid>/stat (senders: their own process time); Redis memory is
INFO used_memory summed over the three nodes, and MEMORY USAGE per key after the drain (history vs. the live
view's frames, which stop at 256 per run). /proc/stat gives what the rest of the machine took in each window
(`other_cores_busy`, `steal_cores`): on a shared machine, read a round whose others were busy as noise.

Small machines: the load generator, the collectors, the aggregators and three redis-servers share the cores.
Throughput is then a lower bound and a 1 -> 2 process ratio is bounded by the cores; CPU-s per million, and
its 1 -> 2 ratio (1.0: scaling out costs nothing per summary), is what carries over to a bigger machine.

Rerun on a quiet machine (the committed figures came from a shared one; let nothing else run meanwhile):

    .venv/bin/python benchmarks/scale.py --load quiet --json benchmarks/results-scale-<cores>core-<date>.json
    .venv/bin/python benchmarks/scale.py --load quiet --runs 2 --ranks 32 --fill-steps 60 --repeat 1 --paced-s 0 \
        --json benchmarks/results-scale-wide-<cores>core-<date>.json     # wide runs: 32 ranks each

`--quick` is a smoke run (under a minute) whose windows are too short to quote. Ctrl-C or SIGTERM stops every
process it started; after a SIGKILL the kernel ends the collectors, aggregators and senders, but the three
redis-server nodes (and their /tmp/gw-scale-* directory) stay.

Needs redis-server >= 7 and redis-cli (Debian's; `--redis-server PATH` or GRADWATCH_REDIS_SERVER picks one).
Sizing from these figures: docs/sizing.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPORT_METHOD = "/gradwatch.v1.IngestService/Export"
VARIANTS = 4      # distinct summary sets per run, cycled over the steps (parameters move, UnchangedTensor stays quiet)
WINDOW = 2        # a rank runs at most this many steps ahead of the slowest rank of its run (burst)
CALL_TIMEOUT_S = 30.0
RETRY_FOR_S = 60.0  # an agent keeps a failed batch this long (retryable codes only) before the sender gives up
LEASE_TTL_MS = 120_000  # outlives a paused fill: the paused replicas keep their runs
DISCOVER_INTERVAL_S = 0.5
NODE_TIMEOUT_MS = 15_000  # a loaded 2-core machine must not get a node declared failed
QUICK = dict(runs=2, ranks=4, tensors=300, fill_steps=30, steps_per_s=2.0, paced_s=6.0, repeat=1)
DEFAULT = dict(runs=4, ranks=8, tensors=300, fill_steps=150, steps_per_s=4.0, paced_s=30.0, repeat=2)


# ---- reports, as the agent encodes them (main process; the agent's modules import torch) ------------------

def model_slots(tensors: int) -> list:
    """A GPT-2-like dictionary: parameters and their gradients, DDP-replicated."""
    from gradwatch.agent.capture.slots import TensorSlot
    from gradwatch.v1 import run_pb2

    shapes = ((768,), (768, 768), (768, 2304), (768, 3072), (3072, 768))
    slots = []
    for i in range(tensors):
        layer, grad = i // 2, i % 2
        shape = shapes[layer % len(shapes)]
        kind = run_pb2.TENSOR_KIND_GRADIENT if grad else run_pb2.TENSOR_KIND_PARAMETER
        slots.append(TensorSlot(id=i, name=f"h.{layer}.weight" + (".grad" if grad else ""), kind=kind,
                                module_path=f"h.{layer}", order=layer, shape=shape, dtype="float32",
                                numel=math.prod(shape), partition=run_pb2.PARTITION_REPLICATED))
    return slots


def stats_rows(slots: list, variant: int, rng: random.Random):
    """The agent's host buffer (agent/stats/layout.py): one float64 row per tensor, a bell-shaped histogram."""
    import numpy as np

    from gradwatch.agent.stats.layout import (
        COL_CHECK_HI,
        COL_CHECK_LO,
        COL_HIST,
        COL_MAX,
        COL_MIN,
        COL_SUM,
        COL_SUMSQ,
        COL_ZERO,
        NCOLS,
    )

    rows = np.zeros((len(slots), NCOLS))
    for s in slots:
        grad = s.name.endswith(".grad")
        scale = (1e-4 if grad else 0.02) * (1 + 0.01 * variant + 0.001 * rng.random())
        peak = 40 + math.floor(math.log2(scale))  # bucket i: floor(log2|x|) = i - 40
        weights = [2.0 ** -abs(i - 18) for i in range(22)]  # 22 occupied buckets, peak 3 below the top one
        counts = [int(s.numel * w / sum(weights)) for w in weights]
        r = rows[s.id]
        r[COL_HIST + peak - 18: COL_HIST + peak + 4] = counts
        r[COL_ZERO] = rng.randrange(0, 4)
        r[COL_SUM] = rng.gauss(0.0, scale) * s.numel ** 0.5
        r[COL_SUMSQ] = s.numel * scale * scale
        r[COL_MIN], r[COL_MAX] = -6 * scale, 6 * scale
        checksum = rng.getrandbits(64)
        high = checksum >> 32
        r[COL_CHECK_LO], r[COL_CHECK_HI] = checksum & 0xFFFFFFFF, high - (1 << 32) if high >= 1 << 31 else high
    return rows


def header(run: str, rank: int, step: int, capture_ns: int, loss: float) -> bytes:
    """A report without its summaries: the fields an agent's report has before field 11 (tensors)."""
    from gradwatch.v1 import report_pb2

    h = report_pb2.StepReport(run_id=run, rank=rank, step=step, sequence=step + 1, phase=report_pb2.PHASE_TRAIN,
                              learning_rates=[3e-4], loss=loss)
    h.capture_time.FromNanoseconds(capture_ns)
    return h.SerializeToString()


def report_request(head: bytes, summaries: bytes) -> bytes:
    """An ExportRequest holding one report (field 2, length-delimited), as the agent sends at <= 2 steps/s."""
    body = head + summaries
    n, length = len(body), bytearray()
    while n > 0x7F:
        length.append(n & 0x7F | 0x80)
        n >>= 7
    length.append(n)
    return b"\x12" + bytes(length) + body


def encode_load(runs: list[str], world: int, tensors: int) -> tuple[dict[str, list[bytes]], dict, float]:
    """(run -> VARIANTS encoded summary sets, (run, rank) -> encoded registration, bytes per summary). Every rank of
    a run sends the same replicated summaries (DDP), so the cross-rank replica check stays quiet."""
    from gradwatch.agent.export import encode
    from gradwatch.v1 import ingest_service_pb2, report_pb2

    slots = model_slots(tensors)
    rng = random.Random(7)
    templates: dict[str, list[bytes]] = {}
    for run in runs:
        templates[run] = []
        for v in range(VARIANTS):
            rows = stats_rows(slots, v, rng)
            full = encode.step_report(run, 0, 0, 1, 1.7e9, report_pb2.PHASE_TRAIN, rows, slots, True, {"loss": 2.5},
                                      [3e-4])
            templates[run].append(report_pb2.StepReport(tensors=full.tensors).SerializeToString())
            if v == 0:  # the splice is exactly the agent's encoding, and the request what its exporter sends
                spliced = header(run, 0, 0, int(1.7e9 * 1e9), 2.5) + templates[run][0]
                assert spliced == full.SerializeToString(), "header + summaries differs from step_report's bytes"
                sent = ingest_service_pb2.ExportRequest.FromString(report_request(header(run, 0, 0, 0, 2.5),
                                                                                  templates[run][0]))
                assert len(sent.reports) == 1 and len(sent.reports[0].tensors) == tensors
    start = time.time()
    registrations = {(run, rank): encode.registration(run, rank, world, slots, {"lr": 3e-4, "model": "gpt2-like"},
                                                      {"bench": "scale"}, None, start).SerializeToString()
                     for run in runs for rank in range(world)}
    per_summary = statistics.mean(len(t) for ts in templates.values() for t in ts) / tensors
    return templates, registrations, per_summary


# ---- the load generator (sender processes) -----------------------------------------------------------------

def sender_main(spec: dict, ready, go, t0, results) -> None:
    _die_with_parent()
    try:
        results.put(asyncio.run(_send_all(spec, ready, go, t0)))
    except KeyboardInterrupt:
        pass


async def _send_all(spec: dict, ready, go, t0_shared) -> dict:
    import grpc

    from gradwatch.agent.export.exporter import INITIAL_BACKOFF_S, MAX_BACKOFF_S, RETRYABLE_CODES
    from gradwatch.v1.ingest_service_pb2 import ExportResponse

    channels = [grpc.aio.insecure_channel(target) for target in spec["targets"]]
    exports = [ch.unary_unary(EXPORT_METHOD, request_serializer=None, response_deserializer=ExportResponse.FromString)
               for ch in channels]
    for ch in channels:
        await ch.channel_ready()
    ready.release()
    await asyncio.to_thread(go.wait)
    t0, steps, rate, paced = t0_shared.value, spec["steps"], spec["steps_per_s"], spec["paced"]
    await asyncio.sleep(max(0.0, t0 - time.time()))
    cpu0 = time.process_time()
    latencies: list[float] = []
    lateness: list[float] = []
    errors: dict[str, int] = {}
    acked: dict[str, int] = {}
    progress = {run: [-1] * spec["world"] for run in spec["templates"]}
    moved = asyncio.Condition()

    async def send(export, request: bytes) -> bool:
        delay, give_up = INITIAL_BACKOFF_S, time.monotonic() + RETRY_FOR_S
        while True:
            began = time.perf_counter()
            try:
                response = await export(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1
                if err.code() not in RETRYABLE_CODES or time.monotonic() > give_up:
                    return False
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # as the agent: jittered, doubling
                delay = min(2 * delay, MAX_BACKOFF_S)
                continue
            latencies.append(time.perf_counter() - began)
            return response.partial_success.rejected_reports == 0

    async def rank_loop(run: str, rank: int, collector: int) -> None:
        summaries, mine = spec["templates"][run], progress[run]
        rng = random.Random(hash((run, rank)))
        for step in range(steps):
            if paced:
                due = t0 + step / rate
                await asyncio.sleep(max(0.0, due - time.time()))
                lateness.append(time.time() - due)
                capture_ns = int(due * 1e9)
            else:
                async with moved:
                    await moved.wait_for(lambda k=step: min(mine) >= k - WINDOW)
                capture_ns = time.time_ns()
            head = header(run, rank, step, capture_ns, 2.0 + rng.random())
            request = report_request(head, summaries[step % VARIANTS])
            if await send(exports[collector], request):
                acked[run] = acked.get(run, 0) + 1
            async with moved:
                mine[rank] = step
                moved.notify_all()

    await asyncio.gather(*(rank_loop(run, rank, c) for run, rank, c in spec["agents"]))
    elapsed, cpu = time.time() - t0, time.process_time() - cpu0
    for ch in channels:
        await ch.close()
    return {"acked": acked, "latencies": latencies, "lateness": lateness, "errors": errors, "elapsed_s": elapsed,
            "cpu_s": cpu}


def run_senders(plan: dict, collectors: list[str], templates: dict, senders: int, steps: int, steps_per_s: float,
                paced: bool, start_in: float, before_go=None) -> tuple[list[dict], float]:
    """Runs the load; returns (each sender's outcome, t0). Whole runs per sender, so each keeps its runs' ranks
    together; `plan`: run -> [(rank, collector index)]."""
    ctx = mp.get_context("spawn")
    ready, go, results, t0 = ctx.Semaphore(0), ctx.Event(), ctx.Queue(), ctx.Value("d", 0.0)
    runs = sorted(plan)
    procs = []
    for i in range(senders):
        mine = runs[i::senders]
        spec = {"targets": collectors, "templates": {r: templates[r] for r in mine}, "steps": steps, "paced": paced,
                "steps_per_s": steps_per_s, "world": len(plan[runs[0]]),
                "agents": [(r, rank, c) for r in mine for rank, c in plan[r]]}
        procs.append(ctx.Process(target=sender_main, args=(spec, ready, go, t0, results), daemon=True,
                                 name=f"scale-sender-{i}"))
    _SENDERS.extend(procs)
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise RuntimeError("a sender process did not connect to the collectors within 120 s")
    t0.value = time.time() + start_in
    if before_go is not None:
        before_go(t0.value)
    go.set()
    outcomes = []
    while len(outcomes) < len(procs):
        try:
            outcomes.append(results.get(timeout=5))
        except Exception:  # noqa: BLE001 - queue.Empty: check that no sender died
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"sender {dead[0].name} exited with {dead[0].exitcode}") from None
    for p in procs:
        p.join(10)
    return outcomes, t0.value


# ---- processes under test ---------------------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen] = []
_SENDERS: list = []


def _die_with_parent() -> None:
    """Called in a child (collector, aggregator, sender): the kernel kills it when this process dies without
    cleaning up (SIGKILL, Linux only). SIGKILL, because a paused aggregator would keep a SIGTERM pending forever."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM, /proc/<pid>/status) in MiB: a fill and a drain of a backlog are the
    memory bound's test (back-pressure: the backlog waits in Redis, not in the collector or the aggregator)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_cpu() -> tuple[float, ...]:
    """(CPU-s in user and system mode of every core, in interrupts, stolen by the hypervisor; this process's CPU-s;
    monotonic time), from /proc/stat: beside our processes' CPU it shows what the machine's other tenants took."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    tck = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / tck, (irq + softirq) / tck, steal / tck, time.process_time(), time.monotonic()


def others(before: tuple[float, ...], ours_cpu_s: float) -> dict:
    """Cores the rest of the machine kept busy since `before` (other tenants), in interrupts (loopback networking
    is largely ours) and stolen by the hypervisor; `ours_cpu_s`: our children's CPU-s (this process's own is
    taken off here)."""
    busy, interrupts, steal, mine, now = machine_cpu()
    wall = max(now - before[4], 1e-9)
    return {"other_cores_busy": max(0.0, (busy - before[0] - ours_cpu_s - (mine - before[3])) / wall),
            "interrupt_cores": (interrupts - before[1]) / wall, "steal_cores": (steal - before[2]) / wall}


def http_get(address: str, path: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as response:
        return response.read()


def metric_sums(address: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each named sample on /metrics at `address`, summed over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(http_get(address, "/metrics").decode()):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


class Fleet:
    """The collector and aggregator processes of one round, on the cluster: started together, stopped together."""

    def __init__(self, url: str, logs: Path, collectors: int, aggregators: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
        env.update(GRADWATCH_AGGREGATOR_LEASE_TTL_MS=str(LEASE_TTL_MS),
                   GRADWATCH_AGGREGATOR_DISCOVER_INTERVAL_S=str(DISCOVER_INTERVAL_S))
        free = _ports()
        self.collectors, self.aggregators = [], []
        for i in range(collectors):
            target, metrics = f"127.0.0.1:{next(free)}", f"127.0.0.1:{next(free)}"
            proc = self._spawn(["gradwatch.collector", "--listen", target, "--metrics-listen", metrics, "--redis-url",
                                url, "--redis-cluster", "--log-level", "WARNING"], logs / f"collector-{i}.log", env)
            self.collectors.append({"proc": proc, "target": target, "metrics": metrics,
                                    "log": logs / f"collector-{i}.log"})
        for i in range(aggregators):
            name, http = f"scale-aggregator-{i}", f"127.0.0.1:{next(free)}"
            proc = self._spawn(["gradwatch.aggregator", "--consumer", name, "--metrics-listen", http, "--redis-url",
                                url, "--redis-cluster", "--log-level", "WARNING"], logs / f"aggregator-{i}.log", env)
            self.aggregators.append({"proc": proc, "name": name, "http": http, "log": logs / f"aggregator-{i}.log"})
        self.paused = False

    @staticmethod
    def _spawn(args: list[str], log: Path, env: dict) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
        _CHILDREN.append(proc)
        return proc

    def _alive(self, child: dict) -> None:
        if child["proc"].poll() is not None:
            tail = child["log"].read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{child['log'].stem} exited with {child['proc'].returncode}:\n{tail}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for child in self.collectors + self.aggregators:
            while True:
                self._alive(child)
                try:
                    if "target" in child:
                        host, port = child["target"].rsplit(":", 1)
                        socket.create_connection((host, int(port)), timeout=0.5).close()
                    else:
                        http_get(child["http"], "/healthz", timeout=1.0)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{child['log'].stem} not serving after {timeout:.0f} s") from None
                    time.sleep(0.1)

    def pids(self, kind: str) -> list[int]:
        return [c["proc"].pid for c in getattr(self, kind)]

    def pause(self) -> None:
        for a in self.aggregators:
            os.kill(a["proc"].pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        for a in self.aggregators:
            os.kill(a["proc"].pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        from gradwatch.cli.processes import stop_process

        if self.paused:
            self.resume()
        for child in self.collectors + self.aggregators:  # upstream first
            stop_process(child["proc"], 15)

    def log_problems(self) -> list[dict]:
        """Warnings, errors and tracebacks in the processes' logs (their directory is gone after the run)."""
        out = []
        for child in self.collectors + self.aggregators:
            lines = child["log"].read_text(errors="replace").splitlines()
            bad = [line for line in lines if " WARNING " in line or " ERROR " in line or line.startswith("Traceback")]
            if bad:
                out.append({"log": child["log"].name, "lines": len(bad), "first": bad[:3]})
        return out


def _ports():
    from gradwatch.cli.redis_server import free_port

    seen: set[int] = set()
    while True:
        port = free_port()
        if port not in seen:
            seen.add(port)
            yield port


def cleanup() -> None:
    """Ends every process this benchmark started (paused ones are resumed first, so they exit cleanly)."""
    from gradwatch.cli.processes import stop_process

    for proc in _CHILDREN:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except OSError:
                pass
            stop_process(proc, 10)
    for p in _SENDERS:
        if p.is_alive():
            p.terminate()
            p.join(5)


# ---- Redis ------------------------------------------------------------------------------------------------

def redis_7(explicit: str | None) -> tuple[str, str]:
    """(path, version) of a redis-server >= 7, or SystemExit saying what was found and what to do."""
    found = []
    chosen = explicit or os.environ.get("GRADWATCH_REDIS_SERVER")  # asked for by name: that one or none
    candidates = [chosen] if chosen else [shutil.which("redis-server"), "/usr/bin/redis-server"]
    for path in dict.fromkeys(p for p in candidates if p):
        if not os.path.exists(path):
            found.append(f"{path} (missing)")
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
        version = ".".join(match.groups()) if match else "unknown"
        if match and int(match.group(1)) >= 7:
            return path, version
        found.append(f"{path} ({version})")
    raise SystemExit(
        "scale.py needs redis-server 7 or newer for its Redis Cluster (the aggregator's commit script counts stream "
        f"losses with XINFO STREAM entries-added); found {', '.join(found) or 'none'}. Install Debian's "
        "(apt-get install redis-server redis-tools) or pass --redis-server PATH (redis-cli must be beside it or "
        "on the PATH)")


def runs_over_nodes(cluster, count: int) -> list[str]:
    """Run ids whose keys land on the cluster's nodes in turn, so every shard carries runs."""
    from gradwatch.streams import reports_key

    nodes = [node.port for node in cluster.nodes]
    runs: list[str] = []
    for i in range(100_000):
        run = f"scale-{i}"
        if cluster.owner(cluster.keyslot(reports_key(run))).port == nodes[len(runs) % len(nodes)]:
            runs.append(run)
            if len(runs) == count:
                return runs
    raise RuntimeError("no run ids for every node")


def used_memory(cluster) -> int:
    total = 0
    for node in cluster.nodes:
        with cluster.client(node) as client:
            total += int(client.info("memory")["used_memory"])
    return total


def aof_state(cluster) -> tuple[int, int]:
    """(AOF bytes, AOF rewrites so far) summed over the nodes: what Redis writes to disk."""
    size = rewrites = 0
    for node in cluster.nodes:
        with cluster.client(node) as client:
            info = client.info("persistence")
        size += int(info.get("aof_current_size", 0))
        rewrites += int(info.get("aof_rewrites", 0))
    return size, rewrites


def key_memory(cluster, runs: list[str], steps: int) -> dict:
    """Where a run's Redis memory goes (MEMORY USAGE, exact): the history grows with every step, the live view's
    frames stop at MAX_FRAMES per run (aggregator/http/live.py), the stream holds only what is not applied yet."""
    from gradwatch.streams import frames_key, history_key, history_steps_key, reports_key, run_keys

    groups = {"history": 0, "frames": 0, "stream": 0, "other": 0}
    frames = 0
    for run in runs:
        history = {history_key(run), history_steps_key(run)}
        keys = run_keys(run)
        with cluster.client(cluster.owner(cluster.keyslot(reports_key(run)))) as node:
            pipe = node.pipeline(transaction=False)
            for key in keys:
                pipe.memory_usage(key, samples=0)
            pipe.hlen(frames_key(run))
            *sizes, kept = pipe.execute()
        frames += max(0, kept - 1)  # less the "stride" field
        for key, size in zip(keys, sizes, strict=True):
            group = "frames" if key == frames_key(run) else "stream" if key == reports_key(run) else \
                "history" if key in history or key.startswith(history_key(run) + "-") else "other"
            groups[group] += size or 0
    return {"bytes": groups, "history_bytes_per_run_step": groups["history"] / (len(runs) * steps),
            "frames_kept": frames, "bytes_per_frame": groups["frames"] / max(frames, 1)}


def applied(client, runs: list[str]) -> dict[str, tuple[int, int]]:
    """run -> (reports, summaries) in its `applied` hash: what the fenced commits applied."""
    from gradwatch.aggregator.ingest.leases import applied_key

    pipe = client.pipeline(transaction=False)
    for run in runs:
        pipe.hmget(applied_key(run), ["reports", "summaries"])
    return {run: (int(r or 0), int(s or 0)) for run, (r, s) in zip(runs, pipe.execute(), strict=True)}


def pending(client, runs: list[str]) -> int:
    from gradwatch.streams import AGGREGATOR_GROUP, reports_key

    return sum(client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"] + client.xlen(reports_key(run))
               for run in runs)


def lease_owners(client, runs: list[str]) -> dict[str, str | None]:
    from gradwatch.aggregator.ingest.leases import lease_key

    pipe = client.pipeline(transaction=False)
    for run in runs:
        pipe.get(lease_key(run))
    return {run: v.decode() if v else None for run, v in zip(runs, pipe.execute(), strict=True)}


def merged_errors(outcomes: list[dict]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for o in outcomes:
        for code, n in o["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return errors


# ---- one round ---------------------------------------------------------------------------------------------

AGG_COUNTERS = tuple(f"gradwatch_aggregator_{n}_total" for n in (
    "reports", "duplicates", "steps_joined", "steps_incomplete", "late_reports", "redis_errors", "lease_lost",
    "alerts"))


def start_fleet(ctx: dict, collectors: int, aggregators: int) -> tuple[Fleet, dict[str, str], dict]:
    """A fresh cluster state and processes; the registrations sent; the leases shared out evenly.
    Returns (fleet, run -> owning replica, run -> [(rank, collector index)])."""
    import grpc

    from gradwatch.v1.ingest_service_pb2 import ExportRequest
    from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
    from gradwatch.v1.run_pb2 import RunRegistration

    cluster, client, runs, opts = ctx["cluster"], ctx["client"], ctx["runs"], ctx["opts"]
    for node in cluster.nodes:
        with cluster.client(node) as node_client:
            node_client.flushall()
    fleet = Fleet(cluster.url, ctx["logs"], collectors, aggregators)
    fleet.wait_ready()
    plan = {run: [(rank, (i * opts.ranks + rank) % collectors) for rank in range(opts.ranks)]
            for i, run in enumerate(runs)}
    channels = [grpc.insecure_channel(c["target"]) for c in fleet.collectors]
    try:  # each rank's registration through its collector, as the agent's first Export carries it
        for run, ranks in plan.items():
            for rank, c in ranks:
                reg = RunRegistration.FromString(ctx["registrations"][(run, rank)])
                IngestServiceStub(channels[c]).Export(ExportRequest(registrations=[reg]), timeout=10)
    finally:
        for channel in channels:
            channel.close()
    share = len(runs) // aggregators
    deadline = time.monotonic() + 60
    while True:  # each replica holds its fair share (the first to look takes all, then gives back one a discovery
        # interval once it sees the others), and it stays so for two discovery intervals
        owners = lease_owners(client, runs)
        held = [sum(1 for o in owners.values() if o == a["name"]) for a in fleet.aggregators]
        if held == [share] * aggregators:
            time.sleep(2 * DISCOVER_INTERVAL_S)
            if lease_owners(client, runs) == owners:
                return fleet, owners, plan
        if time.monotonic() > deadline:
            raise RuntimeError(f"leases never shared out evenly: {owners}")
        time.sleep(0.1)


def saturation_round(ctx: dict, collectors: int, aggregators: int) -> dict:
    cluster, client, runs, opts = ctx["cluster"], ctx["client"], ctx["runs"], ctx["opts"]
    fleet, owners, plan = start_fleet(ctx, collectors, aggregators)
    try:
        fleet.pause()
        redis_pids = [node.proc.pid for node in cluster.nodes]
        mem0, aof0 = used_memory(cluster), aof_state(cluster)
        marks = {}

        def mark(_t0: float) -> None:
            marks["machine"] = machine_cpu()
            marks["coll"] = [proc_cpu_s(p) for p in fleet.pids("collectors")]
            marks["redis"] = sum(proc_cpu_s(p) for p in redis_pids)
            marks["summ"] = [metric_sums(c["metrics"], ("gradwatch_collector_summaries_total",))[
                "gradwatch_collector_summaries_total"] for c in fleet.collectors]

        outcomes, _ = run_senders(plan, [c["target"] for c in fleet.collectors], ctx["templates"], ctx["senders"],
                                  opts.fill_steps, 0.0, False, 0.2, before_go=mark)
        fill_wall = max(o["elapsed_s"] for o in outcomes)
        coll_cpu = [proc_cpu_s(p) - c0 for p, c0 in zip(fleet.pids("collectors"), marks["coll"], strict=True)]
        redis_fill_cpu = sum(proc_cpu_s(p) for p in redis_pids) - marks["redis"]
        per_coll = [metric_sums(c["metrics"], ("gradwatch_collector_summaries_total",))[
            "gradwatch_collector_summaries_total"] - s0 for c, s0 in zip(fleet.collectors, marks["summ"], strict=True)]
        # CPU-s of the senders over the whole window, their set-up included: what the rest of the machine took
        fill_others = others(marks["machine"], sum(coll_cpu) + redis_fill_cpu + sum(o["cpu_s"] for o in outcomes))
        acked = {run: sum(o["acked"].get(run, 0) for o in outcomes) for run in runs}
        summaries = sum(acked.values()) * opts.tensors
        mem1, aof1 = used_memory(cluster), aof_state(cluster)

        # drain: the paused replicas apply the backlog; each is done when its runs' applied hashes count it all
        agg_pids = {a["name"]: a["proc"].pid for a in fleet.aggregators}
        agg0 = {name: proc_cpu_s(pid) for name, pid in agg_pids.items()}
        redis0 = sum(proc_cpu_s(p) for p in redis_pids)
        machine0 = machine_cpu()
        began = time.perf_counter()
        fleet.resume()
        done: dict[str, tuple[float, float]] = {}  # replica -> (seconds to drain its runs, its CPU-s)
        deadline = began + opts.drain_timeout_s
        while len(done) < aggregators:
            now_applied = applied(client, runs)
            for name, pid in agg_pids.items():
                mine = [run for run in runs if owners[run] == name]
                if name not in done and all(now_applied[run][0] >= acked[run] for run in mine):
                    done[name] = (time.perf_counter() - began, proc_cpu_s(pid) - agg0[name])
            if time.perf_counter() > deadline:
                raise RuntimeError(f"backlog not applied within {opts.drain_timeout_s:.0f} s: {now_applied} of {acked}")
            time.sleep(0.02)
        drain_wall = max(t for t, _ in done.values())
        redis_drain_cpu = sum(proc_cpu_s(p) for p in redis_pids) - redis0
        drain_others = others(machine0, sum(proc_cpu_s(pid) - agg0[name] for name, pid in agg_pids.items())
                              + redis_drain_cpu)
        settle = time.monotonic() + 10
        while pending(client, runs) and time.monotonic() < settle:
            time.sleep(0.05)
        left = pending(client, runs)
        mem2 = used_memory(cluster)
        keys = key_memory(cluster, runs, opts.fill_steps)
        final = applied(client, runs)
        counters = {k: 0.0 for k in AGG_COUNTERS}
        for a in fleet.aggregators:
            for k, v in metric_sums(a["http"], AGG_COUNTERS).items():
                counters[k] += v
        coll_rss = [peak_rss_mb(p) for p in fleet.pids("collectors")]
        agg_rss = [peak_rss_mb(pid) for pid in agg_pids.values()]
    finally:
        fleet.stop()
    problems = fleet.log_problems()
    per_agg = {name: sum(final[run][1] for run in runs if owners[run] == name) for name in done}
    million = max(summaries, 1) / 1e6
    errors = merged_errors(outcomes)
    lat = sorted(x for o in outcomes for x in o["latencies"])
    return {
        "collectors": collectors, "aggregators": aggregators, "summaries": summaries,
        "applied_summaries": sum(s for _, s in final.values()), "every_report_applied_once": all(
            final[run][0] == acked[run] for run in runs) and left == 0, "process_log_problems": problems,
        "fill": {
            "wall_s": fill_wall, "summaries_per_s": summaries / fill_wall,
            "per_collector_summaries_per_s": [n / fill_wall for n in per_coll],
            "collector_cpu_s": coll_cpu, "collector_cpu_s_per_million": sum(coll_cpu) / million,
            "collector_cores_busy": [c / fill_wall for c in coll_cpu],
            "collector_peak_rss_mb": coll_rss,
            "machine_cores_busy": (sum(coll_cpu) + redis_fill_cpu + sum(o["cpu_s"] for o in outcomes)) / fill_wall,
            **fill_others,
            "redis_cpu_s_per_million": redis_fill_cpu / million,
            "loadgen_cpu_s_per_million": sum(o["cpu_s"] for o in outcomes) / million,
            "export_p50_ms": 1e3 * _pct(lat, 50), "export_p99_ms": 1e3 * _pct(lat, 99), "errors": errors,
            "redis_stream_bytes_per_summary": (mem1 - mem0) / max(summaries, 1),
            # None when a rewrite shrank the file during the fill
            "aof_bytes_per_summary": (aof1[0] - aof0[0]) / max(summaries, 1) if aof1[1] == aof0[1] else None,
        },
        "drain": {
            "wall_s": drain_wall, "summaries_per_s": summaries / drain_wall,
            "per_aggregator_summaries_per_s": [per_agg[n] / done[n][0] for n in sorted(done)],
            "aggregator_cpu_s": [done[n][1] for n in sorted(done)],
            "aggregator_cpu_s_per_million": sum(c for _, c in done.values()) / million,
            "aggregator_cores_busy": [done[n][1] / done[n][0] for n in sorted(done)],
            "aggregator_peak_rss_mb": agg_rss,
            "machine_cores_busy": (sum(c for _, c in done.values()) + redis_drain_cpu) / drain_wall,
            **drain_others,
            "redis_cpu_s_per_million": redis_drain_cpu / million,
            "redis_bytes_per_run_step": (mem2 - mem0) / (len(runs) * opts.fill_steps), "redis_keys": keys,
            "entries_left_in_streams_or_pending": left, "counters": counters,
        },
    }


def paced_round(ctx: dict, collectors: int, aggregators: int) -> dict:
    from gradwatch.streams import history_steps_key

    cluster, client, runs, opts = ctx["cluster"], ctx["client"], ctx["runs"], ctx["opts"]
    steps = max(2, round(opts.paced_s * opts.steps_per_s))
    fleet, owners, plan = start_fleet(ctx, collectors, aggregators)
    served = {run: [] for run in runs}   # per run: (poll time, step shown by the API)
    durable = {run: [] for run in runs}  # per run: (poll time, latest step in the history in Redis)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(opts.poll_ms / 1000):
            for a in fleet.aggregators:
                try:
                    listed = json.loads(http_get(a["http"], "/api/v1/runs", timeout=2))["data"]["runs"]
                except (OSError, ValueError):
                    continue
                now = time.time()
                for r in listed:
                    if r["run"] in served and r["step"] is not None:
                        served[r["run"]].append((now, r["step"]))
            pipe = client.pipeline(transaction=False)
            for run in runs:
                pipe.zrevrange(history_steps_key(run), 0, 0, withscores=True)
            try:
                latest = pipe.execute()
            except Exception:  # noqa: BLE001 - a missed poll only coarsens the figure
                continue
            now = time.time()
            for run, top in zip(runs, latest, strict=True):
                if top:
                    durable[run].append((now, int(top[0][1])))

    redis_pids = [node.proc.pid for node in cluster.nodes]
    marks: dict = {}
    try:
        mem0 = used_memory(cluster)
        poller = threading.Thread(target=poll, name="scale-visibility", daemon=True)
        poller.start()

        def mark(t0: float) -> None:
            time.sleep(max(0.0, t0 - time.time()))
            marks.update(t0=t0, cpu={p: proc_cpu_s(p) for p in fleet.pids("collectors") + fleet.pids(
                "aggregators") + redis_pids})

        def at_mark(t0: float) -> None:  # CPU is read at t0, in a thread, so the senders start on time
            threading.Thread(target=mark, args=(t0,), daemon=True).start()

        outcomes, t0 = run_senders(plan, [c["target"] for c in fleet.collectors], ctx["templates"], ctx["senders"],
                                   steps, opts.steps_per_s, True, 1.0, before_go=at_mark)
        last = steps - 1
        deadline = time.monotonic() + 30
        while any(not durable[r] or durable[r][-1][1] < last for r in runs) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        poller.join(5)
        window = time.time() - t0
        cpu = {p: proc_cpu_s(p) - c0 for p, c0 in marks["cpu"].items()}
        mem1 = used_memory(cluster)
        keys = key_memory(cluster, runs, steps)
    finally:
        stop.set()
        fleet.stop()
    problems = fleet.log_problems()
    summaries = sum(sum(o["acked"].values()) for o in outcomes) * opts.tensors
    million = max(summaries, 1) / 1e6
    offered = len(runs) * opts.ranks * opts.tensors * opts.steps_per_s

    def lags(seen: dict[str, list]) -> tuple[list[float], int]:
        out, missing = [], 0
        for run in runs:
            polls = seen[run]
            for step in range(steps):
                at = next((t for t, s in polls if s >= step), None)
                if at is None:
                    missing += 1
                else:
                    out.append(at - (t0 + step / opts.steps_per_s))
        return sorted(out), missing

    served_lag, served_missing = lags(served)
    durable_lag, durable_missing = lags(durable)
    late = sorted(x for o in outcomes for x in o["lateness"])
    coll = sum(cpu[p] for p in fleet.pids("collectors"))
    agg = sum(cpu[p] for p in fleet.pids("aggregators"))
    red = sum(cpu[p] for p in redis_pids)
    return {
        "collectors": collectors, "aggregators": aggregators, "steps_per_s": opts.steps_per_s, "steps": steps,
        "offered_summaries_per_s": offered, "per_collector_summaries_per_s": offered / collectors,
        "per_aggregator_summaries_per_s": offered / aggregators,
        "summaries": summaries, "window_s": window, "poll_ms": opts.poll_ms,
        "lag_served_s": _lag_stats(served_lag, served_missing),
        "lag_durable_s": _lag_stats(durable_lag, durable_missing),
        "sender_lateness_p50_s": _pct(late, 50), "sender_lateness_p99_s": _pct(late, 99),
        "cpu_s_per_million": {"collector": coll / million, "aggregator": agg / million, "redis": red / million,
                              "loadgen": sum(o["cpu_s"] for o in outcomes) / million},
        "cores_used": {"collectors": coll / window, "aggregators": agg / window, "redis": red / window},
        "redis_bytes_per_run_step": (mem1 - mem0) / (len(runs) * steps), "redis_keys": keys,
        "errors": merged_errors(outcomes), "process_log_problems": problems,
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def _lag_stats(values: list[float], missing: int) -> dict:
    return {"p50": _pct(values, 50), "p99": _pct(values, 99), "max": values[-1] if values else float("nan"),
            "steps": len(values), "never_seen": missing}


# ---- report ------------------------------------------------------------------------------------------------

def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    gpu = "none found" if shutil.which("nvidia-smi") is None else "nvidia-smi present"
    return {"cores": os.cpu_count(), "cpu": model, "memory_gib": round(mem / 2**20, 1), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version()}


def summarize(rounds: list[dict], paced: dict | None) -> dict:
    """Best fill and best drain per configuration, the 1 -> 2 ratios and the per-process ceilings."""
    best = {}
    for key in ("fill", "drain"):
        for n in sorted({r["collectors" if key == "fill" else "aggregators"] for r in rounds}):
            mine = [r for r in rounds if r["collectors" if key == "fill" else "aggregators"] == n]
            best[f"{key}_{n}"] = max(mine, key=lambda r: r[key]["summaries_per_s"])[key]
            best[f"{key}_{n}"]["all_summaries_per_s"] = [round(r[key]["summaries_per_s"]) for r in mine]
    out = {"best": best}
    if "fill_1" in best and "fill_2" in best:
        f1, f2 = best["fill_1"], best["fill_2"]
        out["collectors_1_to_2"] = {
            "throughput_ratio": f2["summaries_per_s"] / f1["summaries_per_s"],
            "cpu_per_summary_ratio": f2["collector_cpu_s_per_million"] / f1["collector_cpu_s_per_million"]}
    if "drain_1" in best and "drain_2" in best:
        d1, d2 = best["drain_1"], best["drain_2"]
        out["aggregators_1_to_2"] = {
            "throughput_ratio": d2["summaries_per_s"] / d1["summaries_per_s"],
            "cpu_per_summary_ratio": d2["aggregator_cpu_s_per_million"] / d1["aggregator_cpu_s_per_million"]}
    f1, d1 = best.get("fill_1"), best.get("drain_1")
    if f1 and d1:
        redis = f1["redis_cpu_s_per_million"] + d1["redis_cpu_s_per_million"]
        out["ceilings_per_core"] = {  # extrapolated: a process (a Redis shard) with one core to itself
            "collector_summaries_per_s": 1e6 / f1["collector_cpu_s_per_million"],
            "aggregator_summaries_per_s": 1e6 / d1["aggregator_cpu_s_per_million"],
            "redis_shard_summaries_per_s": 1e6 / redis,
            "redis_cpu_s_per_million_end_to_end": redis,
            "measured_collector_summaries_per_s": f1["summaries_per_s"],
            "measured_aggregator_summaries_per_s": d1["summaries_per_s"]}
    return out


def print_report(result: dict) -> None:
    o, m, s = result["options"], result["machine"], result["summary"]
    print(f"\nscale: {o['runs']} runs x {o['ranks']} ranks x {o['tensors']} tensors, "
          f"{result['bytes_per_summary']:.0f} B per summary; 3-master Redis Cluster (redis-server {result['redis']}, "
          f"AOF {'everysec' if o['aof'] else 'off'}); fill {o['fill_steps']} steps, best of {o['repeat']}")
    print(f"machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, GPU {m['gpu']}; load {result['load']} "
          f"(loadavg {result['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at end)")
    print(f"NOTE: {m['cores']} cores are shared by the load generator, the collectors, the aggregators and three "
          "redis-servers: throughput is a lower bound and a 1->2 throughput ratio is bounded by the cores; the CPU-s "
          "per million (and its 1->2 ratio) is what carries over.")
    print(f"\n{'phase':<6} {'procs':>5} {'summaries/s':>12} {'per process':>16} {'busy cores':>10} "
          f"{'CPU-s/M':>7} {'redis CPU-s/M':>13} {'loadgen CPU-s/M':>15} {'ours/others':>11} {'Redis B':>15}")
    print("(fill: the collectors, aggregators paused, Redis B per summary in the streams; drain: the aggregators, "
          "Redis B per run-step in the history; ours/others: cores busy with this benchmark / with other tenants)")
    for key, what in (("fill", "collector"), ("drain", "aggregator")):
        for n in (1, 2):
            b = s["best"].get(f"{key}_{n}")
            if b is None:
                continue
            mem = (f"{b['redis_stream_bytes_per_summary']:.0f}/summary" if key == "fill"
                   else f"{b['redis_keys']['history_bytes_per_run_step']:,.0f}/run-step")
            loadgen = format(b["loadgen_cpu_s_per_million"], ".2f") if key == "fill" else "-"
            print(f"{key:<6} {n:>5} {b['summaries_per_s']:>12,.0f} "
                  f"{' '.join(f'{x:,.0f}' for x in b[f'per_{what}_summaries_per_s']):>16} "
                  f"{' '.join(f'{x:.2f}' for x in b[f'{what}_cores_busy']):>10} {b[f'{what}_cpu_s_per_million']:>7.2f} "
                  f"{b['redis_cpu_s_per_million']:>13.2f} {loadgen:>15} "
                  f"{b['machine_cores_busy']:>5.2f}/{b['other_cores_busy']:<5.2f} {mem:>15}")
    for key, what in (("fill", "collector"), ("drain", "aggregator")):
        for n in (1, 2):
            b = s["best"].get(f"{key}_{n}")
            if b is not None and b.get(f"{what}_peak_rss_mb"):
                print(f"peak RSS, {n} {what} process(es) through a fill and a drain of the backlog: "
                      f"{' '.join(f'{x:,.0f}' for x in b[f'{what}_peak_rss_mb'])} MiB")
    for label, key in (("collectors", "collectors_1_to_2"), ("aggregators", "aggregators_1_to_2")):
        if key in s:
            print(f"1 -> 2 {label}: throughput x{s[key]['throughput_ratio']:.2f} (bounded by {m['cores']} cores), "
                  f"CPU per summary x{s[key]['cpu_per_summary_ratio']:.2f} (1.00: scaling out costs nothing extra)")
    d = s["best"].get("drain_1")
    if d:
        k = d["redis_keys"]
        print(f"Redis after the drain: history {k['history_bytes_per_run_step']:,.0f} B per run-step (grows with the "
              f"run); live-view frames {k['bytes_per_frame']:,.0f} B each, at most 256 per run; all of it "
              f"{d['redis_bytes_per_run_step']:,.0f} B per run-step of this short run (used_memory)")
    if "ceilings_per_core" in s:
        c = s["ceilings_per_core"]
        print(f"per-process ceilings with one core each (extrapolated from CPU-s per million): collector "
              f"{c['collector_summaries_per_s']:,.0f}/s, aggregator {c['aggregator_summaries_per_s']:,.0f}/s, "
              f"Redis shard {c['redis_shard_summaries_per_s']:,.0f}/s (write + read + ack + history)")
    p = result.get("paced")
    if p:
        ls, ld = p["lag_served_s"], p["lag_durable_s"]
        print(f"\npaced: {p['offered_summaries_per_s']:,.0f} summaries/s offered "
              f"({p['steps_per_s']:g} steps/s a rank), "
              f"{p['collectors']} collectors, {p['aggregators']} aggregators, {p['window_s']:.0f} s")
        print(f"  lag capture -> served step (API): p50 {1e3 * ls['p50']:.0f} ms, p99 {1e3 * ls['p99']:.0f} ms, "
              f"max {1e3 * ls['max']:.0f} ms over {ls['steps']} steps ({ls['never_seen']} never seen); "
              f"-> joined step in Redis history: p50 {1e3 * ld['p50']:.0f} ms, p99 {1e3 * ld['p99']:.0f} ms "
              f"(poll every {p['poll_ms']} ms; sender lateness p99 {1e3 * p['sender_lateness_p99_s']:.0f} ms)")
        cpu = p["cpu_s_per_million"]
        print(f"  CPU-s per million: collector {cpu['collector']:.2f}, aggregator {cpu['aggregator']:.2f}, redis "
              f"{cpu['redis']:.2f}, load generator {cpu['loadgen']:.2f}; cores used: "
              + ", ".join(f"{k} {v:.2f}" for k, v in p["cores_used"].items())
              + f"; Redis history {p['redis_keys']['history_bytes_per_run_step']:,.0f} B per run-step")
    bad = [r for r in result["rounds"] if not r["every_report_applied_once"]]
    print(f"\nevery report applied once, nothing left pending, in every round: {'yes' if not bad else 'NO'}")
    logged = [x for r in result["rounds"] + [p or {}] for x in r.get("process_log_problems", [])]
    found = f"{sum(x['lines'] for x in logged)} lines, the first: {logged[0]['first'][0][24:]!r}" if logged else "none"
    print(f"warnings or errors in the collector and aggregator logs (in the JSON): {found}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Rerun on a quiet machine: python benchmarks/scale.py --load quiet --json "
                                        "benchmarks/results-scale-<cores>core-<date>.json")
    ap.add_argument("--quick", action="store_true", help="a smoke run, its figures too short to quote: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--runs", type=int, help=f"runs, shared out over the aggregators (even; default {DEFAULT['runs']})")
    ap.add_argument("--ranks", type=int, help=f"ranks per run (default {DEFAULT['ranks']})")
    ap.add_argument("--tensors", type=int, help=f"tensor summaries per report (default {DEFAULT['tensors']})")
    ap.add_argument("--fill-steps", type=int, help=f"steps per rank in each saturation fill (default "
                                                   f"{DEFAULT['fill_steps']})")
    ap.add_argument("--steps-per-s", type=float, help=f"paced phase: steps per second per rank (default "
                                                      f"{DEFAULT['steps_per_s']:g})")
    ap.add_argument("--paced-s", type=float, help=f"paced phase length in seconds (default {DEFAULT['paced_s']:g}; "
                                                  "0 skips it)")
    ap.add_argument("--repeat", type=int, help=f"saturation rounds per configuration (default {DEFAULT['repeat']})")
    ap.add_argument("--senders", type=int, default=2, help="load generator processes (default 2)")
    ap.add_argument("--poll-ms", type=int, default=50, help="paced phase: visibility poll interval (default 50)")
    ap.add_argument("--drain-timeout-s", type=float, default=300.0, help="give up on a drain after this long")
    ap.add_argument("--aof", action=argparse.BooleanOptionalAction, default=True,
                    help="Redis AOF everysec, as deploy/ runs it (default on)")
    ap.add_argument("--redis-server", help="redis-server >= 7 to run (default: GRADWATCH_REDIS_SERVER, the PATH)")
    ap.add_argument("--load", default="unspecified", help="what else ran on the machine, recorded in the JSON: "
                                                          "quiet, shared, ... (default unspecified)")
    ap.add_argument("--json", type=Path, help="write the results there")
    opts = ap.parse_args()
    for key, value in (QUICK if opts.quick else DEFAULT).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.runs < 2 or opts.runs % 2 or opts.ranks < 1 or opts.tensors < 2 or opts.fill_steps < 1 \
            or opts.repeat < 1 or opts.senders < 1 or opts.steps_per_s <= 0 or opts.paced_s < 0:
        ap.error("--runs must be even and >= 2 (two aggregators share them); the other sizes positive")
    binary, version = redis_7(opts.redis_server)

    sys.path.insert(0, str(REPO))  # the cluster helper of the cluster scenarios is the one way to start one
    import redis.cluster

    from tests.scenarios.cluster.local_cluster import LocalCluster, find_redis_cli

    try:
        find_redis_cli(binary)
    except Exception as err:  # noqa: BLE001 - RedisServerError: say what to install
        raise SystemExit(f"scale.py needs redis-cli beside {binary} or on the PATH: {err}") from None

    interrupted = threading.Event()

    def on_signal(*_):
        interrupted.set()
        raise KeyboardInterrupt

    # Ctrl-C reaches the whole process group: Redis may be gone before the KeyboardInterrupt surfaces here (redis-py
    # can turn it into a connection error), so whatever fails after a signal is reported as the interruption.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    loadavg_start = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gw-scale-") as tmp:
        cluster = None
        try:
            extra = ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)] + (["--appendonly", "yes"] if opts.aof else [])
            cluster = LocalCluster(Path(tmp), binary=binary, extra_args=extra).start(timeout=30)
            client = redis.cluster.RedisCluster.from_url(cluster.url)
            runs = runs_over_nodes(cluster, opts.runs)
            templates, registrations, per_summary = encode_load(runs, opts.ranks, opts.tensors)
            (Path(tmp) / "logs").mkdir()
            ctx = {"cluster": cluster, "client": client, "runs": runs, "opts": opts, "templates": templates,
                   "registrations": registrations, "logs": Path(tmp) / "logs",
                   "senders": min(opts.senders, opts.runs)}
            rounds = []
            for i in range(opts.repeat):
                for n in (1, 2):
                    print(f"saturation round {i + 1}/{opts.repeat}: {n} collector(s), {n} aggregator(s) ...",
                          flush=True)
                    rounds.append(saturation_round(ctx, n, n))
            paced = None
            if opts.paced_s > 0:
                print(f"paced: {opts.paced_s:g} s at {opts.steps_per_s:g} steps/s per rank ...", flush=True)
                paced = paced_round(ctx, 2, 2)
            client.close()
        except BaseException as err:
            if not (interrupted.is_set() or isinstance(err, KeyboardInterrupt)):
                raise
            print("interrupted: stopping every process", file=sys.stderr)
            return 130
        finally:
            cleanup()
            if cluster is not None:
                cluster.stop()
    result = {
        "benchmark": "benchmarks/scale.py", "date": time.strftime("%Y-%m-%d", time.localtime(started)),
        "load": opts.load, "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
        "machine": machine(), "redis": version, "duration_s": time.time() - started,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "bytes_per_summary": per_summary, "rounds": rounds, "paced": paced,
        "summary": summarize(rounds, paced),
        "notes": [f"{os.cpu_count()} cores shared by the load generator, collectors, aggregators and 3 redis-servers: "
                  "throughput figures are lower bounds, 1->2 throughput ratios are bounded by the cores; CPU-s per "
                  "million and its 1->2 ratio carry over",
                  "ceilings_per_core are extrapolated: 1e6 / CPU-s per million, a process with one core to itself",
                  "paced lags exclude the agent's export interval (0.5 s by default) and are resolved to the poll "
                  "interval"],
    }
    print_report(result)
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {opts.json}")
    return 0 if all(r["every_report_applied_once"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
