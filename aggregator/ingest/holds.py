"""Entries held unacknowledged while their step is open in a multi-rank run's join.

A rank's report of a step is one part of it: the step's merged row (aggregator/merge.py) is complete only
when every part is in. Acking the parts as they arrive would lose them to a crash or takeover before the step
closes: the new owner would close the step from the parts still pending, and the history row would lack the
rest. So a part joined into an open step stays pending in the stream; it is acknowledged, its totals counted
and its sequence number committed together with the step's history row, when the join closes the step
(complete, watermark, timeout or overflow). Until then the committed watermark of its rank stays below it,
so a new owner applies it again (docs/architecture.md#leases).

Held entries are this replica's pending entries: its own XAUTOCLAIM sweep must not take them back for a
repeat (`ids`). A step closes within join_timeout_s, so what is held is bounded by the ranks times the open
steps (join.MAX_OPEN_STEPS).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Held:
    stream: str
    entry_id: bytes | str
    rank: int
    sequence: int
    summaries: int


class Holds:
    """The held entries of the runs this replica follows. Not thread-safe: the consumer loop calls it."""

    def __init__(self) -> None:
        self._steps: dict[str, dict[int, list[Held]]] = {}  # run -> step -> entries of its parts
        self._ids: dict[str, set[bytes | str]] = {}         # stream -> ids held

    def hold(self, run: str, step: int, entry: Held) -> None:
        self._steps.setdefault(run, {}).setdefault(step, []).append(entry)
        self._ids.setdefault(entry.stream, set()).add(entry.entry_id)

    def release(self, run: str, step: int) -> list[Held]:
        """The entries of a step that closed: to be acked now."""
        steps = self._steps.get(run)
        entries = steps.pop(step, []) if steps else []
        for e in entries:
            ids = self._ids.get(e.stream)
            if ids is not None:
                ids.discard(e.entry_id)
        return entries

    def ids(self, stream: str) -> set[bytes | str]:
        return self._ids.get(stream, set())

    def below(self, run: str, marks: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        """`marks` (rank -> (start, high)) lowered below each rank's oldest held sequence: what may be committed."""
        lowest: dict[int, int] = {}
        for entries in self._steps.get(run, {}).values():
            for e in entries:
                if e.sequence > 0 and e.sequence <= lowest.get(e.rank, e.sequence):
                    lowest[e.rank] = e.sequence
        if not lowest:
            return marks
        return {rank: (start, min(high, lowest[rank] - 1) if rank in lowest else high)
                for rank, (start, high) in marks.items()}

    def count(self) -> int:
        return sum(len(ids) for ids in self._ids.values())

    def forget(self, run: str, stream: str) -> None:
        """The run is no longer followed: its held entries stay pending for whoever takes it next."""
        self._steps.pop(run, None)
        self._ids.pop(stream, None)
