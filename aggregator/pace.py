"""Each rank's pace: seconds per optimizer step from the capture times of its recent training reports, and
the capture time of its latest one. /metrics reads it over the state at scrape time (`rank_paces`); the
rank-health rules (rules/stragglers.py) keep their own recent reports and derive the pace the same way
(`seconds_per_step`), so an alert and the gauge agree."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.aggregator.state import State


@dataclass(frozen=True, slots=True)
class RankPace:
    rank: int
    seconds_per_step: float | None  # None until two training reports of increasing steps
    last_capture: float             # capture time of the rank's latest training report (the agent's clock)


def seconds_per_step(recent: Sequence[tuple[float, int]]) -> float | None:
    """recent: (capture time, step) of a rank's latest training reports, oldest first, steps increasing.
    Steps between two reports that were not logged (every N-th step) count: it is time over steps."""
    if len(recent) < 2:
        return None
    (t0, s0), (t1, s1) = recent[0], recent[-1]
    return (t1 - t0) / (s1 - s0) if s1 > s0 and t1 >= t0 else None


def rank_paces(state: State) -> dict[str, tuple[RankPace, ...]]:
    """run -> the pace of each rank that sent a training report (RankState.rate), by rank. Called under the
    aggregator's lock; the result holds no reference into the state."""
    return {run: tuple(RankPace(rank, seconds_per_step(rs.rate), rs.rate[-1][0])
                       for rank, rs in sorted(run_state.ranks.items()) if rs.rate)
            for run, run_state in state.runs.items()}
