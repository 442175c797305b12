"""The aggregator's collection policy (aggregator/gcpolicy.py) with a real aggregator and Redis: a full collection
freezes what it leaves, garbage cycles made after it are still collected (and those that died frozen after the
periodic whole-heap pass), the aggregator's own state of a run frees itself without the cycle collector, and a
multi-rank step's frames hold no rank's report. Not timed: benchmarks/aggregator_gc.py measures the pauses."""

from __future__ import annotations

import gc
import weakref

import pytest

from gradwatch.aggregator import gcpolicy
from gradwatch.aggregator.merge import Merged
from gradwatch.v1 import report_pb2, run_pb2
from tests.fixtures.aggregator import drain, full_tensors, registration_of, report_of, summary_of

RUN = "gc"


class Node:
    """Something a cycle can be made of, and watched through a weak reference."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref:
    """A garbage cycle: two objects that only reference each other; the weak reference says whether it is freed."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def in_a_generation(obj) -> bool:
    """Whether the collector would walk `obj` (gc.get_objects() lists the three generations, not the frozen)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture
def policy():
    """The policy as the aggregator's start installs it; removed, and everything unfrozen, after the test."""
    gc.collect()
    installed = gcpolicy.install(3600.0)
    yield installed
    gcpolicy.uninstall()
    gc.collect()


@pytest.fixture
def aggregator(make_aggregator, publish):
    """An aggregator that applied three steps of a two-rank run (sharded weights, per-rank activations): joined,
    merged over the ranks, with frames, history rows and a latest joined step."""
    tensors = full_tensors(model_partition=run_pb2.PARTITION_SHARDED)
    for rank in (0, 1):
        publish.registration(registration_of(tensors, run=RUN, rank=rank, world_size=2))
    agg = make_aggregator()
    for step in range(3):
        for rank in (0, 1):
            summaries = [summary_of(t.id, [0.5 + rank, -1.0 - step, 2.0 ** -(t.id % 7)]) for t in tensors]
            publish.report(report_of(step, summaries, run=RUN, rank=rank))
    drain(agg)
    assert agg.state.runs[RUN].last_joined.step == 2
    return agg


def test_a_full_collection_freezes_the_aggregators_state_and_later_cycles_are_still_collected(policy, aggregator):
    rs = aggregator.state.runs[RUN]
    gc.collect()  # a full collection: what it leaves goes to the permanent generation
    assert policy.freezes >= 1 and gc.get_freeze_count() > 0
    assert gc.is_tracked(rs.ranks) and not in_a_generation(rs.ranks)  # tracked, but no collection walks it again
    assert not in_a_generation(aggregator.state)

    dead = cycle()  # garbage made after the freeze
    gc.collect()
    assert dead() is None

    dead = cycle()  # ... and garbage of the youngest generation, collected without a full collection
    gc.collect(0)
    assert dead() is None


def test_a_cycle_that_dies_frozen_is_collected_after_the_whole_heap_pass(policy):
    now = [0.0]
    policy.clock = lambda: now[0]
    policy.rescan_at = 100.0
    node = Node()
    node.other = node
    survivor = weakref.ref(node)
    gc.collect()  # the cycle is alive: frozen with everything else
    del node
    gc.collect()
    assert survivor() is not None  # died frozen: no full collection walks it...
    now[0] = 100.0
    gc.collect()  # ... until the pass every full_scan_s hands the frozen objects back
    assert policy.rescans == 1 and gc.get_freeze_count() == 0
    gc.collect()  # this one walks everything once, frees the dead cycle and freezes the rest again
    assert survivor() is None and gc.get_freeze_count() > 0 and policy.rescan_at == 100.0 + policy.full_scan_s


def test_install_is_idempotent_and_uninstall_hands_everything_back(policy):
    assert gcpolicy.install(60.0) is policy and policy.full_scan_s == 60.0
    assert sum(1 for c in gc.callbacks if isinstance(c, gcpolicy.FreezeSurvivors)) == 1
    gc.collect()
    assert gc.get_freeze_count() > 0
    gcpolicy.uninstall()
    gcpolicy.uninstall()
    assert gc.get_freeze_count() == 0 and policy not in gc.callbacks
    assert gcpolicy.install(0) is None and not any(isinstance(c, gcpolicy.FreezeSurvivors) for c in gc.callbacks)


def test_a_run_the_aggregator_lets_go_of_frees_itself_without_the_cycle_collector(aggregator):
    """What the policy relies on: frozen state that dies is freed by reference counting, so the aggregator's own
    structures must hold no cycles. The run's state, its frames and its joined steps go the moment it is dropped."""
    state = weakref.ref(aggregator.state.runs[RUN])
    gc.collect()
    gc.disable()
    try:
        aggregator._drop(RUN, "the test lets go of it")  # noqa: SLF001 - what a lost lease or a rollback does
        assert state() is None and RUN not in aggregator.frames.runs()
        assert gc.collect() == 0  # nothing the run left behind needed the cycle collector
    finally:
        gc.enable()


def test_a_multi_rank_steps_frames_hold_their_own_summaries_not_the_ranks_reports(aggregator):
    frames = aggregator.frames.get(RUN)
    assert [step for step, _ in frames] == [0, 1, 2]
    latest = aggregator.state.runs[RUN].last_joined.merged.by_kind  # the step's merge: every rank's part
    merged = [s for pairs in latest.values() for _, s in pairs if isinstance(s, Merged)]
    assert merged  # sharded weights and per-rank activations were merged over the two ranks
    step, tensors = frames[-1]
    summaries = [s for pairs in tensors.values() for _, s in pairs]
    assert all(isinstance(s, report_pb2.TensorSummary) for s in summaries)  # detached: no Merged, no parts
    # the same figures as the merge, histograms added up over the ranks
    by_name = {meta.name + str(kind): s for kind, pairs in tensors.items() for meta, s in pairs}
    for kind, pairs in latest.items():
        for meta, s in pairs:
            f = by_name[meta.name + str(kind)]
            assert (f.count, f.sum_squares, f.min, f.max, list(f.histogram), f.histogram_offset) == (
                s.count, s.sum_squares, s.min, s.max, list(s.histogram), s.histogram_offset)
