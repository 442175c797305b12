"""Histograms over time survive a restart: the live view's frames written to Redis with the history and read
back by the next aggregator (aggregator/frames.py, FrameStore's change tracking), against a real Redis."""

from __future__ import annotations

from gradwatch.aggregator.frames import FrameHistory
from gradwatch.aggregator.http.live import PERSIST_GAP, FrameStore
from gradwatch.aggregator.report import KIND_NAMES, TensorMeta
from gradwatch.v1 import run_pb2
from tests.fixtures.aggregator import drain


def with_histograms(report, step: int, rank: int = 0):
    for i, s in enumerate(report.tensors):
        s.histogram.extend([step + 1, i + 1, rank + 1])
        s.histogram_offset = 60 + i % 3
    return report


def picture(frames) -> list[tuple]:
    """Frames as comparable values: step, and per tensor its kind, name, layer, count and histogram."""
    return [(step, sorted((KIND_NAMES.get(kind, kind), meta.name, meta.layer, s.count, tuple(s.histogram),
                           s.histogram_offset) for kind, pairs in tensors.items() for meta, s in pairs))
            for step, tensors in frames]


def test_thinned_frames_in_redis_are_the_ones_kept(redis_client, build):
    store, history = FrameStore(max_frames=8), FrameHistory(redis_client)
    for step in range(50):
        report = with_histograms(build.report(step), step)
        tensors = {1: [(_meta(s.tensor_id), s) for s in report.tensors]}
        store.add("thin", step, tensors)
        if step % 7 == 0:  # written now and then, as commits come
            for run, change in store.take_changes().items():
                history.save(run, *change)
    for run, change in store.take_changes().items():
        history.save(run, *change)
    stride, frames = history.load("thin")
    kept = dict(store._runs["thin"].frames)  # noqa: SLF001
    steps = [s for s, _ in frames]
    # Redis has frames the store keeps (none it thinned out), PERSIST_GAP steps apart at least, the same values
    assert set(steps) <= set(kept) and len(frames) >= 4
    assert all(b - a >= PERSIST_GAP for a, b in zip(steps, steps[1:], strict=False))
    assert stride == store._runs["thin"].stride > 1  # noqa: SLF001
    assert picture(frames) == picture([(s, kept[s]) for s in steps])


def _meta(tensor_id: int) -> TensorMeta:
    return TensorMeta.of(f"t{tensor_id}.weight", 1, f"t{tensor_id}", tensor_id, (16, 16), 0, "float32")


def test_a_new_aggregator_shows_the_frames_of_the_last(make_aggregator, build, publish, redis_client):
    publish.registration(build.registration(run="frames"))
    a = make_aggregator(consumer="a")
    drain(a)
    for step in range(12):
        publish.report(with_histograms(build.report(step, run="frames"), step))
    drain(a)
    before = picture(a.frames.get("frames"))
    assert len(before) == 12
    a.stop()

    b = make_aggregator(consumer="b")
    drain(b)
    # every PERSIST_GAP-th of a young run's frames was written: b shows those, with the same histograms
    assert picture(b.frames.get("frames")) == [before[0], before[PERSIST_GAP]]
    publish.report(with_histograms(build.report(12, run="frames"), 12))
    drain(b)
    assert [s for s, _ in b.frames.get("frames")] == [0, PERSIST_GAP, 12]


def test_a_run_not_followed_reads_its_frames_from_redis(make_aggregator, build, publish, redis_client):
    publish.registration(build.registration(run="elsewhere"))
    a = make_aggregator(consumer="a")
    drain(a)
    for step in range(2 * PERSIST_GAP):
        publish.report(with_histograms(build.report(step, run="elsewhere"), step))
    drain(a)
    expected = picture(a.frames.get("elsewhere"))[::PERSIST_GAP]
    reader = FrameStore(load=lambda run: FrameHistory(redis_client).load(run)[1])  # holds nothing itself
    assert picture(reader.get("elsewhere")) == expected and reader.runs() == set()
    assert reader.get("no-such-run") == []


def test_a_multi_rank_step_keeps_its_merged_histograms(make_aggregator, build, publish, redis_client):
    for rank in (0, 1):
        reg = build.registration(run="merged", rank=rank)
        reg.world_size = 2
        for t in reg.tensors:  # each rank's activations are its micro-batch's: they add up
            if t.kind == run_pb2.TENSOR_KIND_ACTIVATION:
                t.partition = run_pb2.PARTITION_PER_RANK
        publish.registration(reg)
    agg = make_aggregator()
    drain(agg)
    for rank in (0, 1):
        publish.report(with_histograms(build.report(0, run="merged", rank=rank), 0, rank))
    drain(agg)
    _, frames = FrameHistory(redis_client).load("merged")
    assert [s for s, _ in frames] == [0]
    summaries = [s for pairs in frames[0][1].values() for _, s in pairs]
    # activations are per-rank data (their histograms add up); parameters and gradients are replicated (once)
    acts = [s for kind, pairs in frames[0][1].items() if KIND_NAMES.get(kind) == "activation" for _, s in pairs]
    assert len(acts) == 4 and all(s.histogram[0] == 2 and s.histogram[2] == 3 and s.count == 512 for s in acts)
    assert len(summaries) == 12
