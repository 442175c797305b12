"""AgentConfig: TLS settings from the environment, and validate()'s refusals (as a table)."""

from __future__ import annotations

import grpc
import pytest

from gradwatch.agent.config import AgentConfig
from gradwatch.agent.export.exporter import channel_credentials
from gradwatch.settings import ConfigError


@pytest.fixture
def pem(tmp_path):
    """Paths of readable files named ca.pem, cert.pem, key.pem (contents are not checked by validate())."""
    paths = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text(f"-----BEGIN {name}-----\n")
        paths[name] = str(path)
    return paths


def test_tls_is_off_by_default():
    config = AgentConfig().validate()
    assert not config.tls and channel_credentials(config) is None


def test_tls_from_env(monkeypatch, pem):
    monkeypatch.setenv("GRADWATCH_TLS", "1")
    monkeypatch.setenv("GRADWATCH_TLS_CA", pem["ca"])
    monkeypatch.setenv("GRADWATCH_TLS_CERT", pem["cert"])
    monkeypatch.setenv("GRADWATCH_TLS_KEY", pem["key"])
    config = AgentConfig.from_env().validate()
    assert (config.tls, config.tls_ca_file, config.tls_cert_file, config.tls_key_file) == (
        True, pem["ca"], pem["cert"], pem["key"])


def test_tls_with_system_roots_builds_credentials():
    assert isinstance(channel_credentials(AgentConfig(tls=True).validate()), grpc.ChannelCredentials)


@pytest.mark.parametrize(("changes", "message"), [
    ({"tls_ca_file": "ca"}, r"tls_ca_file set but tls is off \(set tls=True or GRADWATCH_TLS=1\)"),
    ({"tls_cert_file": "cert", "tls_key_file": "key"}, "tls_cert_file, tls_key_file set but tls is off"),
    ({"tls": True, "tls_cert_file": "cert"}, "needs both tls_cert_file and tls_key_file"),
    ({"tls": True, "tls_key_file": "key"}, "needs both tls_cert_file and tls_key_file"),
    ({"tls": True, "tls_ca_file": "missing"}, "tls_ca_file '.*missing.pem' does not exist or is not readable"),
    ({"tls": True, "tls_cert_file": "cert", "tls_key_file": "missing"}, "tls_key_file .* does not exist"),
])
def test_tls_validation(pem, tmp_path, changes, message):
    values = {key: pem.get(value, str(tmp_path / "missing.pem")) if key.endswith("_file") else value
              for key, value in changes.items()}
    with pytest.raises(ConfigError, match=message):
        AgentConfig(**values).validate()


def test_update_and_label_limits_from_env_and_validated(monkeypatch):
    assert (AgentConfig().updates_max_bytes, AgentConfig().labels_max_classes) == (256 << 20, 1000)
    monkeypatch.setenv("GRADWATCH_UPDATES_MAX_BYTES", str(1 << 30))
    monkeypatch.setenv("GRADWATCH_LABELS_MAX_CLASSES", "10")
    config = AgentConfig.from_env().validate()
    assert (config.updates_max_bytes, config.labels_max_classes) == (1 << 30, 10)
    assert AgentConfig(updates_max_bytes=0, inputs_max_channels=0).validate()  # no updates, no channels
    for changes, message in (({"updates_max_bytes": -1}, "updates_max_bytes must be >= 0"),
                             ({"inputs_max_channels": -1}, "inputs_max_channels must be >= 0"),
                             ({"labels_max_classes": 0}, "labels_max_classes must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            AgentConfig(**changes).validate()
