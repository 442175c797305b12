"""A real gRPC server on 127.0.0.1 that records Export requests (the agent's side of the contract)."""

from __future__ import annotations

import os
import sys
import threading
from concurrent import futures

import grpc
import pytest
import torch

import gradwatch.agent
from gradwatch.v1 import ingest_service_pb2, ingest_service_pb2_grpc


class RecordingIngest(ingest_service_pb2_grpc.IngestServiceServicer):
    def __init__(self):
        self.requests: list[ingest_service_pb2.ExportRequest] = []
        self.metadata: list[dict] = []
        self.fail_with: list[grpc.StatusCode] = []  # codes to answer with, one per call, before succeeding
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            if self.fail_with:
                context.abort(self.fail_with.pop(0), "injected failure")
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
        return ingest_service_pb2.ExportResponse()

    @property
    def reports(self):
        """Step reports, without the agent's end-of-run marker (see `finals`)."""
        with self.lock:
            return [r for req in self.requests for r in req.reports if not r.final]

    @property
    def finals(self):
        with self.lock:
            return [r for req in self.requests for r in req.reports if r.final]


@pytest.fixture
def ingest():
    servicer = RecordingIngest()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


AGENT_DIR = os.path.dirname(gradwatch.agent.__file__) + os.sep
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _agent_on_stack() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(AGENT_DIR):
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def host_reads(monkeypatch):
    """CPU stand-in for set_sync_debug_mode("error"): the names of the tensor host reads that agent code
    makes on the test's own (training) thread while the fixture is active. Reads by the user's code and
    torch's own (Adam reads its step count on a CPU) are not the agent's; the reader thread may read."""
    training_thread = threading.current_thread()
    offenders: list[str] = []

    def trap(name, original):
        def wrapped(self, *args, **kwargs):
            if threading.current_thread() is training_thread and _agent_on_stack():
                offenders.append(name)
            return original(self, *args, **kwargs)
        return wrapped

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, trap(name, getattr(torch.Tensor, name)))
    yield offenders
    monkeypatch.undo()
