"""Shared fixtures: a real redis-server per test session (flushed per test) and free ports; the fixtures of
each component (tests/fixtures/) are plugins, so unit tests and scenario tests (tests/scenarios/) share them."""

from __future__ import annotations

import pytest
import redis

from gradwatch.cli.redis_server import RedisServer, free_port

pytest_plugins = ["tests.fixtures.agent", "tests.fixtures.aggregator", "tests.fixtures.collector"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """URL of a real, empty Redis."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def port():
    return free_port()
