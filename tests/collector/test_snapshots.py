"""Snapshots through a real collector on 127.0.0.1 and a real Redis: pending requests ride back in the
Export answer (popped once), snapshots are stored latest per (kind, tensor), oversized ones are refused."""

from __future__ import annotations

import grpc
import pytest

from gradwatch.streams import MAX_SNAPSHOT_REQUESTS, snapshot_requests_key, snapshots_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.snapshot_pb2 import Snapshot, SnapshotKind, SnapshotRequest
from tests.collector.test_service import RUN, report

HEATMAP = SnapshotKind.SNAPSHOT_KIND_WEIGHT_HEATMAP


def snapshot(**fields) -> Snapshot:
    base = dict(request_id="req-1", run_id=RUN, step=3, kind=HEATMAP, tensor="fc", shape=[128, 64], maps=1,
                rows=2, cols=2, values=[0.5, 1.0, 1.5, 2.0])
    return Snapshot(**{**base, **fields})


def test_proto_round_trip():
    s = snapshot(labels=["a", "b"], kind=SnapshotKind.SNAPSHOT_KIND_PROJECTION, cols=2)
    request = ExportRequest(reports=[report(0)], snapshots=[s])
    back = ExportRequest.FromString(request.SerializeToString())
    assert back.snapshots[0] == s and list(back.snapshots[0].values) == [0.5, 1.0, 1.5, 2.0]


def test_pending_requests_ride_back_once(collector, stub, redis_client):
    wanted = [SnapshotRequest(id=f"r{i}", run_id=RUN, kind=HEATMAP, tensor="fc") for i in range(3)]
    redis_client.rpush(snapshot_requests_key(RUN), *(r.SerializeToString() for r in wanted))
    redis_client.rpush(snapshot_requests_key("other-run"), wanted[0].SerializeToString())

    first = stub.Export(ExportRequest(reports=[report(0)]), timeout=5)
    again = stub.Export(ExportRequest(reports=[report(1)]), timeout=5)

    assert list(first.snapshot_requests) == wanted
    assert list(again.snapshot_requests) == []
    assert redis_client.llen(snapshot_requests_key("other-run")) == 1  # only the request's own runs


def test_at_most_a_bounded_number_of_requests_per_answer(collector, stub, redis_client):
    many = [SnapshotRequest(id=f"r{i}", run_id=RUN, kind=HEATMAP, tensor="fc").SerializeToString()
            for i in range(MAX_SNAPSHOT_REQUESTS + 4)]
    redis_client.rpush(snapshot_requests_key(RUN), *many)
    response = stub.Export(ExportRequest(reports=[report(0)]), timeout=5)
    assert len(response.snapshot_requests) == MAX_SNAPSHOT_REQUESTS
    assert redis_client.llen(snapshot_requests_key(RUN)) == 4


def test_snapshot_is_stored_latest_per_kind_and_tensor(collector, stub, redis_client):
    old, new = snapshot(step=3), snapshot(step=7, request_id="req-2")
    stub.Export(ExportRequest(reports=[report(0)], snapshots=[old]), timeout=5)
    stub.Export(ExportRequest(reports=[report(1)], snapshots=[new]), timeout=5)

    stored = redis_client.hgetall(snapshots_key(RUN))
    assert stored == {f"{HEATMAP}:fc".encode(): new.SerializeToString()}
    assert 0 < redis_client.pttl(snapshots_key(RUN)) <= 3600 * 1000


@pytest.mark.parametrize(("bad", "reason"), [
    (snapshot(rows=65, values=[0.0] * 65 * 2), "outside 1..1 x 1..64 x 1..64"),
    (snapshot(values=[0.0] * 3), "3 values for 1 x 2 x 2"),
    (snapshot(kind=SnapshotKind.SNAPSHOT_KIND_FEATURE_MAPS, maps=17, rows=1, cols=1, values=[0.0] * 17),
     "outside 1..16"),
    (snapshot(kind=SnapshotKind.SNAPSHOT_KIND_PROJECTION, rows=2001, cols=2, values=[0.0] * 4002),
     "outside 1..1 x 1..2000 x 1..2"),
    (snapshot(kind=SnapshotKind.SNAPSHOT_KIND_PROJECTION, labels=["x" * 65, "y"]), "longer than 64 bytes"),
    (snapshot(kind=0), "unknown snapshot kind"),
    (snapshot(request_id="a b"), "request_id 'a b'"),
    (snapshot(run_id="a/b"), "run_id 'a/b'"),
    (snapshot(error="no such module", values=[1.0]), "carries no values"),
])
def test_invalid_snapshot_is_refused_alone_and_counted(collector, stub, redis_client, bad, reason):
    response = stub.Export(ExportRequest(reports=[report(0)], snapshots=[bad, snapshot(tensor="ok")]), timeout=5)
    assert response.partial_success.rejected_snapshots == 1
    assert response.partial_success.rejected_reports == 0
    assert reason in response.partial_success.error_message
    assert list(redis_client.hkeys(snapshots_key(RUN))) == [f"{HEATMAP}:ok".encode()]
    assert collector.metrics.value("gradwatch_collector_refused_total", reason="invalid_snapshot") == 1


def test_an_error_snapshot_is_accepted(collector, stub, redis_client):
    err = snapshot(error="no module named 'nope'", maps=0, rows=0, cols=0, values=[])
    response = stub.Export(ExportRequest(snapshots=[err]), timeout=5)
    assert not response.HasField("partial_success")
    assert redis_client.hgetall(snapshots_key(RUN)) == {f"{HEATMAP}:fc".encode(): err.SerializeToString()}


def test_too_many_snapshots_in_one_request_is_invalid_argument(collector, stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Export(ExportRequest(snapshots=[snapshot(request_id=f"r{i}") for i in range(65)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_permission_to_pop_keeps_reports_flowing(start_collector, redis_client):
    # A collector user from before snapshots: LPOP refused, the reports are still written and acknowledged.
    redis_client.execute_command("ACL", "SETUSER", "old", "on", ">pw", "-@all", "+ping", "+xadd", "+hset", "+zadd",
                                 "~gradwatch:*")
    kwargs = redis_client.connection_pool.connection_kwargs
    host, port = kwargs["host"], kwargs["port"]
    collector = start_collector(redis_url=f"redis://old:pw@{host}:{port}/0")
    with grpc.insecure_channel(collector.target) as channel:
        response = IngestServiceStub(channel).Export(ExportRequest(reports=[report(0)]), timeout=5)
    assert list(response.snapshot_requests) == []
    assert redis_client.xlen(f"gradwatch:{{{RUN}}}:reports") == 1
