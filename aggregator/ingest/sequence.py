"""Which step reports of one agent were already applied: the idempotency key on redelivery.

An agent numbers its reports 1, 2, 3, ... (sent or dropped), so a high watermark plus the set of
numbers below it not seen yet identifies every repeat in bounded memory.
"""

from __future__ import annotations

# Reports arriving more than this many sequence numbers late count as duplicates: bounds the memory
# of the "not seen yet" set per rank while covering any realistic redelivery delay.
SEQUENCE_WINDOW = 4_096


class SequenceTracker:
    """Which sequence numbers of one agent were applied: a high watermark plus the holes below it.

    Sequences mostly arrive in order, so the hole set is usually empty; it only holds reports not seen
    yet (dropped by the agent, or pending with a dead consumer) within SEQUENCE_WINDOW."""

    __slots__ = ("high", "holes")

    def __init__(self) -> None:
        self.high = 0
        self.holes: set[int] = set()

    def first_time(self, seq: int) -> bool:
        if seq == 0:
            return True  # unset: cannot be deduplicated, and applying twice beats losing it
        if seq > self.high:
            self.holes.update(range(max(self.high + 1, seq - SEQUENCE_WINDOW), seq))
            self.high = seq
            if len(self.holes) > 2 * SEQUENCE_WINDOW:
                self.holes = {h for h in self.holes if h > seq - SEQUENCE_WINDOW}
            return True
        if seq in self.holes:
            self.holes.discard(seq)
            return True
        return False
