"""The whole stack stopped and started again on the same data dir (embedded Redis, append-only file): the
run, every one of its steps, its heatmap and its alerts are still there, with no new report."""

from __future__ import annotations

import json
import urllib.request

import pytest

from gradwatch.cli.processes import wait_until
from gradwatch.cli.redis_server import free_port
from gradwatch.cli.stack import Stack, StackConfig
from tests.scenarios.e2e.test_pipeline import train_with_blowup

pytestmark = pytest.mark.e2e
RUN = "e2e-history"
STEPS, BLOWUP = 215, 200


def config(data_dir) -> StackConfig:
    return StackConfig(data_dir=str(data_dir), collector_listen=f"127.0.0.1:{free_port()}",
                       collector_metrics_listen=f"127.0.0.1:{free_port()}",
                       aggregator_metrics_listen=f"127.0.0.1:{free_port()}", log_level="WARNING")


def api(cfg: StackConfig, path: str) -> dict:
    with urllib.request.urlopen(f"http://{cfg.aggregator_metrics_listen}/api/v1{path}", timeout=5) as r:
        return json.loads(r.read())["data"]


def steps_of(cfg: StackConfig, run: str) -> list[int]:
    """The run's steps as the API serves them; none while the run is unknown or the aggregator restarts."""
    try:
        return [s["step"] for s in api(cfg, f"/runs/{run}/steps")["steps"]]
    except OSError:  # 404 (not applied yet), or nothing listening
        return []


def test_a_stack_restarted_on_its_data_dir_serves_the_whole_run(tmp_path):
    cfg = config(tmp_path / "data")
    with Stack(cfg):
        watcher = train_with_blowup(cfg, RUN, STEPS, BLOWUP)
        assert watcher.counters.exported == STEPS
        wait_until(lambda: len(steps_of(cfg, RUN)) == STEPS, 30, "every step applied")
        before = api(cfg, f"/runs/{RUN}/steps")["steps"]
        wait_until(lambda: any(a["rule"] == "NonFinite" for a in api(cfg, f"/runs/{RUN}/alerts")["alerts"]), 20,
                   "the NonFinite alert")

    cfg = config(tmp_path / "data")  # the same data dir, fresh ports
    with Stack(cfg):
        wait_until(lambda: len(steps_of(cfg, RUN)) == STEPS, 30, "the run's steps after the restart")
        steps = api(cfg, f"/runs/{RUN}/steps")["steps"]
        assert [s["step"] for s in steps] == [s["step"] for s in before] == list(range(STEPS))
        assert steps[50]["layers"] == before[50]["layers"] and steps[50]["loss"] == before[50]["loss"]
        assert steps[-1]["loss"] == "NaN" and steps[-1]["layers"]["fc1"] == "NaN"
        run = api(cfg, f"/runs/{RUN}")
        assert run["step"] == STEPS - 1 and run["loss"] == "NaN"
        assert {layer["layer"] for layer in run["layers"]} >= {"fc1", "fc2", "fc3", "head"}
        heatmap = api(cfg, f"/runs/{RUN}/heatmap")
        assert heatmap["steps"][-1] == STEPS - 1 and len(heatmap["layers"]) >= 4
        rules = {a["rule"] for a in api(cfg, f"/runs/{RUN}/alerts")["alerts"]}
        assert {"ExplodingGradient", "NonFinite"} <= rules


def test_an_aggregator_killed_mid_run_comes_back_with_every_step(tmp_path):
    """Supervised as `gradwatch up` runs it: the aggregator SIGKILLed at step 30 of 80 is restarted, takes its
    run back when the dead one's lease expires, and the run's history holds every step once."""
    import threading

    import torch

    import gradwatch
    from gradwatch.agent import AgentConfig

    cfg = config(tmp_path / "data")
    stack = Stack(cfg).start()
    stop = threading.Event()
    thread = threading.Thread(target=stack.supervise, args=(stop,), daemon=True)
    thread.start()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        run = "e2e-killed"
        # Host slots to spare (as train_with_blowup): this loop outruns the agent's reader thread on 2 busy
        # cores, and the agent then skips a step rather than block the training thread (tests/agent covers
        # that); here the subject is the aggregator, and every step must arrive.
        agent = AgentConfig(collector=cfg.collector_listen, host_slots=64)
        with gradwatch.watch(model, opt, run=run, config=agent) as w:
            for step in range(80):
                if step == 30:
                    wait_until(lambda: len(steps_of(cfg, run)) >= 20, 20, "steps applied")
                    killed = stack.process("aggregator")
                    killed.kill()
                x = torch.randn(16, 8)
                loss = torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.step(loss=loss)
        c = w.counters
        assert (c.exported, c.dropped, c.skipped_busy) == (80, 0, 0), c
        wait_until(lambda: stack.restarts.get("aggregator") == 1 and stack.process("aggregator") is not killed, 10,
                   "the aggregator restarted")
        wait_until(lambda: steps_of(cfg, run) == list(range(80)), 90, "every step in the history after the restart")
    finally:
        stop.set()
        thread.join(10)
        stack.stop()
