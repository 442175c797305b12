"""The collector against a real three-node Redis Cluster (local_cluster.py: redis-server processes joined by
redis-cli)."""

from __future__ import annotations

import grpc
import pytest

from gradwatch.cli.redis_server import RedisServer
from gradwatch.collector.server import CollectorStartError
from gradwatch.streams import FIELD_REGISTRATION, FIELD_REPORT, RUNS_KEY, registrations_key, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.report_pb2 import StepReport, TensorSummary
from gradwatch.v1.run_pb2 import RunRegistration, TensorInfo
from tests.scenarios.cluster.local_cluster import LocalCluster, require_cluster_tools


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
    require_cluster_tools()
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
