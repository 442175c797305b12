"""Scale-out: two collector processes on one Redis share the work of one run.

Collectors are stateless between requests, so agents may spread a run over any number of them (behind a
balancer, or alternating as here): every report lands exactly once in the run's stream, each collector
counts its own share in its /metrics, and losing one collector leaves the other serving.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from gradwatch.cli.processes import stop_process
from gradwatch.cli.redis_server import free_port
from gradwatch.streams import FIELD_REGISTRATION, FIELD_REPORT, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest, ExportResponse
from gradwatch.v1.report_pb2 import StepReport, TensorSummary
from gradwatch.v1.run_pb2 import RunRegistration, TensorInfo

pytestmark = pytest.mark.e2e

EXPORT_METHOD = "/gradwatch.v1.IngestService/Export"
RUN = "scale-out"
WORLD_SIZE = 2
REPORTS_PER_RANK = 30


class Collector:
    """`python -m gradwatch.collector` on free gRPC and /metrics ports, with a raw Export callable."""

    def __init__(self, redis_url: str, log_path):
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_path
        env = dict(os.environ)
        env.pop("GRADWATCH_TOKEN", None)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gradwatch.collector", "--listen", f"127.0.0.1:{self.port}",
                 "--redis-url", redis_url, "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                 "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.export = self.channel.unary_unary(EXPORT_METHOD, request_serializer=ExportRequest.SerializeToString,
                                               response_deserializer=ExportResponse.FromString)

    def wait_listening(self, timeout: float = 15.0) -> Collector:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"collector on port {self.port} did not start listening")

    def metric(self, sample: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        raise AssertionError(f"{sample} not in the collector's /metrics")

    def stop(self) -> None:
        self.channel.close()
        stop_process(self.proc)


@pytest.fixture
def collectors(redis_url, tmp_path):
    pair = [Collector(redis_url, tmp_path / f"collector-{i}.log") for i in range(2)]
    try:
        yield [c.wait_listening() for c in pair]
    finally:
        for c in pair:
            c.stop()


def registration(rank: int) -> ExportRequest:
    return ExportRequest(registrations=[RunRegistration(run_id=RUN, rank=rank, world_size=WORLD_SIZE,
                                                        tensors=[TensorInfo(id=0, name="fc.weight")])])


def report(rank: int, sequence: int) -> ExportRequest:
    summary = TensorSummary(tensor_id=0, count=8, sum=float(sequence), sum_squares=1.0, histogram=[8],
                            histogram_offset=40)
    return ExportRequest(reports=[StepReport(run_id=RUN, rank=rank, step=sequence - 1, sequence=sequence,
                                             tensors=[summary])])


def stored(redis_client) -> tuple[list[tuple[int, int]], int]:
    """((rank, sequence) of each report in stream order, number of registrations) in the run's stream."""
    reports, registrations = [], 0
    for _, fields in redis_client.xrange(reports_key(RUN)):
        if FIELD_REPORT in fields:
            item = StepReport.FromString(fields[FIELD_REPORT])
            reports.append((item.rank, item.sequence))
        registrations += FIELD_REGISTRATION in fields
    return reports, registrations


def test_two_collectors_share_one_run_and_each_counts_its_share(collectors, redis_client):
    errors: list[BaseException] = []

    def agent(rank: int) -> None:
        # Each rank alternates between the collectors, the ranks in opposite phase: both collectors see both.
        try:
            collectors[rank].export(registration(rank), timeout=10)
            for sequence in range(1, REPORTS_PER_RANK + 1):
                response = collectors[(rank + sequence) % 2].export(report(rank, sequence), timeout=10)
                assert not response.HasField("partial_success"), response
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=agent, args=(rank,), name=f"test-agent-{rank}") for rank in range(WORLD_SIZE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors

    reports, registrations = stored(redis_client)
    assert registrations == WORLD_SIZE
    assert sorted(reports) == [(rank, seq) for rank in range(WORLD_SIZE) for seq in range(1, REPORTS_PER_RANK + 1)]
    for rank in range(WORLD_SIZE):  # each agent waited for every answer: its reports are in order
        assert [seq for r, seq in reports if r == rank] == list(range(1, REPORTS_PER_RANK + 1))

    share = WORLD_SIZE * REPORTS_PER_RANK // 2
    for collector in collectors:
        assert collector.metric("gradwatch_collector_reports_total") == share
        assert collector.metric("gradwatch_collector_registrations_total") == 1
        assert collector.metric('gradwatch_collector_requests_total{code="OK"}') == share + 1


def test_killing_one_collector_leaves_the_other_serving(collectors, redis_client):
    survivor, victim = collectors
    for sequence in (1, 2):
        collectors[sequence % 2].export(report(0, sequence), timeout=10)
    victim.proc.kill()
    victim.proc.wait(10)

    with pytest.raises(grpc.RpcError) as refused:
        victim.export(report(0, 3), timeout=2)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # what an agent retries elsewhere
    for sequence in range(3, 11):
        survivor.export(report(0, sequence), timeout=10)

    reports, _ = stored(redis_client)
    assert reports == [(0, seq) for seq in range(1, 11)]
    assert survivor.metric("gradwatch_collector_reports_total") == 9
