"""AggregatorConfig: defaults, environment overrides, validation messages."""

from __future__ import annotations

import dataclasses

import pytest

from gradwatch.aggregator import config as cfg
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.settings import ConfigError


def test_defaults_are_valid():
    c = AggregatorConfig().validate()
    assert (c.redis_url, c.metrics_listen, c.alertmanager_url) == ("redis://127.0.0.1:6379/0", "127.0.0.1:4772", None)
    assert (c.block_ms, c.read_count, c.claim_idle_ms, c.claim_interval_s) == (200, 500, 30_000, 5)
    assert (c.exploding_abs_limit, c.exploding_ratio, c.exploding_window, c.exploding_min_history) == (1e4, 10, 50, 10)
    assert (c.cooldown_steps, c.resolve_after_steps, c.max_layer_series, c.run_expiry_s) == (50, 5, 5_000, 3600)
    assert c.keep_firing_s == 300
    assert c.consumer.endswith(f"-{__import__('os').getpid()}")
    assert c.metrics_address() == ("127.0.0.1", 4772)


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("GRADWATCH_REDIS_URL", "redis://redis:6379/2")
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_METRICS_LISTEN", "0.0.0.0:9000")
    monkeypatch.setenv("GRADWATCH_ALERTMANAGER_URL", "http://am:9093")
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_EXPLODING_RATIO", "20")
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_BLOCK_MS", "")  # empty: unset
    c = AggregatorConfig.from_env().validate()
    assert (c.redis_url, c.metrics_listen, c.alertmanager_url) == ("redis://redis:6379/2", "0.0.0.0:9000",
                                                                   "http://am:9093")
    assert c.exploding_ratio == 20.0 and c.block_ms == cfg.DEFAULT_BLOCK_MS
    assert c.metrics_address() == ("0.0.0.0", 9000)


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("GRADWATCH_AGGREGATOR_LEASE_TTL_MS", "abc", "integer >= 0"),             # int
    ("GRADWATCH_AGGREGATOR_BLOCK_MS", "not-a-number", "integer >= 0"),
    ("GRADWATCH_AGGREGATOR_READ_COUNT", "0", "integer >= 1"),
    ("GRADWATCH_AGGREGATOR_EXPLODING_RATIO", "1", "number > 1"),              # float
    ("GRADWATCH_AGGREGATOR_KEEP_FIRING_S", "nan", "number >= 0"),
    ("GRADWATCH_AGGREGATOR_CLAIM_INTERVAL_S", "5s", "number >= 0"),
    ("GRADWATCH_AGGREGATOR_METRICS_LISTEN", "localhost", "host:port"),        # host:port
    ("GRADWATCH_REDIS_URL", "localhost:6379", "redis://, rediss://, unix:// URL"),  # URL
    ("GRADWATCH_ALERTMANAGER_URL", "am:9093", "http://, https:// URL"),
    ("GRADWATCH_AGGREGATOR_WEBHOOK_URL", "https://", "http://, https:// URL"),
    ("GRADWATCH_AGGREGATOR_RULES", "/no/such/rules.toml", "path of a readable file"),  # path
])
def test_a_bad_variable_is_refused_naming_it(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as e:
        AggregatorConfig.from_env()
    assert f"invalid {variable}={value!r}: expected {expected}" in str(e.value)


def test_a_secret_stays_out_of_the_message(monkeypatch):
    monkeypatch.setenv("GRADWATCH_REDIS_URL", "http://user:pa55word@redis:6379")
    with pytest.raises(ConfigError) as e:
        AggregatorConfig.from_env()
    assert "pa55word" not in str(e.value) and "user:***@redis" in str(e.value)


def test_a_flag_given_skips_its_variable(monkeypatch):
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_METRICS_LISTEN", "nonsense")
    assert AggregatorConfig.from_env(metrics_listen="127.0.0.1:9999").metrics_listen == "127.0.0.1:9999"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("redis_url", "http://x", "GRADWATCH_REDIS_URL"),
    ("metrics_listen", "4772", "host:port"),
    ("metrics_listen", "host:99999", "GRADWATCH_AGGREGATOR_METRICS_LISTEN"),
    ("alertmanager_url", "am:9093", "http(s)://"),
    ("read_count", 0, ">= 1"),
    ("exploding_ratio", 1.0, "> 1"),
    ("exploding_min_history", 60, "at most exploding_window"),
    ("claim_interval_s", float("nan"), "seconds"),
    ("consumer", "", "non-empty"),
    ("webhook_url", "hooks.example/gradwatch", "http(s)://"),
    ("webhook_queue_size", 0, ">= 1"),
    ("webhook_retries", -1, ">= 0"),
    ("webhook_timeout_s", 0.0, "> 0"),
])
def test_invalid_values_name_the_setting(field, value, message):
    with pytest.raises(ConfigError, match=field) as e:
        dataclasses.replace(AggregatorConfig(), **{field: value}).validate()
    assert message in str(e.value)


def test_ipv6_listen_address():
    assert AggregatorConfig(metrics_listen="[::1]:4772").metrics_address() == ("::1", 4772)


def test_webhook_from_environment_and_its_token_kept_secret(monkeypatch):
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_WEBHOOK_URL", "https://hooks.example/gradwatch")
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_WEBHOOK_TOKEN", "s3cr3t")
    c = AggregatorConfig.from_env().validate()
    assert (c.webhook_url, c.webhook_token) == ("https://hooks.example/gradwatch", "s3cr3t")
    assert "s3cr3t" not in repr(c)
    with pytest.raises(ConfigError, match="GRADWATCH_AGGREGATOR_WEBHOOK_TOKEN") as e:
        dataclasses.replace(c, webhook_token="s3cr3t\n").validate()
    assert "s3cr3t" not in str(e.value)


def test_cluster_mode_is_the_shared_variable_or_the_flag(monkeypatch):
    from gradwatch.aggregator.__main__ import build_parser
    from gradwatch.settings import given_flags

    assert AggregatorConfig().redis_cluster is False
    monkeypatch.setenv("GRADWATCH_REDIS_CLUSTER", "yes")  # the collector's variable too: one switch for both
    assert AggregatorConfig.from_env().validate().redis_cluster is True
    args = build_parser().parse_args(["--no-redis-cluster"])  # what `gradwatch up` gives its embedded Redis
    assert AggregatorConfig.from_env(**given_flags(AggregatorConfig, args)).redis_cluster is False
    monkeypatch.delenv("GRADWATCH_REDIS_CLUSTER")
    args = build_parser().parse_args(["--redis-cluster"])
    assert AggregatorConfig.from_env(**given_flags(AggregatorConfig, args)).redis_cluster is True


@pytest.mark.parametrize(("url", "message"), [
    ("unix:///run/redis.sock", "reached over TCP"),
    ("redis://:pa55word@node-1:7000/2", "only database 0"),
])
def test_a_cluster_url_must_name_a_node_over_tcp(url, message):
    with pytest.raises(ConfigError, match="GRADWATCH_REDIS_CLUSTER") as e:
        AggregatorConfig(redis_url=url, redis_cluster=True).validate()
    assert message in str(e.value) and "pa55word" not in str(e.value)
    AggregatorConfig(redis_url=url).validate()  # fine for one Redis
    AggregatorConfig(redis_url="rediss://node-1:7000", redis_cluster=True).validate()
