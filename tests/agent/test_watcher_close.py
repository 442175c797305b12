"""Watcher.close() is bounded: it returns within `shutdown_timeout_s` (default 1 s) whether or not the
collector answers, says in one warning line how many reports it could not deliver and where to, and still
delivers everything queued when the collector is up. Real sockets on 127.0.0.1: a refused port, a socket
that never answers, a real gRPC server."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.agent.config import DEFAULT_SHUTDOWN_TIMEOUT_S
from gradwatch.cli.processes import wait_until
from gradwatch.settings import ConfigError

STEPS = 12
LINE = re.compile(r"gradwatch: collector (?P<target>\S+) (?P<state>[^;]+); (?P<lost>\d+) reports not delivered "
                  r"at close \(timeout (?P<timeout>[\d.]+) s, see shutdown_timeout_s\)")


def run_steps(target: str, steps: int = STEPS, **changes) -> gradwatch.agent.Watcher:
    """A watcher that has queued `steps` reports for `target`; the long export interval keeps them all
    queued until close() (the only export attempts are close()'s own)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = AgentConfig(**{"collector": target, "export_interval_s": 60.0, **changes})
    w = gradwatch.watch(model, opt, run="close-budget", config=config)
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        w.step(loss=loss)
    return w


def timed_close(w, caplog) -> tuple[float, list[logging.LogRecord]]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        started = time.monotonic()
        w.close()
        elapsed = time.monotonic() - started
    return elapsed, [r for r in caplog.records if r.name.startswith("gradwatch")]


def test_the_default_budget_is_at_most_one_second():
    assert AgentConfig().shutdown_timeout_s == DEFAULT_SHUTDOWN_TIMEOUT_S <= 1.0


def test_close_with_an_unreachable_collector_returns_within_the_default_budget(unreachable, caplog):
    w = run_steps(unreachable)
    elapsed, records = timed_close(w, caplog)
    assert elapsed < 1.5, elapsed
    c = w.counters
    assert c.exported == 0 and c.dropped == c.captured == STEPS and c.internal_errors == 0
    (record,) = records  # one line: no per-export warning, no traceback
    assert record.levelno == logging.WARNING and record.exc_info is None
    message = record.getMessage()
    assert "\n" not in message
    match = LINE.fullmatch(message)
    assert match, message
    assert match["target"] == unreachable and int(match["lost"]) == STEPS and float(match["timeout"]) == 1.0
    # refused: UNAVAILABLE; never answered: the RPC was cancelled at the deadline or ran out of it
    assert match["state"] == ("unreachable (UNAVAILABLE)" if unreachable.endswith(":1") else "not answering")
    w.close()  # idempotent: no second wait, no second line
    assert [r for r in caplog.records if r.name.startswith("gradwatch")] == records


@pytest.mark.parametrize("budget", [0.3, 1.6])
def test_a_configured_budget_is_honoured(unreachable, caplog, budget):
    w = run_steps(unreachable, shutdown_timeout_s=budget)
    elapsed, records = timed_close(w, caplog)
    # The collector may come back while there is time: close() uses its budget, and not more.
    assert budget - 0.05 <= elapsed < budget + 0.5, (budget, elapsed)
    (record,) = records
    assert LINE.fullmatch(record.getMessage())["lost"] == str(STEPS)


def test_an_explicit_timeout_overrides_the_setting(blackhole, caplog):
    w = run_steps(blackhole, shutdown_timeout_s=30.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        started = time.monotonic()
        w.close(timeout=0.2)
        elapsed = time.monotonic() - started
    assert elapsed < 0.7, elapsed
    (record,) = caplog.records
    assert "timeout 0.2 s" in record.getMessage()


def test_an_export_in_flight_is_cancelled_at_the_deadline(blackhole, caplog):
    """The run's own export (10 s deadline) is stuck on a collector that never answers when close() starts:
    close() does not wait it out."""
    w = run_steps(blackhole, export_interval_s=0.05, export_timeout_s=10.0)
    time.sleep(0.3)  # the exporter thread is inside its RPC by now
    elapsed, records = timed_close(w, caplog)
    assert elapsed < 1.5, elapsed
    assert [LINE.fullmatch(r.getMessage())["lost"] for r in records] == [str(STEPS)]
    assert w.counters.dropped == w.counters.captured == STEPS


def test_close_delivers_what_is_queued_when_the_collector_is_up(ingest, caplog):
    w = run_steps(ingest.target)
    assert ingest.requests == []  # all still queued: close() has to send them
    elapsed, records = timed_close(w, caplog)
    assert elapsed < 1.0, elapsed
    assert [r.sequence for r in ingest.reports] == list(range(1, STEPS + 1))
    assert len(ingest.finals) == 1
    assert w.counters.exported == STEPS and w.counters.dropped == 0
    assert [r for r in records if r.levelno >= logging.WARNING] == []


def test_a_drop_before_close_is_told_in_the_same_line(caplog):
    """Reports the queue bound dropped during the run are in the count too, so the line says the whole loss."""
    w = run_steps("127.0.0.1:1", queue_size=4, batch_reports=2, shutdown_timeout_s=0.2)
    # The reader thread encodes steps off the training thread; on a loaded machine it may not have reached the
    # queue bound yet. Wait until it has (the queue holds 4, a batch out holds at most 2): the drops are then
    # the run's, not close()'s.
    wait_until(lambda: w.counters.dropped >= STEPS - 4 - 2, 10, "the queue bound dropping during the run")
    elapsed, records = timed_close(w, caplog)
    assert elapsed < 0.7
    (record,) = records
    # left at close: the 4 the queue holds, and the batch the run's own export held when close() began
    lost = int(re.search(r"; (\d+) reports not delivered at close, (\d+) in all this run \(", record.getMessage())[1])
    assert 4 <= lost < STEPS and f", {STEPS} in all this run (" in record.getMessage()
    assert w.counters.dropped == STEPS


SCRIPT = """
import time, torch, gradwatch
m = torch.nn.Linear(4, 4)
w = gradwatch.watch(m, run="close-stderr", collector="127.0.0.1:1")
for _ in range(5):
    m(torch.randn(2, 4)).sum().backward(); w.step(); m.zero_grad()
started = time.monotonic()
w.close()
print(f"{time.monotonic() - started:.3f}")
"""


def test_what_a_user_sees_on_stderr_is_one_line(tmp_path):
    """No logging configured (Python's last-resort handler prints warnings): the whole of stderr, gRPC's
    own output included, is the one line."""
    env = {**os.environ, "GRADWATCH_AGENT_EXPORT_INTERVAL_S": "60"}  # no export before close()
    env.pop("GRADWATCH_AGENT_SHUTDOWN_TIMEOUT_S", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 1.5, done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and LINE.fullmatch(lines[0]), done.stderr
    assert LINE.fullmatch(lines[0])["lost"] == "5"


def test_the_budget_from_the_environment_and_validated(monkeypatch):
    monkeypatch.setenv("GRADWATCH_AGENT_SHUTDOWN_TIMEOUT_S", "0.25")
    assert AgentConfig.from_env().validate().shutdown_timeout_s == 0.25
    for bad in ("0", "-1", "inf", "nan"):
        monkeypatch.setenv("GRADWATCH_AGENT_SHUTDOWN_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="GRADWATCH_AGENT_SHUTDOWN_TIMEOUT_S"):
            AgentConfig.from_env()
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="shutdown_timeout_s must be"):
            AgentConfig(shutdown_timeout_s=bad).validate()
