"""Secure by default: a collector port reachable beyond loopback without a token refuses to start, before it
binds anything (config.exposure_problem, CollectorServer.start), on a real collector and a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from gradwatch.cli.redis_server import free_port
from gradwatch.collector.__main__ import main
from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.server import CollectorServer, CollectorStartError

TOKEN = "agent-token-0123456789"
READ = "read-token-0123456789"


def config(**changes) -> CollectorConfig:
    return dataclasses.replace(CollectorConfig(listen="127.0.0.1:0", metrics_listen=""), **changes)


@pytest.mark.parametrize(("changes", "problem"), [
    ({}, None),                                                            # loopback: no token needed
    ({"listen": "localhost:4770", "metrics_listen": "[::1]:4771"}, None),
    ({"listen": "0.0.0.0:4770"}, "GRADWATCH_TOKEN"),
    ({"listen": "[::]:4770"}, "GRADWATCH_COLLECTOR_TOKENS_FILE"),
    ({"listen": "10.1.2.3:4770"}, "GRADWATCH_COLLECTOR_ALLOW_UNAUTHENTICATED=1"),
    ({"listen": "0.0.0.0:4770", "token": TOKEN}, None),
    ({"listen": "0.0.0.0:4770", "allow_unauthenticated": True}, None),
    ({"metrics_listen": "0.0.0.0:4771"}, "GRADWATCH_COLLECTOR_READ_TOKEN"),
    ({"metrics_listen": "0.0.0.0:4771", "token": TOKEN}, "GRADWATCH_COLLECTOR_READ_TOKEN"),  # not the agents'
    ({"metrics_listen": "0.0.0.0:4771", "read_token": READ}, None),
    ({"metrics_listen": "0.0.0.0:4771", "allow_unauthenticated": True}, None),
])
def test_exposure_rule(changes, problem):
    found = config(**changes).exposure_problem()
    assert (found is None) if problem is None else (problem in found), found


def test_client_certificates_count_as_authentication(pki):
    assert config(listen="0.0.0.0:4770", tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                  tls_client_ca_file=str(pki.ca)).validate().exposure_problem() is None
    assert config(listen="0.0.0.0:4770", tls_cert_file=str(pki.server_cert),
                  tls_key_file=str(pki.server_key)).validate().exposure_problem() is not None  # TLS alone: no


def test_beyond_loopback_without_a_token_nothing_listens(redis_url):
    port = free_port()
    server = CollectorServer(config(listen=f"0.0.0.0:{port}", redis_url=redis_url).validate())
    with pytest.raises(CollectorStartError) as info:
        asyncio.run(server.start())
    assert f"refusing to listen on 0.0.0.0:{port} without authentication" in str(info.value)
    assert "GRADWATCH_TOKEN" in str(info.value) and "GRADWATCH_COLLECTOR_ALLOW_UNAUTHENTICATED=1" in str(info.value)
    with pytest.raises(RuntimeError, match="not started"):
        server.bound_port  # noqa: B018
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


def test_main_says_what_to_set(redis_url, caplog):
    assert main(["--listen", "0.0.0.0:0", "--metrics-listen", "", "--redis-url", redis_url]) == 1
    assert "refusing to listen on 0.0.0.0:0 without authentication" in caplog.text


@pytest.mark.parametrize("changes", [{"token": TOKEN}, {"allow_unauthenticated": True}])
def test_beyond_loopback_with_a_token_or_the_opt_out_it_starts(start_collector, changes):
    collector = start_collector(listen="0.0.0.0:0", **changes)
    assert collector.server.bound_port > 0
