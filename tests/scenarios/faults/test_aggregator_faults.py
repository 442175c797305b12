"""Faults under load with real processes: two `python -m gradwatch.aggregator` replicas, one killed with
SIGKILL mid-load, Redis restarted under them, and duplicated stream entries (an agent's retry).

What must hold (docs/architecture.md#performance-targets: aggregator killed, 0 lost, 0 double-counted): every distinct
report is applied exactly once, which the fenced commits record in each run's `applied` hash (totals
and per-rank sequence watermarks), and nothing stays pending in the consumer group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.ingest.leases import applied_key, lease_key
from gradwatch.cli.processes import stop_process, wait_until
from gradwatch.cli.redis_server import RedisServer, free_port
from gradwatch.streams import (
    AGGREGATOR_GROUP,
    FIELD_REGISTRATION,
    FIELD_REPORT,
    RUNS_KEY,
    registrations_key,
    reports_key,
)

RUNS = [f"fault-agg-{i}" for i in range(4)]
RANKS = 2
TENSORS = 12  # Build.report: four layers x (parameter, gradient, activation)


class Replica:
    def __init__(self, name: str, redis_url: str, log_path: Path):
        self.name, self.log_path = name, log_path
        env = {**os.environ, "GRADWATCH_AGGREGATOR_LEASE_TTL_MS": "1500", "GRADWATCH_AGGREGATOR_DISCOVER_INTERVAL_S":
               "0.2", "GRADWATCH_AGGREGATOR_CLAIM_INTERVAL_S": "0.5", "GRADWATCH_AGGREGATOR_CLAIM_IDLE_MS": "3000"}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gradwatch.aggregator", "--redis-url", redis_url, "--consumer", name,
                 "--metrics-listen", f"127.0.0.1:{free_port()}", "--log-level", "INFO"],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc)


class Writer(threading.Thread):
    """Writes reports for every (run, rank) as the collector does, at a steady rate, retrying through a Redis
    outage; every 7th step one report of 5 steps before is written again (an agent that retried an export the
    collector had stored)."""

    def __init__(self, url: str, build):
        super().__init__(daemon=True, name="writer")
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
        self.build = build
        self.stop_event = threading.Event()
        self.steps = 0
        self.duplicates = 0
        self.retries = 0

    def xadd(self, run: str, fields: dict) -> None:
        while True:
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.xadd(reports_key(run), fields)
                pipe.zadd(RUNS_KEY, {run: time.time()})
                pipe.execute()
                return
            except redis.RedisError:  # Redis restarting: the collector would answer UNAVAILABLE, the agent retry
                self.retries += 1
                time.sleep(0.1)

    def run(self) -> None:
        for run in RUNS:
            for rank in range(RANKS):
                reg = self.build.registration(run=run, rank=rank)
                reg.world_size = RANKS
                self.client.hset(registrations_key(run), str(rank), reg.SerializeToString())
                self.xadd(run, {FIELD_REGISTRATION: reg.SerializeToString()})
        while not self.stop_event.is_set():
            step = self.steps
            for run in RUNS:
                for rank in range(RANKS):
                    self.xadd(run, {FIELD_REPORT: self.build.report(step, run=run, rank=rank).SerializeToString()})
                    if step % 7 == 3 and step >= 5:  # a retry arrives late, maybe after a takeover
                        late = self.build.report(step - 5, run=run, rank=rank).SerializeToString()
                        self.xadd(run, {FIELD_REPORT: late})
                        self.duplicates += 1
            self.steps += 1
            time.sleep(0.01)


def applied(client: redis.Redis, run: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(applied_key(run)).items()}


def pending(client: redis.Redis, run: str) -> int:
    return client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"]


@pytest.mark.e2e
def test_replica_sigkill_and_redis_restart_lose_nothing_and_count_nothing_twice(tmp_path, build):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    client = redis.Redis.from_url(server.url)
    writer = Writer(server.url, build)
    a = Replica("replica-a", server.url, tmp_path / "a.log")
    b = Replica("replica-b", server.url, tmp_path / "b.log")
    try:
        writer.start()
        # both replicas hold runs and have applied some before the kill
        wait_until(lambda: {client.get(lease_key(r)) for r in RUNS} == {b"replica-a", b"replica-b"}, 20,
                   "both replicas holding leases")
        wait_until(lambda: all(applied(client, r).get("reports", 0) > 20 for r in RUNS), 20, "reports applied")
        a.kill()
        killed_at_step = writer.steps
        # b takes a's runs over after the lease TTL, claims a's pending entries and goes on
        wait_until(lambda: all(client.get(lease_key(r)) == b"replica-b" for r in RUNS), 15, "b holding every run")
        wait_until(lambda: writer.steps > killed_at_step + 50, 15, "writes after the kill")

        server.stop()  # SIGTERM: the AOF is flushed; writer and replica retry until it is back
        time.sleep(1.0)
        server.start()
        restarted_at_step = writer.steps
        wait_until(lambda: writer.steps > restarted_at_step + 50, 20, "writes after the Redis restart")
        a = Replica("replica-a", server.url, tmp_path / "a2.log")  # the killed replica comes back
        time.sleep(1.0)
        writer.stop_event.set()
        writer.join(10)

        expected = writer.steps * RANKS  # distinct reports per run

        def done() -> bool:
            return all(applied(client, r).get("reports") == expected and pending(client, r) == 0 for r in RUNS)

        try:
            wait_until(done, 60, "every report applied")
        except TimeoutError:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp_path.glob("*.log")))
            raise AssertionError(f"expected {expected} per run (writer alive: {writer.is_alive()}), applied "
                                 f"{[applied(client, r) for r in RUNS]}, pending {[pending(client, r) for r in RUNS]}, "
                                 f"leases {[client.get(lease_key(r)) for r in RUNS]}\n{logs}") from None
        for run in RUNS:
            record = applied(client, run)
            assert record["reports"] == expected, run                # none lost, none counted twice
            assert record["summaries"] == expected * TENSORS, run
            for rank in range(RANKS):
                assert record[f"high:{rank}"] == writer.steps, run  # sequence = step + 1: the last one
        # the run's history in Redis has every step once, whichever replica joined it (aggregator/history.py)
        history = HistoryStore(client)
        for run in RUNS:
            wait_until(lambda run=run: history.count(run) == writer.steps, 15, f"the history of {run}")
            assert [row[0] for row in history.rows(run, limit=writer.steps)] == list(range(writer.steps)), run
        assert writer.duplicates > 0 and writer.retries > 0 and killed_at_step > 0
        # the restarted replica got its share back
        wait_until(lambda: b"replica-a" in {client.get(lease_key(r)) for r in RUNS}, 15, "a holding runs again")
    finally:
        writer.stop_event.set()
        for replica in (a, b):
            replica.stop()
        server.stop()
