"""Collector start-up and shutdown: order, clear failures, draining, and the `python -m` entry point."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from gradwatch.cli.redis_server import free_port
from gradwatch.collector.__main__ import main
from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.server import CollectorServer, CollectorStartError
from gradwatch.streams import reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest, ExportResponse
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.report_pb2 import StepReport


@pytest.fixture
def taken_port():
    """A port some other process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _config(redis_url: str, **changes) -> CollectorConfig:
    values = {"listen": "127.0.0.1:0", "redis_url": redis_url, "metrics_listen": "", **changes}
    return CollectorConfig(**values).validate()


def _start(config: CollectorConfig) -> None:
    async def start_and_stop():
        server = CollectorServer(config)
        await server.start()
        await server.stop(0)
    asyncio.run(start_and_stop())


def test_port_taken_is_a_clear_error(redis_url, taken_port):
    with pytest.raises(CollectorStartError) as info:
        _start(_config(redis_url, listen=f"127.0.0.1:{taken_port}"))
    assert str(info.value) == (f"cannot listen on 127.0.0.1:{taken_port}: address in use "
                               "(another collector running? choose one with --listen)")


def test_second_collector_on_the_same_port_is_refused(start_collector, redis_url):
    # gRPC's default SO_REUSEPORT would let both bind and split the traffic silently.
    first = start_collector()
    with pytest.raises(CollectorStartError, match="address in use"):
        _start(_config(redis_url, listen=first.target))


def test_redis_unreachable_is_a_clear_error():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(CollectorStartError, match=f"cannot reach redis at {url}: .*--redis-url"):
        _start(_config(url, redis_timeout_s=1.0))


def test_metrics_port_taken_is_a_clear_error(redis_url, taken_port):
    with pytest.raises(CollectorStartError, match=f"cannot serve metrics on 127.0.0.1:{taken_port}"):
        _start(_config(redis_url, metrics_listen=f"127.0.0.1:{taken_port}"))


def test_bound_port_before_start_raises():
    with pytest.raises(RuntimeError, match="not started"):
        _ = CollectorServer(CollectorConfig()).bound_port


def test_stop_finishes_in_flight_calls(start_collector, redis_client):
    collector = start_collector()
    results = []
    redis_client.execute_command("CLIENT", "PAUSE", "300", "WRITE")  # keep the call in flight
    with grpc.insecure_channel(collector.target) as channel:
        stub = IngestServiceStub(channel)
        call = threading.Thread(target=lambda: results.append(
            stub.Export(ExportRequest(reports=[StepReport(run_id="r", sequence=1)]), timeout=5)))
        call.start()
        deadline = time.monotonic() + 5
        while collector.metrics.value("gradwatch_collector_inflight_bytes") == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        collector.call(collector.server.stop(5.0))
        call.join()
        collector.call(collector.server.stop(5.0))  # idempotent
    assert results == [ExportResponse()]
    assert redis_client.xlen(reports_key("r")) == 1


def test_main_exits_1_on_invalid_configuration(caplog):
    assert main(["--listen", "nope", "--metrics-listen", ""]) == 1
    assert "invalid configuration: listen must be host:port" in caplog.text


def test_main_exits_1_when_redis_is_unreachable(caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["--listen", "127.0.0.1:0", "--metrics-listen", "", "--redis-url", url]) == 1
    assert f"cannot reach redis at {url}" in caplog.text


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}


def test_python_m_with_taken_port_exits_1_with_one_clear_line(redis_url, taken_port):
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch.collector", "--listen", f"127.0.0.1:{taken_port}",
         "--redis-url", redis_url, "--metrics-listen", ""],
        capture_output=True, text=True, timeout=30, env=_env())
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert (f"cannot listen on 127.0.0.1:{taken_port}: address in use (another collector running? "
            "choose one with --listen)") in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_python_m_serves_until_sigterm(redis_url, redis_client):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwatch.collector", "--listen", f"127.0.0.1:{port}", "--redis-url", redis_url,
         "--metrics-listen", ""],
        stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stderr.readline()
        assert f"gradwatch collector listening on 127.0.0.1:{port} -> redis {redis_url}" in line
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            IngestServiceStub(channel).Export(ExportRequest(reports=[StepReport(run_id="r", sequence=1)]), timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert redis_client.xlen(reports_key("r")) == 1
