"""The whole server side on a real three-master Redis Cluster: a collector and two `python -m gradwatch.aggregator`
replicas, every run's keys on the node of its slot, runs spread over all three nodes.

What must hold as on one Redis: every report applied exactly once (the fenced commits' `applied` hash), nothing
pending and the streams trimmed to what was applied, every step in the run's history, a NaN's alert in the
gradwatch:alerts stream, and the API, /metrics and snapshot requests answering for every run. The replicas choose
cluster mode the two documented ways (the flag, the shared variable). Half-way every node forgets its Lua scripts
(what a restart or failover does): the commits load them again and lose nothing. Then the two mechanisms on their
own: reads split by slot (aggregator/ingest/read.py) and a script missing on one node (ingest/client.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import RedisCluster
from redis.crc import key_slot

from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.ingest.client import eval_many
from gradwatch.aggregator.ingest.leases import applied_key, lease_key
from gradwatch.aggregator.ingest.read import IDLE_POLL_MS, read_new
from gradwatch.cli.processes import stop_process, wait_until
from gradwatch.cli.redis_server import free_port
from gradwatch.streams import AGGREGATOR_GROUP, ALERTS_KEY, FIELD_ALERT, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub

pytestmark = pytest.mark.e2e

RUNS_PER_NODE = 2
STEPS = 40
TENSORS = 12  # Build.report: four layers x (parameter, gradient, activation)
NAN_STEP = 25  # in the second half: after the scripts were flushed


class Replica:
    """`python -m gradwatch.aggregator` on the cluster, with fast discovery; `flag`: --redis-cluster, else the
    shared GRADWATCH_REDIS_CLUSTER variable says it."""

    def __init__(self, name: str, url: str, log_path: Path, flag: bool):
        self.name, self.log_path = name, log_path
        self.http = f"127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
        env.update(GRADWATCH_AGGREGATOR_DISCOVER_INTERVAL_S="0.2", GRADWATCH_AGGREGATOR_CLAIM_INTERVAL_S="0.5")
        if not flag:
            env["GRADWATCH_REDIS_CLUSTER"] = "1"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gradwatch.aggregator", "--redis-url", url, "--consumer", name,
                 "--metrics-listen", self.http, "--log-level", "INFO", *(["--redis-cluster"] if flag else [])],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.http}{path}", timeout=5) as response:
            return response.read().decode()

    def api(self, path: str):
        return json.loads(self.get(path))["data"]

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://{self.http}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202
            return json.loads(response.read())["data"]

    def samples(self, name: str) -> dict[tuple, float]:
        """{sorted label items: value} of one metric's samples on /metrics."""
        return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(self.get(
            "/metrics")) for s in family.samples if s.name == name}

    def up(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return self.get("/healthz") is not None
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)


def runs_on_every_node(cluster, per_node: int) -> list[str]:
    """Run ids whose keys land `per_node` on each node of the cluster."""
    chosen: dict[int, list[str]] = {node.port: [] for node in cluster.nodes}
    for i in range(1000):
        run = f"cluster-run-{i}"
        on = chosen[cluster.owner(cluster.keyslot(reports_key(run))).port]
        if len(on) < per_node:
            on.append(run)
        if all(len(runs) == per_node for runs in chosen.values()):
            return sorted(run for runs in chosen.values() for run in runs)
    raise AssertionError("no run ids for every node")


def test_collector_and_aggregators_on_a_cluster_apply_every_report_once(redis_cluster, start_collector, build,
                                                                        tmp_path):
    runs = runs_on_every_node(redis_cluster, RUNS_PER_NODE)
    nan_run = runs[0]
    collector = start_collector(redis_url=redis_cluster.url, redis_cluster=True)
    replicas = [Replica("replica-a", redis_cluster.url, tmp_path / "a.log", flag=True),
                Replica("replica-b", redis_cluster.url, tmp_path / "b.log", flag=False)]
    client = RedisCluster.from_url(redis_cluster.url)
    channel = grpc.insecure_channel(collector.target)
    stub = IngestServiceStub(channel)

    def export(steps: range) -> ExportRequest:
        # Every call carries reports of every run: one collector pipeline over the three nodes.
        reports = [build.report(step, run=run, nonfinite={("fc1", "gradient"): 3} if (run, step) == (
            nan_run, NAN_STEP) else None) for step in steps for run in runs]
        response = stub.Export(ExportRequest(reports=reports), timeout=10)
        assert not response.HasField("partial_success"), response
        return response

    def settled(reports: int) -> bool:
        return all(int(client.hget(applied_key(run), "reports") or 0) == reports
                   and client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"] == 0 for run in runs)

    try:
        wait_until(lambda: all(r.up() for r in replicas), 30, "both replicas serving")
        stub.Export(ExportRequest(registrations=[build.registration(run=run) for run in runs]), timeout=10)
        # Each replica takes its fair share of the runs before any report: no run moves mid-test.
        owners = lambda: [client.get(lease_key(run)) for run in runs]  # noqa: E731
        shared = [b"replica-a"] * 3 + [b"replica-b"] * 3
        wait_until(lambda: sorted(owners(), key=str) == shared, 20, "leases shared 3/3")
        holder = {run: replicas[owner == b"replica-b"] for run, owner in zip(runs, owners(), strict=True)}

        for first in range(0, STEPS // 2, 5):
            export(range(first, first + 5))
        export(range(0, 5))  # an agent's retry: the same reports again, applied once
        wait_until(lambda: settled(STEPS // 2), 20, "the first half applied")

        for node in redis_cluster.nodes:  # a restarted or failed-over node knows no script
            with redis_cluster.client(node) as node_client:
                node_client.script_flush()
        snapshot = holder[nan_run].post(f"/api/v1/runs/{nan_run}/snapshots", {"kind": "weight_heatmap",
                                                                               "tensor": "fc1"})
        popped = export(range(STEPS // 2, STEPS // 2 + 5))
        assert [r.id for r in popped.snapshot_requests] == [snapshot["id"]]  # the collector popped it for the agent
        for first in range(STEPS // 2 + 5, STEPS, 5):
            export(range(first, first + 5))
        wait_until(lambda: settled(STEPS), 20, "every report applied")

        for run in runs:
            applied = {k.decode(): int(v) for k, v in client.hgetall(applied_key(run)).items()}
            assert (applied["reports"], applied["summaries"], applied["high:0"]) == (STEPS, STEPS * TENSORS, STEPS)
            # Every entry acked once: the registration, the reports and the retried ones; none lost.
            assert (applied["acked"], applied.get("lost", 0)) == (1 + STEPS + 5, 0)
            assert client.xlen(reports_key(run)) == 0  # trimmed to what was applied, by the commit script
            history = HistoryStore(client)
            assert history.count(run) == STEPS
            assert [row[0] for row in history.rows(run, limit=STEPS)] == list(range(STEPS))

        alerts = [json.loads(fields[FIELD_ALERT]) for _, fields in client.xrange(ALERTS_KEY)]
        nan_alerts = [(a["run"], a["step"], a["layer"], a["status"]) for a in alerts if a["rule"] == "NonFinite"]
        assert nan_alerts == [(nan_run, NAN_STEP, "fc1", "firing")]
        assert not [a for a in alerts if a["rule"] == "StreamDataLost"]  # the retention count found no loss
        run_alerts = holder[nan_run].api(f"/api/v1/runs/{nan_run}/alerts")["alerts"]
        assert any(a["rule"] == "NonFinite" and a["step"] == NAN_STEP for a in run_alerts)  # read back from Redis

        served = {}
        for replica in replicas:
            listed = replica.api("/api/v1/runs")["runs"]
            served.update({r["run"]: r["step"] for r in listed})
            assert {r["run"] for r in listed} == {run for run in runs if holder[run] is replica}
            steps = replica.samples("gradwatch_run_step")
            assert {dict(labels)["run"]: v for labels, v in steps.items()} == {
                run: STEPS - 1 for run in runs if holder[run] is replica}
            assert replica.samples("gradwatch_aggregator_redis_errors_total") == {(): 0}
        assert served == dict.fromkeys(runs, STEPS - 1)
        firing = holder[nan_run].samples("gradwatch_alert_firing")
        assert firing[(("layer", "fc1"), ("rule", "NonFinite"), ("run", nan_run))] == 1
    finally:
        channel.close()
        for replica in replicas:
            replica.stop()
        client.close()
    for replica in replicas:
        log = replica.log_path.read_text()
        assert "Traceback" not in log and "CROSSSLOT" not in log, log[-3000:]


def test_reads_are_split_by_slot_and_an_idle_pass_polls(redis_cluster):
    runs = runs_on_every_node(redis_cluster, 1)
    slot = key_slot(reports_key(runs[0]).encode())
    mate = next(run for run in (f"mate-{i}" for i in range(1_000_000)) if key_slot(reports_key(run).encode()) == slot)
    keys = [reports_key(run) for run in [*runs, mate]]  # three slots on three nodes, two streams in one of them
    client = RedisCluster.from_url(redis_cluster.url)
    waits: list[float] = []
    try:
        for key in keys:
            client.xgroup_create(key, AGGREGATOR_GROUP, id="0", mkstream=True)
            client.xadd(key, {"r": key.encode()})
        read = read_new(client, "c", keys, count=10, block_ms=200, wait=waits.append)
        assert sorted((key.decode(), [f[b"r"] for _, f in entries]) for key, entries in read) == sorted(
            (key, [key.encode()]) for key in keys)
        assert waits == []
        assert read_new(client, "c", keys, count=10, block_ms=200, wait=waits.append) == []
        assert waits == [IDLE_POLL_MS / 1000]  # an empty pass over several slots cannot block: it polls
        client.xadd(keys[0], {"r": b"again"})
        single = read_new(client, "c", [keys[0], keys[-1]], count=10, block_ms=200, wait=waits.append)  # one slot
        assert [(key.decode(), len(entries)) for key, entries in single] == [(keys[0], 1)]
        assert len(waits) == 1
    finally:
        client.close()


def test_a_script_missing_on_one_node_is_loaded_and_only_its_calls_run_again(redis_cluster):
    runs = runs_on_every_node(redis_cluster, 1)
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        calls = [([f"gradwatch:{{{run}}}:n"], []) for run in runs]
        assert eval_many(client, script, calls) == [1, 1, 1]  # loaded on every primary
        with redis_cluster.client(redis_cluster.nodes[-1]) as node:
            node.script_flush()  # one node restarted: NOSCRIPT there, the others run
        assert eval_many(client, script, calls) == [2, 2, 2]
    finally:
        client.close()
