"""The exporter honours server push-back: a google.rpc.RetryInfo trailer lengthens the backoff (as OTLP);
a caller's deadline caps its own; shutdown() cancels an RPC in flight.

Against a real gRPC server on 127.0.0.1 whose Export refuses with a chosen status and trailer, and against
sockets that refuse or never answer (tests/agent/conftest.py).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from google.rpc import error_details_pb2

from gradwatch.agent.export.exporter import INITIAL_BACKOFF_S, Exporter
from gradwatch.rpc import RETRY_INFO_KEY
from gradwatch.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from gradwatch.v1.report_pb2 import StepReport


def retry_info(delay_s: float) -> bytes:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(round(delay_s * 1e9))
    return info.SerializeToString()


class PushingBack(ingest_service_pb2_grpc.IngestServiceServicer):
    """Refuses the first `refusals` calls with `code` and `trailer`, then accepts; records each call's time."""

    def __init__(self):
        self.code = grpc.StatusCode.UNAVAILABLE
        self.trailer: tuple = ()
        self.refusals = 1
        self.calls: list[float] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            self.calls.append(time.monotonic())
            refuse = len(self.calls) <= self.refusals
        if refuse:
            context.set_trailing_metadata(self.trailer)
            context.abort(self.code, "pushing back")
        return ingest_service_pb2.ExportResponse()


@pytest.fixture
def server():
    servicer = PushingBack()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(servicer, grpc_server)
    servicer.target = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
    grpc_server.start()
    yield servicer
    grpc_server.stop(0)


REQUEST = ingest_service_pb2.ExportRequest(reports=[StepReport(run_id="r", step=1, sequence=1)])


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retry_waits_at_least_the_servers_delay(server, code):
    server.code, server.trailer = code, ((RETRY_INFO_KEY, retry_info(0.3)),)
    exporter = Exporter(server.target, timeout_s=5.0)
    try:
        result = exporter.export(REQUEST)
    finally:
        exporter.shutdown()
    assert result.ok, result
    assert len(server.calls) == 2
    # Our own first backoff is ~0.1 s: only the server's hint explains a wait of 0.3 s.
    assert server.calls[1] - server.calls[0] >= 0.3


def test_without_a_hint_the_own_backoff_applies(server):
    exporter = Exporter(server.target, timeout_s=5.0)
    try:
        assert exporter.export(REQUEST).ok
    finally:
        exporter.shutdown()
    assert server.calls[1] - server.calls[0] < 0.3 + INITIAL_BACKOFF_S


def test_a_garbled_hint_is_ignored(server):
    server.trailer = ((RETRY_INFO_KEY, b"\xff\xff not a RetryInfo"),)
    exporter = Exporter(server.target, timeout_s=5.0)
    try:
        assert exporter.export(REQUEST).ok
    finally:
        exporter.shutdown()
    assert server.calls[1] - server.calls[0] < 0.3 + INITIAL_BACKOFF_S


def test_a_hint_past_the_deadline_gives_up_at_once(server):
    # Waiting 30 s would break the 1 s deadline: the export fails now, retryable, and the batch is kept.
    server.trailer = ((RETRY_INFO_KEY, retry_info(30.0)),)
    exporter = Exporter(server.target, timeout_s=1.0)
    started = time.monotonic()
    try:
        result = exporter.export(REQUEST)
    finally:
        exporter.shutdown()
    assert not result.ok and result.retryable
    assert time.monotonic() - started < 1.0
    assert len(server.calls) == 1


def test_shutdown_interrupts_the_servers_delay(server):
    server.trailer = ((RETRY_INFO_KEY, retry_info(3.0)),)
    exporter = Exporter(server.target, timeout_s=10.0)
    threading.Timer(0.3, exporter.shutdown).start()
    started = time.monotonic()
    result = exporter.export(REQUEST)
    assert not result.ok and result.retryable
    assert time.monotonic() - started < 2.0
    assert len(server.calls) == 1


def test_a_callers_deadline_caps_the_export(unreachable):
    # close() passes what is left of its budget: an export with 10 s of its own ends by it.
    exporter = Exporter(unreachable, timeout_s=10.0)
    started = time.monotonic()
    try:
        result = exporter.export(REQUEST, deadline=started + 0.5)
    finally:
        exporter.shutdown()
    assert not result.ok and result.retryable
    assert time.monotonic() - started < 0.8


def test_shutdown_cancels_an_rpc_in_flight(blackhole):
    exporter = Exporter(blackhole, timeout_s=10.0)
    threading.Timer(0.3, exporter.shutdown).start()
    started = time.monotonic()
    result = exporter.export(REQUEST)
    assert not result.ok and result.retryable and result.code == ""  # cancelled: no answer to name
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    after = exporter.export(REQUEST)  # shut down for good: no new channel, no wait
    assert not after.ok and after.retryable and time.monotonic() - started < 0.1
