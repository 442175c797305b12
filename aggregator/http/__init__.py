"""The aggregator's HTTP surface: /metrics, the JSON query API, the live view (page, SSE) and snapshot requests."""
