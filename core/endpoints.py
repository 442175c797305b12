"""Default network endpoints: where each component listens, where agents send, which Redis.

    4770  collector gRPC       agents export to it    AgentConfig.collector, CollectorConfig.listen
    4771  collector /metrics   its own metrics        CollectorConfig.metrics_listen
    4772  aggregator HTTP      /metrics, API, UI      AggregatorConfig.metrics_listen
    6379  Redis (database 0)   the report streams     CollectorConfig.redis_url, AggregatorConfig.redis_url

`gradwatch up` (core/cli/stack.py) starts the stack on the same addresses. Each config module keeps its
DEFAULT_* names, derived from these; the deploy/ manifests and the docs spell the ports out.
"""

from __future__ import annotations

HOST = "127.0.0.1"  # loopback: nothing is exposed unless an address is given

COLLECTOR_PORT = 4770
COLLECTOR_METRICS_PORT = 4771
AGGREGATOR_PORT = 4772

COLLECTOR = f"{HOST}:{COLLECTOR_PORT}"
COLLECTOR_METRICS = f"{HOST}:{COLLECTOR_METRICS_PORT}"
AGGREGATOR = f"{HOST}:{AGGREGATOR_PORT}"
REDIS_URL = f"redis://{HOST}:6379/0"
