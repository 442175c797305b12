"""Rank health with real ranks: three training processes (gloo on the loopback) report through a real gRPC
collector into a real Redis, read by a real aggregator running its loop; the alerts are read back from the
alert stream and the per-rank gauges from its metrics registry.

- Independent ranks (a process group, no collective per step), rank 1 sleeping longer each step:
  StragglerRank names rank 1 and gradwatch_rank_step_seconds shows its pace.
- DDP ranks, rank 1 sleeping longer: every rank waits for it at the all-reduce, so the ranks share one
  pace and no rank is named (the straggler slows the whole run instead).
- DDP ranks, rank 2 no longer calling watcher.step() for a while but still training: RankStalled names it
  while its peers go on, its report lag grows on /metrics, and its next report resolves the alert.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from datetime import timedelta

import pytest
import redis
import torch
from prometheus_client import generate_latest
from torch import nn

import gradwatch
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT
from tests.scenarios.distributed.ranks import run_ranks

WORLD_SIZE = 3
JOB_TIMEOUT_S = 60  # a hang guard only: each job takes a few seconds
STRAGGLER_S = 3.0   # how long each independent rank trains
SLOW_S = 0.1        # rank 1's pause after each step (0.01 s on the others)
LOCKSTEP_STEPS = 40
STALL_STEPS, SILENT = 200, range(40, 140)  # rank 2 calls no watcher.step() in these steps


def worker(rank: int, world_size: int, port: int, collector: str, mode: str, run: str) -> None:
    """One rank (a child process). The model is watched without the optimizer, so watcher.step(), called
    after backward, is the capture window: a rank that skips it sends nothing for that step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gradwatch.agent import AgentConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        if mode != "independent":
            model = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        config = AgentConfig(collector=collector, export_interval_s=0.1, host_slots=64)
        watcher = gradwatch.watch(model, run=run, config=config)
        data = torch.Generator().manual_seed(rank)
        pause = SLOW_S if rank == 1 and mode != "stall" else 0.01
        start, step = time.monotonic(), 0
        while (time.monotonic() - start < STRAGGLER_S if mode == "independent"
               else step < (LOCKSTEP_STEPS if mode == "lockstep" else STALL_STEPS)):
            loss = model(torch.randn(4, 8, generator=data)).pow(2).mean()
            loss.backward()
            if not (mode == "stall" and rank == 2 and step in SILENT):
                watcher.step(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            time.sleep(pause)
            step += 1
        watcher.close()
        if watcher.counters.dropped or watcher.counters.internal_errors:
            raise SystemExit(f"rank {rank}: unexpected counters {watcher.counters}")
        dist.barrier()  # no rank tears the group down while a peer still trains
    finally:
        dist.destroy_process_group()


@pytest.fixture
def stack(redis_url, start_collector, make_aggregator, tmp_path):
    """A collector and a running aggregator on one Redis; the aggregator's rules from `rules` (TOML)."""

    def start(rules: str):
        path = tmp_path / "rules.toml"
        path.write_text(rules)
        return start_collector(), make_aggregator(rules=str(path), keep_firing_s=0.0, discover_interval_s=0.25,
                                                      claim_interval_s=1.0).start()

    return start


def alerts(redis_url: str, run: str, rule: str) -> list[dict]:
    client = redis.Redis.from_url(redis_url)
    try:
        found = [json.loads(fields[FIELD_ALERT]) for _, fields in client.xrange(ALERTS_KEY)]
    finally:
        client.close()
    return [a for a in found if a["run"] == run and a["rule"] == rule]


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sample(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_straggler_among_independent_ranks_is_named(stack, redis_url, tmp_path):
    # A window longer than the 10 reports a pace spans: one slow first step (lazy initialisation) cannot fire it.
    collector, agg = stack("[StragglerRank]\nwindow = 12\n")
    run = "straggler-independent"
    run_ranks(__file__, WORLD_SIZE, tmp_path, JOB_TIMEOUT_S,
              lambda rank: [collector.target, "independent", run])

    fired = wait_for(lambda: [a for a in alerts(redis_url, run, "StragglerRank") if a["status"] == "firing"], 10,
                     "a StragglerRank alert")
    assert [a["rank"] for a in fired] == [1]
    assert fired[0]["value"] > 1.5 and fired[0]["threshold"] == 1.5
    assert fired[0]["summary"].startswith(f"Rank 1 on host {socket.gethostname()} is a straggler: ")
    # Its end-of-run marker resolves it.
    wait_for(lambda: [a for a in alerts(redis_url, run, "StragglerRank") if a["status"] == "resolved"], 10,
             "the StragglerRank alert resolved by rank 1's end-of-run marker")

    text = generate_latest(agg.registry).decode()
    paces = [sample(text, "gradwatch_rank_step_seconds", run=run, rank=r) for r in range(WORLD_SIZE)]
    assert None not in paces, text
    assert paces[1] > 1.5 * max(paces[0], paces[2]), paces
    assert sample(text, "gradwatch_rank_report_lag_seconds", run=run, rank=1) >= 0


def test_ddp_ranks_share_the_pace_of_a_slow_rank(stack, redis_url, tmp_path):
    """Synchronous data parallelism: rank 1's extra sleep delays every rank's all-reduce, so all report the
    same seconds per step and StragglerRank names no one."""
    collector, agg = stack("[StragglerRank]\nwindow = 12\n")
    run = "straggler-ddp"
    run_ranks(__file__, WORLD_SIZE, tmp_path, JOB_TIMEOUT_S, lambda rank: [collector.target, "lockstep", run])

    def paces():
        text = generate_latest(agg.registry).decode()
        return [sample(text, "gradwatch_rank_step_seconds", run=run, rank=r) for r in range(WORLD_SIZE)]
    # The last reports applied: every rank's pace over its last 10 steps.
    wait_for(lambda: agg.view().counters.get("reports", 0) >= WORLD_SIZE * LOCKSTEP_STEPS, 10, "every report")
    measured = paces()
    assert min(measured) > SLOW_S and max(measured) < 1.1 * min(measured), measured  # rank 1's pace, everywhere
    assert alerts(redis_url, run, "StragglerRank") == []


def test_rank_that_stops_reporting_while_ddp_peers_go_on_is_stalled(stack, redis_url, tmp_path):
    collector, agg = stack("[RankStalled]\ntimeout_s = 1.0\nmin_silence_s = 1.0\nmax_step_lag = 10\n")
    run = "stalled-ddp"
    seen: list[str] = []  # the metrics while RankStalled fires
    stop = threading.Event()

    def watch_metrics():
        while not stop.is_set() and not seen:
            if any(a.rule == "RankStalled" for a in agg.view().firing):
                seen.append(generate_latest(agg.registry).decode())
            stop.wait(0.05)
    scraper = threading.Thread(target=watch_metrics, name="test-scraper", daemon=True)
    scraper.start()
    try:
        run_ranks(__file__, WORLD_SIZE, tmp_path, JOB_TIMEOUT_S, lambda rank: [collector.target, "stall", run])
    finally:
        stop.set()
        scraper.join(5)

    transitions = wait_for(lambda: (found := alerts(redis_url, run, "RankStalled")) and found[-1]["status"] ==
                           "resolved" and found, 30, "RankStalled firing, then resolved")  # a loaded machine: catch-up
    assert [(a["status"], a["rank"]) for a in transitions] == [("firing", 2), ("resolved", 2)]
    fired = transitions[0]
    assert fired["step"] == SILENT.start - 1  # its last report before the silence
    assert fired["summary"].startswith(f"Rank 2 on host {socket.gethostname()} stopped reporting: nothing for ")
    assert "went on to step" in fired["summary"]
    assert "Rank 2 reports again" in transitions[1]["summary"]
    assert seen, "no scrape while RankStalled fired"
    lag = {r: sample(seen[0], "gradwatch_rank_report_lag_seconds", run=run, rank=r) for r in range(WORLD_SIZE)}
    assert lag[2] > 1.0 and lag[2] > lag[0] + 0.5, lag


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
