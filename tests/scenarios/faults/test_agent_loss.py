"""Reports an agent loses before delivery are not silent on the server side.

A training process whose collector is down longer than its queue holds drops reports (counted in its own
`counters.dropped`); its next delivered report says how many (`dropped_reports`). With the whole one-machine
stack as `gradwatch up` runs it (embedded Redis, real collector and aggregator processes), the aggregator must
count them, keep them with the run (`reports_lost` in the API), and raise AgentDataLost naming the run and the rank,
while the history holds exactly the steps that were delivered.
"""

from __future__ import annotations

import urllib.request

import pytest
import torch

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.cli.processes import wait_until
from gradwatch.cli.stack import Stack
from tests.scenarios.e2e.test_history_restart import api, config, steps_of

pytestmark = pytest.mark.e2e
RUN = "agent-loss"
DOWN_STEPS, UP_STEPS, QUEUE = 20, 10, 4


def metric(cfg, name: str) -> float | None:
    with urllib.request.urlopen(f"http://{cfg.aggregator_metrics_listen}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_reports_an_agent_dropped_while_the_collector_was_down_are_counted_and_alerted(tmp_path):
    cfg = config(tmp_path / "data")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = AgentConfig(collector=cfg.collector_listen, queue_size=QUEUE, batch_reports=2, host_slots=64,
                        export_interval_s=0.05, export_timeout_s=0.5)

    def train(w, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(16, 8)
            loss = torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss=loss)

    w = gradwatch.watch(model, opt, run=RUN, config=agent)
    try:
        train(w, DOWN_STEPS)  # nothing listens on the collector's port yet: the queue keeps the newest 4
        assert w.flush(0.5) is False
        with Stack(cfg):
            # What the queue kept goes first (the channel reconnects after its backoff); then one step at a time,
            # so a queue of 4 overflows no further however slow this machine is
            assert w.flush(60), w.counters
            for _ in range(UP_STEPS):
                train(w, 1)
                assert w.flush(30), w.counters
            c = w.counters
            lost = c.dropped + c.skipped_busy  # the outage's: the queue kept the newest 4 (and a batch out, retried)
            assert lost >= DOWN_STEPS - QUEUE - 2 and c.exported == DOWN_STEPS + UP_STEPS - lost, c

            delivered = DOWN_STEPS + UP_STEPS - lost
            steps = wait_until(lambda: (s := steps_of(cfg, RUN)) and len(s) == delivered and s, 30,
                               "the delivered steps in the history")
            # the newest steps of the outage survived in the queue, every step after it arrived
            assert steps == sorted(steps) and steps[-UP_STEPS:] == list(range(DOWN_STEPS, DOWN_STEPS + UP_STEPS))
            assert len(set(range(DOWN_STEPS)) - set(steps)) == lost

            run = api(cfg, f"/runs/{RUN}")
            assert run["reports_lost"] == lost
            (alert,) = [a for a in run["alerts"] if a["rule"] == "AgentDataLost"]
            assert alert["status"] == "firing" and alert["severity"] == "warning" and alert["value"] == lost
            assert f"rank 0 lost {lost} step reports" in alert["summary"] and RUN in alert["summary"]
            assert metric(cfg, "gradwatch_aggregator_agent_lost_total") == lost
            firing = api(cfg, f"/alerts?run={RUN}")["alerts"]
            assert any(a["rule"] == "AgentDataLost" for a in firing)  # from the durable alert stream
    finally:
        w.close(timeout=0.2)
