"""AgentConfig: settings from the environment (bad ones refused, naming the variable), TLS, and validate()'s
refusals (as tables)."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

import gradwatch
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


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("GRADWATCH_EVERY", "often", "integer >= 1"),                                   # int (an alias)
    ("GRADWATCH_AGENT_EVERY", "0", "integer >= 1"),
    ("GRADWATCH_AGENT_QUEUE_BYTES", "64MiB", "integer >= 1"),
    ("GRADWATCH_EXPORT_TIMEOUT_S", "-1", "number > 0, or inf"),                     # float
    ("GRADWATCH_AGENT_EXPORT_INTERVAL_S", "fast", "number > 0, or inf"),
    ("GRADWATCH_TLS", "sometimes", "1/0, true/false, yes/no, on/off"),              # bool
    ("GRADWATCH_HISTOGRAM", "2", "1/0, true/false, yes/no, on/off"),
    ("GRADWATCH_KERNELS", "cuda", "one of auto, sync, torch"),                      # choice
    ("GRADWATCH_COLLECTOR", "collector.example", "host:port"),                      # host:port
    ("GRADWATCH_TLS_CA", "/no/such/ca.pem", "path of a readable file (no such file)"),  # path
    ("GRADWATCH_SCHEDULE", "sometimes:3", "schedule spec"),                          # spec strings
    ("GRADWATCH_SELECT", "preset:nonsense", "selection spec"),
])
def test_a_bad_variable_is_refused_naming_it(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as e:
        AgentConfig.from_env()
    assert f"invalid {variable}={value!r}" in str(e.value) and f"expected {expected}" in str(e.value)


def test_watch_raises_at_start_naming_the_variable(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("GRADWATCH_AGENT_QUEUE_SIZE", "lots")
    with pytest.raises(ConfigError, match=r"invalid GRADWATCH_AGENT_QUEUE_SIZE='lots': expected integer >= 1"):
        gradwatch.watch(torch.nn.Linear(2, 2))


def test_a_keyword_overrides_the_variable_unread(monkeypatch):
    monkeypatch.setenv("GRADWATCH_EVERY", "often")
    monkeypatch.setenv("GRADWATCH_COLLECTOR", "nowhere")
    config = AgentConfig.from_env(every=5, collector="127.0.0.1:1", token=None)
    assert (config.every, config.collector) == (5, "127.0.0.1:1")


def test_aliases_canonical_names_and_empty_values(monkeypatch):
    monkeypatch.setenv("GRADWATCH_EVERY", "3")
    monkeypatch.setenv("GRADWATCH_AGENT_HISTOGRAM", "off")
    monkeypatch.setenv("GRADWATCH_AGENT_TLS", "")  # empty: unset
    config = AgentConfig.from_env()
    assert (config.every, config.histogram, config.tls) == (3, False, False)
    monkeypatch.setenv("GRADWATCH_AGENT_EVERY", "4")
    assert AgentConfig.from_env().every == 4  # the canonical name wins


@pytest.mark.parametrize(("environment", "run"), [
    ({"GRADWATCH_RUN": "exp-1", "TORCHELASTIC_RUN_ID": "elastic"}, "exp-1"),
    ({"GRADWATCH_RUN": "", "TORCHELASTIC_RUN_ID": "elastic"}, "elastic"),
    ({"TORCHELASTIC_RUN_ID": "none"}, None),  # torchrun's default: no id given
    ({"GRADWATCH_AGENT_RUN": "exp-2", "GRADWATCH_RUN": "exp-1"}, "exp-2"),
])
def test_run_id_from_the_environment(monkeypatch, environment, run):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert AgentConfig.from_env().run == run


def test_token_is_not_in_repr_nor_in_messages(monkeypatch):
    assert "s3cret" not in repr(AgentConfig(token="s3cret"))
    monkeypatch.setenv("GRADWATCH_AGENT_EVERY", "s3cret")
    with pytest.raises(ConfigError) as e:
        AgentConfig.from_env()
    assert "GRADWATCH_AGENT_EVERY='s3cret'" in str(e.value)  # not a secret: shown


def test_reading_no_variable_imports_no_pydantic():
    """The agent lives in the user's process: pydantic comes in only when a variable is set."""
    code = ("import sys, gradwatch.agent.config as c; c.AgentConfig.from_env(); "
            "print('pydantic' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_") and k != "TORCHELASTIC_RUN_ID"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
