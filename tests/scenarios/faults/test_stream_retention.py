"""An aggregator down while the collector keeps writing, with real processes on a real Redis 7.

What must hold (docs/architecture.md#stream-retention): a run's stream is trimmed by what the aggregators applied,
never by count, so an aggregator stopped mid-run finds every entry written meanwhile, past the old 100,000-entry
cap, and applies it; applied entries leave the stream; and when the collector's hard cap does trim entries no
aggregator applied, their exact number is counted, logged and raised as the StreamDataLost alert.
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
import redis

from gradwatch.aggregator.ingest.leases import applied_key
from gradwatch.cli.processes import stop_process, wait_until
from gradwatch.cli.redis_server import free_port
from gradwatch.streams import AGGREGATOR_GROUP, ALERTS_KEY, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.report_pb2 import StepReport, TensorSummary
from gradwatch.v1.run_pb2 import TENSOR_KIND_GRADIENT, RunRegistration, TensorInfo

pytestmark = pytest.mark.e2e

OLD_CAP = 100_000  # the collector's MAXLEN ~ before streams were trimmed by what was applied
PER_REQUEST = 10_000  # the collector's default max_reports_per_request


@pytest.fixture
def redis_url(redis_7):
    client = redis.Redis.from_url(redis_7.url)
    client.flushall()
    client.close()
    return redis_7.url


def child(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})


class Collector:
    def __init__(self, redis_url: str, log_path: Path, *flags: str):
        self.port = free_port()
        self.proc = child(["gradwatch.collector", "--listen", f"127.0.0.1:{self.port}", "--redis-url", redis_url,
                           "--metrics-listen", "", "--log-level", "WARNING", *flags], log_path)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(self.channel).result(timeout=15)
        self.stub = IngestServiceStub(self.channel)

    def export(self, run: str, first: int, n: int, registration: bool = False) -> None:
        """Reports with sequence numbers first+1 .. first+n, in requests of at most PER_REQUEST."""
        for start in range(first, first + n, PER_REQUEST):
            request = ExportRequest()
            if registration and start == first:
                reg = RunRegistration(run_id=run, rank=0, world_size=1, agent_version="test")
                reg.tensors.append(TensorInfo(id=0, name="fc.weight.grad", module_path="fc",
                                              kind=TENSOR_KIND_GRADIENT, dtype="float32"))
                request.registrations.append(reg)
            for step in range(start, min(start + PER_REQUEST, first + n)):
                request.reports.append(StepReport(run_id=run, step=step, sequence=step + 1, loss=1.0, tensors=[
                    TensorSummary(tensor_id=0, count=4, sum=0.0, sum_squares=1.0, min=-0.5, max=0.5)]))
            response = self.stub.Export(request, timeout=30)
            assert not response.HasField("partial_success"), response

    def stop(self) -> None:
        self.channel.close()
        stop_process(self.proc)


class AggregatorProcess:
    def __init__(self, name: str, redis_url: str, log_path: Path):
        self.log_path = log_path
        self.metrics = f"127.0.0.1:{free_port()}"
        fast = {"GRADWATCH_AGGREGATOR_DISCOVER_INTERVAL_S": "0.2", "GRADWATCH_AGGREGATOR_LEASE_TTL_MS": "2000"}
        self.proc = child(["gradwatch.aggregator", "--redis-url", redis_url, "--consumer", name, "--metrics-listen",
                           self.metrics, "--log-level", "INFO"], log_path, fast)

    def sample(self, name: str, **labels) -> float | None:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as response:
            text = response.read().decode()
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> None:
        stop_process(self.proc)  # a clean stop: the last batch is committed and the leases are given back


def applied(client: redis.Redis, run: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(applied_key(run)).items()}


def settled(client: redis.Redis, run: str, reports: int):
    """True once `reports` are applied and nothing is pending."""
    def done() -> bool:
        return (applied(client, run).get("reports") == reports
                and client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"] == 0)
    return done


def lost_alerts(client: redis.Redis, run: str) -> list[dict]:
    alerts = (json.loads(fields[b"alert"]) for _, fields in client.xrange(ALERTS_KEY))
    return [a for a in alerts if a["rule"] == "StreamDataLost" and a["run"] == run]


@pytest.fixture
def stack(tmp_path, redis_url):
    """start(kind, ...) -> a Collector or an AggregatorProcess; all are stopped after the test."""
    started: list = []

    def start(kind, *args):
        started.append(kind(*args))
        return started[-1]

    yield start
    for thing in reversed(started):
        thing.stop()


def test_an_aggregator_stopped_mid_run_loses_nothing_written_past_the_old_cap(tmp_path, redis_url, stack):
    run, client = "retention-outage", redis.Redis.from_url(redis_url)
    collector = stack(Collector, redis_url, tmp_path / "collector.log")
    a = stack(AggregatorProcess, "replica-a", redis_url, tmp_path / "a.log")
    collector.export(run, 0, 1_000, registration=True)
    wait_until(settled(client, run, 1_000), 30, "the first 1,000 reports applied")
    assert client.xlen(reports_key(run)) == 0  # applied entries are trimmed
    a.stop()

    written = OLD_CAP + 10_000
    collector.export(run, 1_000, written)  # the aggregator is down: nothing applies or trims these
    assert client.xlen(reports_key(run)) == written  # past the old cap, nothing trimmed

    b = stack(AggregatorProcess, "replica-b", redis_url, tmp_path / "b.log")
    wait_until(settled(client, run, 1_000 + written), 180, "every report applied after the restart")
    record = applied(client, run)
    assert record["high:0"] == 1_000 + written and "lost" not in record
    assert client.xlen(reports_key(run)) == 0
    assert b.sample("gradwatch_aggregator_stream_lost_total") == 0
    assert lost_alerts(client, run) == []


def test_a_hard_cap_that_drops_unapplied_entries_is_counted_logged_and_alerted(tmp_path, redis_url, stack):
    run, client = "retention-drop", redis.Redis.from_url(redis_url)
    collector = stack(Collector, redis_url, tmp_path / "collector.log", "--stream-maxlen", "1000")
    a = stack(AggregatorProcess, "replica-a", redis_url, tmp_path / "a.log")
    collector.export(run, 0, 500, registration=True)
    wait_until(settled(client, run, 500), 30, "the first 500 reports applied")
    a.stop()

    collector.export(run, 500, 5_000)  # the tiny hard cap trims about 4,000 of them unread
    kept = client.xlen(reports_key(run))
    assert 1_000 <= kept < 1_200  # MAXLEN ~ trims whole stream nodes
    lost = 5_000 - kept

    b = stack(AggregatorProcess, "replica-b", redis_url, tmp_path / "b.log")
    wait_until(settled(client, run, 500 + kept), 60, "the reports the cap left applied")
    wait_until(lambda: lost_alerts(client, run), 15, "the StreamDataLost alert")
    assert applied(client, run)["lost"] == lost
    assert b.sample("gradwatch_aggregator_stream_lost_total") == lost
    assert b.sample("gradwatch_alert_firing", layer="(run)", rule="StreamDataLost", run=run) == 1
    (alert,) = lost_alerts(client, run)
    assert (alert["status"], alert["severity"], alert["value"]) == ("firing", "critical", lost)
    assert f"Run {run} lost {lost} report-stream entries" in alert["summary"]
    log = (tmp_path / "b.log").read_text()
    assert f"run {run}: {lost} report-stream entries left the stream before any aggregator applied them" in log
