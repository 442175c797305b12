"""Exactly once when both sides scale out: two collector processes and two aggregator replica processes on a real
three-master Redis Cluster.

Three runs of four ranks (one run on each node) send 60 steps each, every rank as its own agent thread, its Export
calls going to the two collectors in turn. Some calls are sent a second time to the other collector, as an agent
sends again a batch whose answer it never got (behind a balancer the retry may land elsewhere): while the
original is still in flight through the aggregator, and once more after everything was applied and the stream
trimmed. Every report must be applied exactly once: the run's `applied` hash (aggregator/ingest/leases.py) counts
each distinct report once, holds each rank's last sequence number and acknowledges every entry added; nothing is
pending; the history has every step once; each repeat is counted as a duplicate.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import RedisCluster

from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.ingest.leases import applied_key, lease_key
from gradwatch.cli.processes import stop_process, wait_until
from gradwatch.cli.redis_server import free_port
from gradwatch.streams import AGGREGATOR_GROUP, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from tests.fixtures.aggregator import T0

pytestmark = pytest.mark.e2e

WORLD = 4
STEPS = 60
BATCH = 5  # steps per Export call: what an agent gathers between two exports
TENSORS = 12  # Build.report: four layers x (parameter, gradient, activation)
RETRY_EVERY = 3  # a rank sends every third batch twice


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update(extra)
    return env


class Process:
    """`python -m gradwatch.<component>` on the cluster, its output in a log file; `http`: its /metrics address."""

    def __init__(self, component: str, args: list[str], log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self.http = f"127.0.0.1:{free_port()}"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", f"gradwatch.{component}", *args, "--metrics-listen",
                                          self.http, "--redis-cluster", "--log-level", "INFO"],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)

    def serving(self, port: int | None = None) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        host, http_port = self.http.rsplit(":", 1)
        try:
            socket.create_connection((host, port or int(http_port)), timeout=0.2).close()
            return True
        except OSError:
            return False

    def counter(self, name: str) -> float:
        """A counter's samples on /metrics, summed over their labels."""
        with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name)

    def stop(self) -> None:
        stop_process(self.proc)


def one_run_per_node(cluster) -> list[str]:
    runs: dict[int, str] = {}
    for i in range(1000):
        run = f"scale-once-{i}"
        runs.setdefault(cluster.owner(cluster.keyslot(reports_key(run))).port, run)
        if len(runs) == len(cluster.nodes):
            return sorted(runs.values())
    raise AssertionError("no run ids for every node")


def test_two_collectors_and_two_aggregators_apply_every_report_exactly_once(redis_cluster, build, tmp_path):
    runs = one_run_per_node(redis_cluster)
    url = redis_cluster.url
    ports = [free_port(), free_port()]
    collectors = [Process("collector", ["--listen", f"127.0.0.1:{port}", "--redis-url", url],
                          tmp_path / f"collector-{i}.log", _env()) for i, port in enumerate(ports)]
    fast = _env(GRADWATCH_AGGREGATOR_DISCOVER_INTERVAL_S="0.2", GRADWATCH_AGGREGATOR_CLAIM_INTERVAL_S="0.5")
    names = ("replica-a", "replica-b")
    replicas = [Process("aggregator", ["--redis-url", url, "--consumer", name], tmp_path / f"{name}.log", fast)
                for name in names]
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in ports]
    stubs = [IngestServiceStub(channel) for channel in channels]
    client = RedisCluster.from_url(url)
    entries = dict.fromkeys(runs, 0)  # stream entries each run's agents had the collectors add
    repeats = 0
    lock = threading.Lock()

    def export(collector: int, request: ExportRequest) -> None:
        response = stubs[collector].Export(request, timeout=10)
        assert not response.HasField("partial_success"), response
        with lock:
            run = (request.registrations or request.reports)[0].run_id
            entries[run] += len(request.registrations) + len(request.reports)

    def batch(run: str, rank: int, first: int) -> ExportRequest:
        return ExportRequest(reports=[build.report(step, run=run, rank=rank, loss=0.5 + rank / 100)
                                      for step in range(first, first + BATCH)])

    def agent(run: str, rank: int, errors: list) -> None:
        nonlocal repeats
        try:
            for b, first in enumerate(range(0, STEPS, BATCH)):
                request = batch(run, rank, first)
                export((rank + b) % 2, request)
                if (rank + b) % RETRY_EVERY == 0:  # the answer was lost: the same batch again, to the other collector
                    export((rank + b + 1) % 2, request)
                    with lock:
                        repeats += BATCH
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    def registration(run: str, rank: int) -> ExportRequest:
        reg = build.registration(run=run, rank=rank, start_s=T0 + rank)
        reg.world_size = WORLD
        return ExportRequest(registrations=[reg])

    def settled(reports: int) -> bool:  # at least: a report applied twice fails the exact checks below
        return all(int(client.hget(applied_key(run), "reports") or 0) >= reports
                   and client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"] == 0 for run in runs)

    try:
        wait_until(lambda: all(c.serving(port) for c, port in zip(collectors, ports, strict=True))
                   and all(r.serving() for r in replicas), 30, "collectors and replicas serving")
        for run in runs:
            for rank in range(WORLD):
                export(rank % 2, registration(run, rank))
        export(1, registration(runs[0], 0))  # a registration sent again: the answer to its first Export was lost
        # Fair shares (2 and 1) before any report: no run changes hands mid-test, and both replicas apply some.
        def shares() -> list[int]:
            owners = [client.get(lease_key(run)) for run in runs]
            return sorted(owners.count(name.encode()) for name in names)

        wait_until(lambda: shares() == [1, 2], 20, "leases shared 2/1")

        errors: list[BaseException] = []
        agents = [threading.Thread(target=agent, args=(run, rank, errors), name=f"test-agent-{run}-{rank}")
                  for run in runs for rank in range(WORLD)]
        for t in agents:
            t.start()
        for t in agents:
            t.join(60)
        assert not errors, errors
        wait_until(lambda: settled(WORLD * STEPS), 30, "every report applied")

        for run in runs:  # long after: applied, acknowledged and trimmed, the batch comes back once more
            export(0, batch(run, 1, 0))
        repeats += len(runs) * BATCH
        wait_until(lambda: all(int(client.hget(applied_key(run), "acked") or 0) == entries[run] for run in runs), 20,
                   "the late repeats acknowledged")

        for run in runs:
            applied = {k.decode(): int(v) for k, v in client.hgetall(applied_key(run)).items()}
            assert (applied["reports"], applied["summaries"]) == (WORLD * STEPS, WORLD * STEPS * TENSORS), run
            for rank in range(WORLD):
                assert applied[f"high:{rank}"] == STEPS, (run, rank)  # sequence numbers 1..STEPS
                assert applied[f"start:{rank}"] == int((T0 + rank) * 1e9), (run, rank)
            assert (applied["acked"], applied.get("lost", 0)) == (entries[run], 0)  # every entry added, acked once
            assert client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"] == 0
            assert client.xlen(reports_key(run)) == 0  # trimmed to what was applied
            history = HistoryStore(client)
            assert history.count(run) == STEPS
            assert [row[0] for row in history.rows(run, limit=2 * STEPS)] == list(range(STEPS))

        def total(processes: list[Process], name: str) -> float:
            return sum(p.counter(name) for p in processes)

        assert total(replicas, "gradwatch_aggregator_reports_total") == len(runs) * WORLD * STEPS
        assert total(replicas, "gradwatch_aggregator_duplicates_total") == repeats
        assert total(replicas, "gradwatch_aggregator_steps_joined_total") == len(runs) * STEPS
        assert total(replicas, "gradwatch_aggregator_steps_incomplete_total") == 0
        assert total(replicas, "gradwatch_aggregator_late_reports_total") == 0
        assert total(replicas, "gradwatch_aggregator_lease_lost_total") == 0
        assert all(r.counter("gradwatch_aggregator_reports_total") > 0 for r in replicas)
        sent = len(runs) * WORLD * STEPS + repeats
        assert total(collectors, "gradwatch_collector_reports_total") == sent
        assert all(c.counter("gradwatch_collector_reports_total") > 0 for c in collectors)
    finally:
        for channel in channels:
            channel.close()
        for p in collectors + replicas:  # upstream first
            p.stop()
        client.close()
    for p in collectors + replicas:
        log = p.log_path.read_text()
        assert "Traceback" not in log and "CROSSSLOT" not in log, log[-3000:]
