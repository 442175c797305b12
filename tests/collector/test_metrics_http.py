"""The collector's own /metrics port behind its read token (collector/metrics_http.py), on a real collector."""

from __future__ import annotations

import urllib.error
import urllib.request

TOKEN = "agent-token-0123456789"
READ = "read-token-0123456789"


def get(url: str, token: str | None = None) -> tuple[int, str, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_metrics_need_the_read_token_when_one_is_set(start_collector):
    collector = start_collector(metrics_listen="0.0.0.0:0", read_token=READ, token=TOKEN)
    url = f"http://127.0.0.1:{collector.server.metrics_port}/metrics"
    for token in (None, TOKEN, READ[:-1]):  # the agents' token does not read
        status, body, headers = get(url, token)
        assert status == 401 and "read token" in body and headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = get(url, READ)
    assert status == 200
    assert 'gradwatch_collector_refused_total{reason="metrics_unauthenticated"} 3.0' in body
