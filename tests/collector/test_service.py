"""Export end to end: a real collector on 127.0.0.1 writing to a real Redis, called like an agent calls it."""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.request

import grpc
import pytest

from gradwatch.cli.redis_server import RedisServer
from gradwatch.streams import FIELD_REGISTRATION, FIELD_REPORT, RUNS_KEY, registrations_key, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest, ExportResponse
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.report_pb2 import DIRECTION_BACKWARD, DIRECTION_FORWARD, NonFiniteOrigin, StepReport, TensorSummary
from gradwatch.v1.run_pb2 import RunRegistration, TensorInfo

RUN = "run-1"
EXPORT = "/gradwatch.v1.IngestService/Export"


def registration(run_id: str = RUN, rank: int = 0, world_size: int = 1, **fields) -> RunRegistration:
    fields.setdefault("tensors", [TensorInfo(id=0, name="fc.weight", module_path="fc", dtype="float32"),
                                  TensorInfo(id=1, name="fc.weight.grad", module_path="fc", dtype="float32")])
    return RunRegistration(run_id=run_id, rank=rank, world_size=world_size, **fields)


def report(step: int = 0, run_id: str = RUN, sequence: int | None = None, **fields) -> StepReport:
    fields.setdefault("tensors", [
        TensorSummary(tensor_id=0, count=4, sum=1.5, sum_squares=2.0, min=-1.0, max=1.0,
                      histogram=[1, 2, 1], histogram_offset=39),
        # NaN and Inf are data: a report full of them must pass.
        TensorSummary(tensor_id=1, count=4, nan_count=2, inf_count=1, sum=math.nan, sum_squares=math.inf,
                      min=math.inf, max=-math.inf),
    ])
    return StepReport(run_id=run_id, step=step, sequence=step + 1 if sequence is None else sequence, **fields)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(registrations: list[bytes] = (), reports: list[bytes] = ()) -> bytes:
    """An ExportRequest assembled from already-encoded items, as a hand-rolled agent could send it."""
    return (b"".join(b"\x0a" + varint(len(r)) + r for r in registrations)
            + b"".join(b"\x12" + varint(len(r)) + r for r in reports))


def raw_export(channel: grpc.Channel):
    """Export without client-side serialization: sends whatever bytes it is given."""
    return channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=ExportResponse.FromString)


def entries(redis_client, run_id: str = RUN) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in redis_client.xrange(reports_key(run_id))]


def test_registration_and_reports_land_in_redis(collector, stub, redis_client):
    reg = registration()
    reports = [report(step) for step in range(3)]
    request = ExportRequest(registrations=[reg], reports=reports)

    response = stub.Export(request, timeout=5)

    assert not response.HasField("partial_success")
    stored = entries(redis_client)
    assert stored[0] == {FIELD_REGISTRATION: reg.SerializeToString()}
    assert stored[1:] == [{FIELD_REPORT: r.SerializeToString()} for r in reports]
    assert StepReport.FromString(stored[2][FIELD_REPORT]).tensors[1].nan_count == 2
    assert redis_client.hget(registrations_key(RUN), "0") == reg.SerializeToString()
    assert abs(redis_client.zscore(RUNS_KEY, RUN) - time.time()) < 60
    m = collector.metrics
    assert m.value("gradwatch_collector_requests_total", code="OK") == 1
    assert m.value("gradwatch_collector_reports_total") == 3
    assert m.value("gradwatch_collector_summaries_total") == 6
    assert m.value("gradwatch_collector_registrations_total") == 1
    assert m.value("gradwatch_collector_received_bytes_total") == request.ByteSize()
    assert m.value("gradwatch_collector_inflight_bytes") == 0
    assert m.value("gradwatch_collector_request_duration_seconds_count") == 1


def test_stored_bytes_are_the_agent_bytes_not_a_re_encoding(channel, redis_client):
    # Two concatenated encodings are one valid message (protobuf merges them) whose canonical re-encoding
    # differs: only a collector that stores the slice untouched passes.
    raw = report(7).SerializeToString() + StepReport(scalars={"accuracy": 0.5}).SerializeToString()
    assert StepReport.FromString(raw).SerializeToString() != raw

    response = raw_export(channel)(encode_request(reports=[raw]), timeout=5)

    assert not response.HasField("partial_success")
    assert entries(redis_client) == [{FIELD_REPORT: raw}]


def test_empty_request_is_ok(stub, redis_client):
    assert stub.Export(ExportRequest(), timeout=5) == ExportResponse()
    assert redis_client.keys("*") == []


@pytest.mark.parametrize(("bad", "reason"), [
    (report(run_id="bad id!"), "run_id 'bad id!'"),
    (report(run_id=""), "run_id ''"),
    (report(run_id="x" * 129), "run_id"),
    (report(step=-1, sequence=1), "step -1 is negative"),
    (report(sequence=0), "sequence must start at 1"),
    (report(tensors=[TensorSummary(tensor_id=i) for i in range(3)]), "3 tensors, more than the limit of 2"),
    (report(scalars={"n" * 65: 1.0}), "longer than 64 bytes"),
    (report(tensors=[TensorSummary(histogram=[1, 1], histogram_offset=63)]), "runs past bucket 64"),
    (report(nonfinite_origins=[NonFiniteOrigin(direction=DIRECTION_FORWARD, module="m" * 65)]), "NaN/Inf origin"),
    (report(nonfinite_origins=[NonFiniteOrigin(module="m", observed="m" * 77)]), "longer than 76 bytes"),
])
def test_invalid_report_is_refused_alone(start_collector, redis_client, bad, reason):
    collector = start_collector(max_tensors_per_report=2, max_string_bytes=64)
    good = report(1, tensors=[TensorSummary(tensor_id=0, count=1)])
    with grpc.insecure_channel(collector.target) as channel:
        response = IngestServiceStub(channel).Export(ExportRequest(reports=[bad, good]), timeout=5)

    assert response.partial_success.rejected_reports == 1
    assert response.partial_success.rejected_registrations == 0
    assert "report 0: " in response.partial_success.error_message
    assert reason in response.partial_success.error_message
    assert entries(redis_client) == [{FIELD_REPORT: good.SerializeToString()}]
    assert collector.metrics.value("gradwatch_collector_refused_total", reason="invalid_report") == 1
    assert collector.metrics.value("gradwatch_collector_reports_total") == 1


def test_a_report_of_origins_and_no_tensors_is_accepted(start_collector, redis_client):
    """A step that was not due, sent for its NaN/Inf origins: a loss and origins, no tensors."""
    collector = start_collector(max_string_bytes=64)
    module = "m" * 64
    origins = [NonFiniteOrigin(direction=DIRECTION_FORWARD, module=module, order=3, observed=f"{module}:output",
                               nonfinite_count=5),
               NonFiniteOrigin(direction=DIRECTION_BACKWARD, module="(loss)", order=9, observed=f"{module}:output.grad",
                               nonfinite_count=1)]
    only = report(3, tensors=[], loss=math.nan, nonfinite_origins=origins)
    with grpc.insecure_channel(collector.target) as channel:
        response = IngestServiceStub(channel).Export(ExportRequest(reports=[only]), timeout=5)
    assert response.partial_success.rejected_reports == 0, response.partial_success.error_message
    assert entries(redis_client) == [{FIELD_REPORT: only.SerializeToString()}]


@pytest.mark.parametrize(("bad", "reason"), [
    (registration(run_id="a/b"), "run_id 'a/b'"),
    (registration(world_size=0), "world_size must be at least 1"),
    (registration(rank=2, world_size=2), "rank 2 is not below world_size 2"),
    (registration(tensors=[TensorInfo(id=3, name="a"), TensorInfo(id=3, name="b")]), "tensor id 3 is used twice"),
    (registration(tensors=[TensorInfo(id=0, name="é" * 33)]), "longer than 64 bytes"),
    (registration(tensors=[TensorInfo(id=0, module_path="m" * 65)]), "longer than 64 bytes"),
    (registration(labels={"project": "v" * 65}), "label"),
    (registration(host="h" * 65), "agent"),
])
def test_invalid_registration_is_refused_alone(start_collector, redis_client, bad, reason):
    collector = start_collector(max_string_bytes=64)
    with grpc.insecure_channel(collector.target) as channel:
        response = IngestServiceStub(channel).Export(ExportRequest(registrations=[bad], reports=[report()]),
                                                     timeout=5)

    assert response.partial_success.rejected_registrations == 1
    assert response.partial_success.rejected_reports == 0
    assert reason in response.partial_success.error_message
    assert redis_client.hlen(registrations_key(RUN)) == 0
    assert entries(redis_client) == [{FIELD_REPORT: report().SerializeToString()}]
    assert collector.metrics.value("gradwatch_collector_refused_total", reason="invalid_registration") == 1


def test_undecodable_items_are_refused_and_the_message_is_bounded(channel, collector, redis_client):
    garbage = [b"\xff\xff\xff", b"\x0a\x05ab"] * 4  # framed correctly at the top level, broken inside
    response = raw_export(channel)(encode_request(reports=garbage + [report().SerializeToString()]), timeout=5)

    assert response.partial_success.rejected_reports == 8
    message = response.partial_success.error_message
    assert message.startswith("report 0: cannot decode") and message.endswith("and 3 more")
    assert len(entries(redis_client)) == 1


@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")],
                                      [("authorization", "Basic s3cret")]])
def test_token_required(start_collector, redis_client, metadata):
    collector = start_collector(token="s3cret")
    with grpc.insecure_channel(collector.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            IngestServiceStub(channel).Export(ExportRequest(reports=[report()]), metadata=metadata, timeout=5)

    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "s3cret" not in info.value.details()
    assert redis_client.keys("*") == []
    assert collector.metrics.value("gradwatch_collector_refused_total", reason="unauthenticated") == 1
    assert collector.metrics.value("gradwatch_collector_requests_total", code="UNAUTHENTICATED") == 1


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_right_token_is_accepted(start_collector, redis_client, scheme):
    collector = start_collector(token="s3cret")
    with grpc.insecure_channel(collector.target) as channel:
        IngestServiceStub(channel).Export(ExportRequest(reports=[report()]), timeout=5,
                                          metadata=[("authorization", f"{scheme} s3cret")])
    assert len(entries(redis_client)) == 1


def test_oversized_message_is_refused_by_grpc(start_collector, redis_client):
    collector = start_collector(max_message_bytes=64 * 1024)
    big = report(scalars={f"s{i}": float(i) for i in range(10_000)})
    assert big.ByteSize() > 64 * 1024
    with grpc.insecure_channel(collector.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            IngestServiceStub(channel).Export(ExportRequest(reports=[big]), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert redis_client.keys("*") == []


def test_too_many_reports_is_invalid_argument(start_collector, redis_client):
    collector = start_collector(max_reports_per_request=3)
    with grpc.insecure_channel(collector.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            IngestServiceStub(channel).Export(ExportRequest(reports=[report(i) for i in range(4)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4 reports, more than the limit of 3" in info.value.details()
    assert collector.metrics.value("gradwatch_collector_refused_total", reason="too_large") == 1
    assert redis_client.keys("*") == []


@pytest.mark.parametrize(("payload", "why"), [
    (b"\x12\x05abc", "claims 5 bytes"),
    (b"\x12", "truncated varint"),
    (b"\x10\x01", "wire type 0"),
    (b"\x0f", "invalid wire type 7"),
    (b"\x00\x00", "field number 0"),
    (b"\x3b\x08\x01", "not closed"),
])
def test_malformed_bytes_are_invalid_argument_and_counted(collector, channel, redis_client, payload, why):
    with pytest.raises(grpc.RpcError) as info:
        raw_export(channel)(payload, timeout=5)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("malformed ExportRequest: ")
    assert why in info.value.details()
    assert collector.metrics.value("gradwatch_collector_refused_total", reason="malformed") == 1
    assert collector.metrics.value("gradwatch_collector_requests_total", code="INVALID_ARGUMENT") == 1
    assert redis_client.keys("*") == []
    # Still serving.
    assert raw_export(channel)(b"", timeout=5) == ExportResponse()


def test_over_inflight_limit_is_unavailable_then_recovers(start_collector, redis_client):
    collector = start_collector(max_message_bytes=1000, max_inflight_bytes=1000)
    request = ExportRequest(reports=[report(i) for i in range(7)])
    assert 500 < request.ByteSize() <= 1000
    results = []
    # Pause Redis writes so the first call stays in flight while the second one arrives.
    redis_client.execute_command("CLIENT", "PAUSE", "800", "WRITE")
    with grpc.insecure_channel(collector.target) as channel:
        stub = IngestServiceStub(channel)
        first = threading.Thread(target=lambda: results.append(stub.Export(request, timeout=5)))
        first.start()
        deadline = time.monotonic() + 5
        while collector.metrics.value("gradwatch_collector_inflight_bytes") == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as info:
            stub.Export(request, timeout=5)
        first.join()

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "collector over its in-flight byte limit; retry"
    assert results == [ExportResponse()]
    assert len(entries(redis_client)) == 7
    assert collector.metrics.value("gradwatch_collector_refused_total", reason="over_limit") == 1
    assert collector.metrics.value("gradwatch_collector_inflight_bytes") == 0


def test_redis_down_is_unavailable_and_recovers(start_collector, tmp_path):
    redis_server = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        collector = start_collector(redis_url=redis_server.url)
        with grpc.insecure_channel(collector.target) as channel:
            stub = IngestServiceStub(channel)
            stub.Export(ExportRequest(reports=[report(0)]), timeout=5)
            redis_server.kill()

            with pytest.raises(grpc.RpcError) as info:
                stub.Export(ExportRequest(reports=[report(1)]), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details().startswith("redis write failed: ")
            assert info.value.details().endswith("; retry")
            m = collector.metrics
            assert m.value("gradwatch_collector_redis_errors_total") == 1
            assert m.value("gradwatch_collector_refused_total", reason="redis_error") == 1
            assert m.value("gradwatch_collector_requests_total", code="UNAVAILABLE") == 1
            assert m.value("gradwatch_collector_reports_total") == 1

            # Redis back on the same port: the next retry succeeds without restarting the collector.
            redis_server = RedisServer(tmp_path / "redis2", port=redis_server.port, appendonly=False).start()
            stub.Export(ExportRequest(reports=[report(1)]), timeout=5)
            assert m.value("gradwatch_collector_reports_total") == 2
    finally:
        redis_server.stop()


def test_a_redis_outage_is_counted_every_time_and_logged_once(start_collector, tmp_path, caplog):
    redis_server = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        collector = start_collector(redis_url=redis_server.url)
        redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="gradwatch.collector"), \
                grpc.insecure_channel(collector.target) as channel:
            stub = IngestServiceStub(channel)
            for step in range(3):
                with pytest.raises(grpc.RpcError):
                    stub.Export(ExportRequest(reports=[report(step)]), timeout=5)
    finally:
        redis_server.stop()
    assert collector.metrics.value("gradwatch_collector_redis_errors_total") == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "gradwatch.collector"]
    assert len(lines) == 1, lines  # within the 10 s interval: the later two only counted
    assert lines[0].startswith("redis write failed: ") and lines[0].endswith(
        "; answering UNAVAILABLE so agents retry")


def test_metrics_endpoint_serves_the_collector_registry(start_collector):
    collector = start_collector(metrics_listen="127.0.0.1:0")
    with grpc.insecure_channel(collector.target) as channel:
        IngestServiceStub(channel).Export(ExportRequest(reports=[report()]), timeout=5)
    url = f"http://127.0.0.1:{collector.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    assert "gradwatch_collector_reports_total 1.0" in body
    assert 'gradwatch_collector_refused_total{reason="redis_error"} 0.0' in body
    assert "python_gc_objects_collected_total" not in body  # not the global registry


def test_the_stream_cap_counts_bytes_for_big_reports(start_collector, redis_client):
    """stream_max_bytes caps a run stream nobody reads by its bytes: a big report gets a proportionally small
    MAXLEN (approximate: Redis trims whole nodes of 100 entries), a small one keeps stream_maxlen."""
    size = len(report(0).SerializeToString()) + 100
    collector = start_collector(stream_max_bytes=300 * size, stream_maxlen=1_000_000)
    with grpc.insecure_channel(collector.target) as channel:
        stub = IngestServiceStub(channel)
        for batch in range(10):
            stub.Export(ExportRequest(reports=[report(batch * 100 + i) for i in range(100)]), timeout=10)
    length = redis_client.xlen(reports_key(RUN))
    assert 300 <= length < 500  # 1,000 written, capped near 300 entries of this size
    entries_left = redis_client.xrange(reports_key(RUN), count=1)
    assert StepReport.FromString(entries_left[0][1][FIELD_REPORT]).step >= 500  # the oldest went
