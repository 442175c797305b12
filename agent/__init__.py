"""gradwatch.agent: in-process telemetry for a training job.

    watcher = gradwatch.watch(model, optimizer, run="my-run")
    for x, y in data:
        watcher.observe_inputs(x, labels=y)  # optional: input statistics and class counts
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        watcher.step(loss=loss)        # tensors are fine: no host sync
    watcher.step(phase="eval", loss=val_loss, accuracy=val_acc)
    watcher.close()

Lightning and Hugging Face Trainer callbacks: gradwatch.agent.integrations.lightning, gradwatch.agent.integrations.hf.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from gradwatch.agent.config import AgentConfig
from gradwatch.agent.export.counters import AgentCounters
from gradwatch.streams import RUN_ID_MAX_CHARS, run_id_part

if TYPE_CHECKING:
    from gradwatch.agent.watcher import Watcher

__all__ = ["AgentConfig", "AgentCounters", "Watcher", "watch"]


def watch(model, optimizer=None, *, run: str | None = None, collector: str | None = None, every: int | None = None,
          token: str | None = None, select: str | None = None, schedule: str | None = None,
          hyperparameters: Mapping[str, object] | None = None, labels: Mapping[str, str] | None = None,
          config: AgentConfig | None = None) -> Watcher:
    """Watch every parameter and gradient of `model`; returns a Watcher (also a context manager).

    run: run id shared by all ranks (default: $GRADWATCH_RUN, torchrun's $TORCHELASTIC_RUN_ID, or a
    generated one). collector: host:port (default $GRADWATCH_COLLECTOR or 127.0.0.1:4770).
    every: log every N-th optimizer step (default 1). schedule: a schedule spec instead, e.g.
    "dense:100,every:10+burst:50" (agent/capture/schedule.py). select: what to watch, e.g. "preset:business" or
    "exclude:*.bias,types:Linear" (agent/capture/select.py). After a local NaN/Inf the agent captures every step
    for `burst_steps` (default 50) steps. On every step, due or not, it also checks every leaf module's output
    and output gradient on the device and reports where a NaN/Inf was born (agent/capture/origin.py; off with
    select "origin:off" or GRADWATCH_AGENT_ORIGIN=0).
    """
    cfg = config or AgentConfig.from_env(collector=collector, every=every, token=token, select=select,
                                         schedule=schedule)
    cfg.validate()
    from gradwatch.agent.watcher import Watcher

    return Watcher(model, optimizer, run or cfg.run or default_run_id(), cfg, hyperparameters, labels)


def __getattr__(name: str):
    # The watcher (and torch) load on first use: the agent's config, gradcheck's defaults and the CLI import
    # this package without training anything.
    if name == "Watcher":
        from gradwatch.agent.watcher import Watcher

        return Watcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_run_id() -> str:
    explicit = os.environ.get("GRADWATCH_RUN") or os.environ.get("TORCHELASTIC_RUN_ID")
    if explicit and explicit != "none":
        return explicit
    script = os.path.splitext(os.path.basename(sys.argv[0] or "python"))[0] or "run"
    suffix = f"-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return run_id_part(script, RUN_ID_MAX_CHARS - len(suffix)) + suffix  # a valid id (gradwatch.streams)
