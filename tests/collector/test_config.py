"""CollectorConfig: defaults, environment overrides, and validate() refusing what cannot work."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from gradwatch.collector.__main__ import add_arguments, config_from_args
from gradwatch.collector.config import CollectorConfig, parse_host_port, redact_url
from gradwatch.settings import ConfigError


def test_defaults_are_valid():
    config = CollectorConfig().validate()
    assert config.listen == "127.0.0.1:4770"
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.stream_maxlen == 1_000_000  # a hard cap: the aggregator trims what it applied
    assert config.max_message_bytes == 4 * 1024 * 1024
    assert config.max_inflight_bytes == 64 * 1024 * 1024
    assert config.token is None
    assert config.metrics_listen == "127.0.0.1:4771"


def test_from_env(monkeypatch):
    monkeypatch.setenv("GRADWATCH_COLLECTOR_LISTEN", "0.0.0.0:5000")
    monkeypatch.setenv("GRADWATCH_REDIS_URL", "redis://redis:6379/1")
    monkeypatch.setenv("GRADWATCH_STREAM_MAXLEN", "500")
    monkeypatch.setenv("GRADWATCH_MAX_MESSAGE_BYTES", "1000")
    monkeypatch.setenv("GRADWATCH_MAX_INFLIGHT_BYTES", "2000")
    monkeypatch.setenv("GRADWATCH_TOKEN", "t0ken")
    monkeypatch.setenv("GRADWATCH_COLLECTOR_METRICS_LISTEN", "")
    config = CollectorConfig.from_env().validate()
    assert (config.listen, config.redis_url, config.stream_maxlen) == ("0.0.0.0:5000", "redis://redis:6379/1", 500)
    assert (config.max_message_bytes, config.max_inflight_bytes) == (1000, 2000)
    assert config.token == "t0ken"
    assert config.metrics_listen == ""  # empty disables /metrics instead of falling back to the default


def test_redis_cluster_from_env_and_flags(monkeypatch):
    assert CollectorConfig().redis_cluster is False
    monkeypatch.setenv("GRADWATCH_REDIS_CLUSTER", "yes")
    assert CollectorConfig.from_env().redis_cluster is True
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).redis_cluster is True
    assert config_from_args(parser.parse_args(["--no-redis-cluster"])).redis_cluster is False
    monkeypatch.delenv("GRADWATCH_REDIS_CLUSTER")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--redis-cluster"])).redis_cluster is True
    CollectorConfig(redis_cluster=True, redis_url="rediss://node:6379").validate()  # no database: 0


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("GRADWATCH_STREAM_MAXLEN", "lots", "integer > 0"),                  # int (an alias)
    ("GRADWATCH_COLLECTOR_STREAM_MAXLEN", "0", "integer > 0"),
    ("GRADWATCH_COLLECTOR_MAX_INFLIGHT_BYTES", "1.5", "integer > 0"),
    ("GRADWATCH_COLLECTOR_RETRY_AFTER_S", "soon", "number >= 0 and <= 3600"),  # float
    ("GRADWATCH_COLLECTOR_RETRY_AFTER_S", "7200", "number >= 0 and <= 3600"),
    ("GRADWATCH_REDIS_CLUSTER", "maybe", "1/0, true/false, yes/no, on/off"),  # bool
    ("GRADWATCH_COLLECTOR_LISTEN", "4770", "host:port"),                 # host:port
    ("GRADWATCH_COLLECTOR_METRICS_LISTEN", "localhost:http", "host:port"),
    ("GRADWATCH_REDIS_URL", "http://redis:6379", "redis://, rediss://, unix:// URL"),  # URL
    ("GRADWATCH_COLLECTOR_TLS_CERT", "/no/such/cert.pem", "path of a readable file (no such file)"),  # path
    ("GRADWATCH_COLLECTOR_TLS_CLIENT_CA_FILE", "/", "path of a readable file (not a file)"),
])
def test_from_env_refuses_a_bad_value_naming_the_variable(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as e:
        CollectorConfig.from_env()
    assert f"invalid {variable}={value!r}" in str(e.value) and f"expected {expected}" in str(e.value)


def test_old_names_are_aliases_and_the_canonical_name_wins(monkeypatch):
    monkeypatch.setenv("GRADWATCH_STREAM_MAXLEN", "500")
    monkeypatch.setenv("GRADWATCH_COLLECTOR_TLS_CERT", "")  # empty: unset
    assert CollectorConfig.from_env().stream_maxlen == 500
    monkeypatch.setenv("GRADWATCH_COLLECTOR_STREAM_MAXLEN", "600")
    assert CollectorConfig.from_env().stream_maxlen == 600


def test_a_flag_overrides_and_mends_a_bad_variable(monkeypatch):
    monkeypatch.setenv("GRADWATCH_COLLECTOR_LISTEN", "no-port")
    monkeypatch.setenv("GRADWATCH_STREAM_MAXLEN", "700")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match="GRADWATCH_COLLECTOR_LISTEN='no-port'"):
        config_from_args(parser.parse_args([]))
    config = config_from_args(parser.parse_args(["--listen", "127.0.0.1:5000", "--stream-maxlen", "800"]))
    assert (config.listen, config.stream_maxlen) == ("127.0.0.1:5000", 800)


def test_a_bad_variable_stops_the_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    proc = subprocess.run([sys.executable, "-m", "gradwatch.collector"], capture_output=True, text=True, timeout=30,
                          env={**env, "GRADWATCH_COLLECTOR_MAX_INFLIGHT_BYTES": "lots"})
    assert proc.returncode == 1
    assert "invalid GRADWATCH_COLLECTOR_MAX_INFLIGHT_BYTES='lots': expected integer > 0" in proc.stderr


def test_token_is_not_in_repr():
    assert "s3cret" not in repr(CollectorConfig(token="s3cret"))


@pytest.mark.parametrize(("change", "message"), [
    ({"listen": "4770"}, "listen must be host:port"),
    ({"listen": "localhost:"}, "listen must be host:port"),
    ({"listen": ":4770"}, "listen must be host:port"),
    ({"listen": "127.0.0.1:99999"}, "listen must be host:port"),
    ({"listen": "[::1:4770"}, "unbalanced IPv6 bracket"),
    ({"metrics_listen": "nope"}, "metrics listen must be host:port"),
    ({"redis_url": "http://x:6379"}, "must start with redis://"),
    ({"stream_maxlen": 0}, "stream_maxlen must be a positive integer"),
    ({"max_message_bytes": -1}, "max_message_bytes must be a positive integer"),
    ({"max_reports_per_request": 0}, "max_reports_per_request"),
    ({"max_tensors_per_report": 0}, "max_tensors_per_report"),
    ({"max_string_bytes": 0}, "max_string_bytes"),
    ({"max_inflight_bytes": 1024}, "max_inflight_bytes (1024) must be at least max_message_bytes"),
    ({"redis_timeout_s": 0.0}, "redis_timeout_s must be positive"),
    ({"redis_cluster": True, "redis_url": "unix:///tmp/redis.sock"}, "Redis Cluster is reached over TCP"),
    ({"redis_cluster": True, "redis_url": "redis://h:6379/1"}, "Redis Cluster has only database 0"),
    ({"token": ""}, "token must not be empty"),
    ({"token": "two words"}, "token must be printable ASCII without spaces"),
    ({"token": "clé"}, "token must be printable ASCII"),
])
def test_validate_refuses(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(CollectorConfig(), **change).validate()


@pytest.mark.parametrize("listen", ["0.0.0.0:4770", "[::]:4770", "localhost:0", "[::1]:1"])
def test_validate_accepts_addresses(listen):
    CollectorConfig(listen=listen, metrics_listen="").validate()


def test_parse_host_port():
    assert parse_host_port("[::1]:4770") == ("::1", 4770)
    assert parse_host_port("127.0.0.1:0") == ("127.0.0.1", 0)


def test_redact_url_hides_the_password():
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
