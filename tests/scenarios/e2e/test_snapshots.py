"""End to end: the live view's snapshot request reaches a real training loop and its answer comes back
(agent -> collector -> redis-server -> aggregator API, real processes), behind the aggregator's API token."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.cli.redis_server import RedisServer
from gradwatch.cli.stack import Stack
from tests.scenarios.e2e.test_pipeline import stack_config

pytestmark = pytest.mark.e2e
TOKEN = "e2e-token"


def call(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


def test_snapshot_requested_over_the_api_arrives_within_a_few_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_API_TOKEN", TOKEN)  # the aggregator process inherits it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 16, 16)
    with RedisServer(tmp_path / "redis") as server:
        cfg = stack_config(server.url)
        with Stack(cfg):
            base = f"http://{cfg.aggregator_metrics_listen}/api/v1/runs/e2e-snap"
            w = gradwatch.watch(model, opt, run="e2e-snap",
                                config=AgentConfig(collector=cfg.collector_listen, export_interval_s=0.05))
            step, rid, asked_at, deadline = 0, None, None, time.monotonic() + 60
            snap = None
            while time.monotonic() < deadline:
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                w.step()
                step += 1
                time.sleep(0.05)
                if rid is None:
                    if call(base)[0] != 200:
                        continue  # the aggregator has not seen the run yet
                    assert call(base + "/snapshots", {"kind": "feature_maps", "tensor": "0"})[0] == 401
                    status, doc = call(base + "/snapshots", {"kind": "feature_maps", "tensor": "0"}, TOKEN)
                    assert status == 202, doc
                    rid, asked_at = doc["data"]["id"], step
                    continue
                status, doc = call(f"{base}/snapshots/{rid}")
                if status == 200:
                    snap = doc["data"]
                    break
            w.close()
    assert snap is not None, "no snapshot within 60 s"
    assert snap["kind"] == "feature_maps" and snap["error"] is None
    assert (snap["maps"], snap["rows"], snap["cols"], snap["shape"]) == (8, 14, 14, [4, 8, 14, 14])
    assert len(snap["values"]) == 8 * 14 * 14
    assert asked_at <= snap["step"] <= step
    print(f"snapshot arrived {step - asked_at} steps after the request")

