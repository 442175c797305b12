"""Collector fixtures: a real collector (grpc.aio on 127.0.0.1, real Redis) on a background event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.server import CollectorServer
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub


class RunningCollector:
    """A CollectorServer served by its own event loop in a daemon thread, driven from the test's thread."""

    def __init__(self, config: CollectorConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-collector-loop", daemon=True)
        self.thread.start()
        self.server = CollectorServer(config)
        try:
            self.call(self.server.start())
        except BaseException:
            self._end_loop()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.bound_port}"

    @property
    def metrics(self):
        return self.server.metrics

    def call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop(1.0))
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def start_collector(redis_url) -> Iterator[Callable[..., RunningCollector]]:
    """start_collector(**config overrides) -> a started collector; all are stopped after the test."""
    started: list[RunningCollector] = []

    def start(**overrides) -> RunningCollector:
        base = CollectorConfig(listen="127.0.0.1:0", redis_url=redis_url, metrics_listen="", redis_timeout_s=3.0)
        config = dataclasses.replace(base, **overrides).validate()
        collector = RunningCollector(config)
        started.append(collector)
        return collector

    yield start
    for collector in reversed(started):
        collector.stop()


@pytest.fixture
def collector(start_collector) -> RunningCollector:
    return start_collector()


@pytest.fixture
def channel(collector) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(collector.target) as ch:
        yield ch


@pytest.fixture
def stub(channel) -> IngestServiceStub:
    return IngestServiceStub(channel)


# --- throwaway certificates for the TLS tests (gRPC and Redis) ---


@dataclass
class Pki:
    """Throwaway certificates from the openssl CLI: a CA, a server for 127.0.0.1, a client, a stranger."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate signed by another CA
    stranger_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _new_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN={name}")
    return cert, key


def _issue(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (directory / f"{name}{suffix}" for suffix in (".crt", ".key", ".csr", ".ext"))
    ext.write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
             "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", cert,
             "-days", "1", "-extfile", ext)
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _new_ca(directory, "gradwatch-test-ca")
    server = _issue(directory, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                             "extendedKeyUsage=serverAuth\n")
    client = _issue(directory, "agent", ca, "extendedKeyUsage=clientAuth\n")
    stranger = _issue(directory, "stranger", _new_ca(directory, "other-ca"), "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], *server, *client, *stranger)
