"""CollectorConfig: defaults, environment overrides, and validate() refusing what cannot work."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from gradwatch.collector import config as cfg
from gradwatch.collector.__main__ import add_arguments, config_from_args
from gradwatch.collector.config import CollectorConfig, parse_host_port, redact_url
from gradwatch.settings import ConfigError


def test_defaults_are_valid():
    config = CollectorConfig().validate()
    assert config.listen == "127.0.0.1:4770"
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.stream_maxlen == 100_000
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


def test_from_env_ignores_an_invalid_number(monkeypatch, caplog):
    monkeypatch.setenv("GRADWATCH_STREAM_MAXLEN", "lots")
    assert CollectorConfig.from_env().stream_maxlen == cfg.DEFAULT_STREAM_MAXLEN
    assert "GRADWATCH_STREAM_MAXLEN" in caplog.text


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
