"""SequenceTracker: the redelivery idempotency key."""

from __future__ import annotations

from gradwatch.aggregator.ingest.sequence import SEQUENCE_WINDOW, SequenceTracker


def test_in_order_repeats_and_gaps():
    t = SequenceTracker()
    assert [t.first_time(s) for s in (1, 2, 3, 2, 3)] == [True, True, True, False, False]
    assert t.first_time(7)           # 4..6 dropped or pending elsewhere
    assert t.first_time(5) and not t.first_time(5)
    assert t.first_time(4) and t.first_time(6)
    assert not t.first_time(7)
    assert t.holes == set()


def test_unset_sequence_is_always_applied():
    t = SequenceTracker()
    assert t.first_time(0) and t.first_time(0)


def test_memory_is_bounded():
    t = SequenceTracker()
    for s in range(1, 50 * SEQUENCE_WINDOW, 2):  # every other report lost
        t.first_time(s)
    assert len(t.holes) <= 2 * SEQUENCE_WINDOW
    assert not t.first_time(2)  # too late to tell: treated as a repeat
