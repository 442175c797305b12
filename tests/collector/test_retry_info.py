"""Push-back: retryable refusals carry a google.rpc.RetryInfo trailer with the delay agents should wait.

Real collector and real Redis; Redis is slowed with CLIENT PAUSE WRITE so requests stay in flight.
"""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2

from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.service import REDIS_RETRY_AFTER_S
from gradwatch.rpc import RETRY_INFO_KEY
from gradwatch.settings import ConfigError
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.report_pb2 import StepReport, TensorSummary

LIMIT = 64 * 1024
EXPORT_METHOD = "/gradwatch.v1.IngestService/Export"


def retry_delay_s(err: grpc.RpcError) -> float | None:
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_INFO_KEY:
            delay = error_details_pb2.RetryInfo.FromString(value).retry_delay
            return delay.seconds + delay.nanos / 1e9
    return None


def big_request(run: str, sequence: int) -> ExportRequest:
    """A valid request of about 40 KiB: two of them exceed LIMIT together."""
    tensors = [TensorSummary(tensor_id=i, count=10**6, histogram=[10**6] * 60) for i in range(200)]
    request = ExportRequest(reports=[StepReport(run_id=run, step=sequence, sequence=sequence, tensors=tensors)])
    assert LIMIT // 2 < request.ByteSize() < LIMIT
    return request


@pytest.fixture
def paused_writes(redis_client):
    """pause(ms): Redis holds every write command for `ms` milliseconds; unpaused after the test."""
    yield lambda ms: redis_client.execute_command("CLIENT", "PAUSE", ms, "WRITE")
    redis_client.execute_command("CLIENT", "UNPAUSE")


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_over_the_inflight_limit_refuses_unavailable_with_retry_info(start_collector, paused_writes):
    collector = start_collector(max_message_bytes=LIMIT, max_inflight_bytes=LIMIT, retry_after_s=0.75)
    with grpc.insecure_channel(collector.target) as channel:
        stub = IngestServiceStub(channel)
        paused_writes(1500)
        first = stub.Export.future(big_request("push-back", 1), timeout=10)
        wait_until(lambda: collector.metrics.value("gradwatch_collector_inflight_bytes") > 0)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Export(big_request("push-back", 2), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "in-flight" in refused.value.details()
        assert retry_delay_s(refused.value) == pytest.approx(0.75)
        # The admitted request is written once Redis takes writes again.
        assert first.result().partial_success.rejected_reports == 0
    assert collector.metrics.value("gradwatch_collector_refused_total", reason="over_limit") == 1
    assert collector.metrics.value("gradwatch_collector_inflight_bytes") == 0


def test_redis_write_failure_refuses_unavailable_with_retry_info(start_collector, paused_writes):
    collector = start_collector(redis_timeout_s=0.2)
    with grpc.insecure_channel(collector.target) as channel:
        paused_writes(1000)
        with pytest.raises(grpc.RpcError) as refused:
            IngestServiceStub(channel).Export(ExportRequest(reports=[StepReport(run_id="r", sequence=1)]), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "redis write failed" in refused.value.details()
    assert retry_delay_s(refused.value) == pytest.approx(REDIS_RETRY_AFTER_S)


def test_a_malformed_request_is_refused_without_retry_info(channel):
    export = channel.unary_unary(EXPORT_METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as refused:
        export(b"\x0a\xff", timeout=5)  # field 1 claims more bytes than follow
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert retry_delay_s(refused.value) is None


@pytest.mark.parametrize("value", [-0.1, float("nan"), 3601.0])
def test_retry_after_s_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="retry_after_s"):
        CollectorConfig(retry_after_s=value).validate()


def test_retry_after_s_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRADWATCH_COLLECTOR_RETRY_AFTER_S", "2.5")
    assert CollectorConfig.from_env().retry_after_s == 2.5
