"""The agent's own counters: what happened to its reports, read by users and by the tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AgentCounters:
    """What happened to the agent's reports; all monotonic."""

    captured: int = 0          # reports queued: captured steps (statistics on the device) and evaluations
    exported: int = 0          # reports the collector acknowledged
    dropped: int = 0           # reports dropped: queue full or refused for good
    skipped_busy: int = 0      # logged steps skipped because every host slot was still in flight
    rejected: int = 0          # reports the collector refused one by one (partial success)
    export_errors: int = 0     # Export calls that failed after their retries
    internal_errors: int = 0   # agent bugs caught before they reached the training loop
    updates_over_budget: int = 0  # parameters whose updates are not watched: beyond updates_max_bytes (at watch)
    unscheduled: int = 0       # reports of steps that were not due, sent for their NaN/Inf origin or loss
    origin_unchecked: int = 0  # tensors the NaN/Inf origin check left out: past its per-step bound
