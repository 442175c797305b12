"""TLS and mTLS between the agent's exporter and a real collector on 127.0.0.1, with throwaway certificates."""

from __future__ import annotations

import argparse

import pytest

from gradwatch.agent.config import AgentConfig
from gradwatch.agent.export.exporter import Exporter
from gradwatch.collector.__main__ import add_arguments, config_from_args
from gradwatch.collector.config import CollectorConfig
from gradwatch.settings import ConfigError
from gradwatch.streams import reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.report_pb2 import StepReport

# Short: a refused handshake is retried (UNAVAILABLE) until this deadline.
EXPORT_TIMEOUT_S = 0.5


def _export(target: str, run: str, **tls) -> tuple[bool, str]:
    config = AgentConfig(collector=target, export_timeout_s=EXPORT_TIMEOUT_S, **tls).validate()
    exporter = Exporter.from_config(config)
    try:
        result = exporter.export(ExportRequest(reports=[StepReport(run_id=run, sequence=1)]))
    finally:
        exporter.shutdown()
    return result.ok, result.error


def test_tls_agent_exports_to_tls_server(pki, start_collector, redis_client):
    collector = start_collector(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key))
    assert _export(collector.target, "tls", tls=True, tls_ca_file=str(pki.ca)) == (True, "")
    assert redis_client.xlen(reports_key("tls")) == 1


def test_agent_without_the_ca_refuses_the_server(pki, start_collector, redis_client):
    # gRPC's bundled public roots do not include our throwaway CA: no silent trust.
    collector = start_collector(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key))
    ok, error = _export(collector.target, "untrusted", tls=True)
    assert not ok and error.startswith("UNAVAILABLE")
    assert redis_client.xlen(reports_key("untrusted")) == 0


def test_plaintext_agent_to_tls_server_is_unavailable_counted_and_training_goes_on(pki, start_collector,
                                                                                    redis_client):
    torch = pytest.importorskip("torch")
    import gradwatch

    collector = start_collector(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key))
    ok, error = _export(collector.target, "plain")
    assert not ok and error.startswith("UNAVAILABLE")

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = AgentConfig(collector=collector.target, export_timeout_s=EXPORT_TIMEOUT_S, export_interval_s=0.05)
    watcher = gradwatch.watch(model, optimizer, run="plain", config=config)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        watcher.step()
    watcher.flush(2 * EXPORT_TIMEOUT_S + 0.5)  # retried until the deadline, then counted
    watcher.close(0.1)
    assert watcher.counters.captured == 3 and watcher.counters.export_errors >= 1
    assert redis_client.xlen(reports_key("plain")) == 0


def test_mtls_requires_a_client_certificate_signed_by_the_ca(pki, start_collector, redis_client):
    collector = start_collector(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                                tls_client_ca_file=str(pki.ca))
    trust = {"tls": True, "tls_ca_file": str(pki.ca)}
    ok, error = _export(collector.target, "no-cert", **trust)
    assert not ok and error.startswith("UNAVAILABLE")
    ok, error = _export(collector.target, "stranger", **trust, tls_cert_file=str(pki.stranger_cert),
                        tls_key_file=str(pki.stranger_key))
    assert not ok and error.startswith("UNAVAILABLE")
    assert _export(collector.target, "mtls", **trust, tls_cert_file=str(pki.client_cert),
                   tls_key_file=str(pki.client_key)) == (True, "")
    assert [redis_client.xlen(reports_key(run)) for run in ("no-cert", "stranger", "mtls")] == [0, 0, 1]


# --- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("files", "message"), [
    ({"tls_cert_file": "server_cert"}, "needs both a certificate and its private key"),
    ({"tls_key_file": "server_key"}, "needs both a certificate and its private key"),
    ({"tls_client_ca_file": "ca"}, r"client CA \(mTLS\) needs TLS"),
    ({"tls_cert_file": "missing", "tls_key_file": "server_key"}, "tls_cert_file '.*missing.pem': No such file"),
    ({"tls_cert_file": "server_key", "tls_key_file": "server_key"}, "is not a PEM file with a CERTIFICATE block"),
    ({"tls_cert_file": "server_cert", "tls_key_file": "server_cert"}, "is not a PEM file with a PRIVATE KEY block"),
    ({"tls_cert_file": "server_cert", "tls_key_file": "server_key", "tls_client_ca_file": "server_key"},
     "tls_client_ca_file .* is not a PEM file with a CERTIFICATE block"),
])
def test_collector_tls_config_errors(pki, tmp_path, files, message):
    paths = {name: str(tmp_path / "missing.pem") if which == "missing" else str(getattr(pki, which))
             for name, which in files.items()}
    with pytest.raises(ConfigError, match=message):
        CollectorConfig(**paths).validate()


def test_collector_tls_from_env_and_flags(pki, monkeypatch):
    monkeypatch.setenv("GRADWATCH_COLLECTOR_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("GRADWATCH_COLLECTOR_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("GRADWATCH_COLLECTOR_TLS_CLIENT_CA", str(pki.ca))
    from_env = CollectorConfig.from_env().validate()
    assert (from_env.tls_cert_file, from_env.tls_key_file, from_env.tls_client_ca_file) == (
        str(pki.server_cert), str(pki.server_key), str(pki.ca))

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = config_from_args(parser.parse_args(["--tls-client-ca", ""]))  # '' switches mTLS off again
    assert flags.tls and flags.tls_client_ca_file is None
    flags = config_from_args(parser.parse_args(["--tls-cert", "", "--tls-key", "", "--tls-client-ca", ""]))
    assert not flags.tls


def test_watch_with_tls_config_trains_over_tls(pki, start_collector, redis_client):
    torch = pytest.importorskip("torch")
    import gradwatch

    collector = start_collector(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                                tls_client_ca_file=str(pki.ca))
    config = AgentConfig(collector=collector.target, tls=True, tls_ca_file=str(pki.ca),
                         tls_cert_file=str(pki.client_cert), tls_key_file=str(pki.client_key))
    model = torch.nn.Linear(4, 2)
    with gradwatch.watch(model, run="tls-watch", config=config) as watcher:
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            watcher.step(loss=1.0)
            model.zero_grad()
        assert watcher.flush(10)
    assert watcher.counters.exported == 3
    assert redis_client.xlen(reports_key("tls-watch")) == 5  # registration, three reports, end-of-run marker
