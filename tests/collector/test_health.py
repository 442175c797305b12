"""The standard gRPC health service on a real collector: no token needed, NOT_SERVING while shutting down."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwatch.collector.service import SERVICE_NAME
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.report_pb2 import StepReport

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_serving_without_a_token_while_export_still_needs_one(start_collector, service):
    collector = start_collector(token="s3cret")
    with grpc.insecure_channel(collector.target) as channel:
        assert _check(channel, service) == SERVING  # load balancers send no token
        with pytest.raises(grpc.RpcError) as info:
            IngestServiceStub(channel).Export(ExportRequest(reports=[StepReport(run_id="r", sequence=1)]), timeout=2)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_unknown_service_is_not_found(collector, channel):
    with pytest.raises(grpc.RpcError) as info:
        _check(channel, "no.such.Service")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_is_not_served(collector, channel):
    reflection = channel.unary_unary("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as info:
        reflection(b"", timeout=2)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_not_serving_during_shutdown_then_unavailable(collector, channel):
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                      timeout=5)
    assert next(watch).status == SERVING
    stopping = asyncio.run_coroutine_threadsafe(collector.server.stop(2.0), collector.loop)
    assert next(watch).status == NOT_SERVING  # the open stream hears it before the listener goes away
    watch.cancel()  # the watch is an in-flight call: let the grace period end early
    stopping.result(5)
    with pytest.raises(grpc.RpcError) as info:
        _check(channel, "")
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
