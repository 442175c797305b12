"""The live view's histogram frames kept in Redis, so that histograms over time survive a restart, a takeover or
an eviction like the rest of a run's history.

The frames are the ones the live view's FrameStore keeps (aggregator/http/live.py): at most MAX_FRAMES per
run, spread over the whole run by thinning. Each kept frame is written once, as a history.proto Frame (the
step's summaries, histograms included, each naming its tensor by an index into the run's FrameTensors),
before the entries behind it are acknowledged; a frame the thinning dropped is deleted. Key (under the run's
hash tag, gradwatch.streams):

  gradwatch:{<run>}:history-frames  HASH  "<step>" -> Frame; "tensors" -> FrameTensors (the descriptors, once);
                                          "stride" -> the step distance frames are kept at

A frame costs its summaries (about 40 bytes each, 100 with a histogram) and about 1 byte per tensor index; the
descriptors are not repeated per frame (encoding them took as long as the summaries). Encoding a frame costs
about as much as applying its report, so not every frame kept in memory is written: only frames at least
PERSIST_GAP steps apart (FrameStore), every stride-th step once the thinning has passed that. A young run's
animation read back from Redis is therefore coarser than the live one; a long run's is the same.

A multi-rank step's frame is `detached` once kept: its merged summaries (merge.Merged) reference every rank's part,
and through them every rank's whole report, so the 55 frames of a 2,000-layer, 64-rank run held 64 x 55 reports
(12.7M summaries where the frame budget meant 200,000; 4.9 GB), every one of them walked by each full garbage
collection (benchmarks/aggregator_gc.py). Detached, a frame holds its own summaries in one Frame message, as `load`
gives them.
"""

from __future__ import annotations

import redis

from gradwatch.aggregator.merge import Merged, message
from gradwatch.aggregator.report import UNITS, UNKNOWN_ORDER, TensorMeta
from gradwatch.streams import frames_key
from gradwatch.v1 import history_pb2, run_pb2

STRIDE = b"stride"
TENSORS = b"tensors"
Tensors = dict  # kind -> [(TensorMeta, TensorSummary)], as ReportView.by_kind


def info(meta: TensorMeta) -> run_pb2.TensorInfo:
    kind = run_pb2.TENSOR_KIND_ACTIVATION if meta.kind == UNITS else meta.kind  # TensorMeta.of maps it back
    return run_pb2.TensorInfo(name=meta.name, kind=kind, shape=meta.shape, dtype=meta.dtype, module_path=meta.layer,
                              order=min(meta.order, UNKNOWN_ORDER - 1), partition=meta.partition)


def meta_of(t: run_pb2.TensorInfo) -> TensorMeta:
    order = UNKNOWN_ORDER if t.order == UNKNOWN_ORDER - 1 else t.order  # a tensor no registration named
    return TensorMeta.of(t.name, t.kind, t.module_path, order, tuple(t.shape), t.partition, t.dtype)


def detached(tensors: Tensors) -> Tensors:
    """The frame with each merged summary made a message of one Frame of its own (the histograms added up now,
    once), every other summary kept as it is; the same dict when it holds no merged one. Costs about 1.5
    microseconds per rank and tensor (reading the parts' histograms): callers run it outside the aggregator's lock."""
    if not any(isinstance(s, Merged) for pairs in tensors.values() for _, s in pairs):
        return tensors
    holder = history_pb2.Frame()  # one arena for the frame's summaries: ~360 B each, 900 B as messages of their own
    holder.summaries.extend(message(s) for pairs in tensors.values() for _, s in pairs if isinstance(s, Merged))
    made = iter(holder.summaries)
    return {kind: [(meta, next(made) if isinstance(s, Merged) else s) for meta, s in pairs]
            for kind, pairs in tensors.items()}


class FrameHistory:
    """Reads and writes runs' frames on one Redis client (each call names one run's key: cluster-safe). Keeps
    each run's tensor table as Redis has it (not thread-safe: the consumer loop writes; `load` reads alone)."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._tables: dict[str, dict[tuple[int, str], tuple[int, TensorMeta]]] = {}  # (kind, name) -> (index, meta)
        self._written: dict[str, int] = {}  # run -> entries of its table Redis has (a failed save writes them again)

    def save(self, run: str, stride: int, added: list[tuple[int, Tensors]], removed: list[int]) -> None:
        table = self._tables.get(run)
        if table is None:
            table = self._tables[run] = self._read_table(run)
            self._written[run] = len(table)
        mapping: dict = {STRIDE: stride}
        for step, tensors in added:
            frame = history_pb2.Frame(step=step)
            for pairs in tensors.values():
                for meta, _ in pairs:
                    entry = table.get((meta.kind, meta.name))
                    if entry is None:
                        entry = table[(meta.kind, meta.name)] = (len(table), meta)
                    frame.tensors.append(entry[0])
                # a multi-rank step's are merge.Merged: made messages only here, for the frames kept
                frame.summaries.extend(message(s) for _, s in pairs)
            mapping[str(step).encode()] = frame.SerializeToString()
        if len(table) > self._written[run]:
            tensors = history_pb2.FrameTensors(tensors=[info(m) for _, m in table.values()])
            mapping[TENSORS] = tensors.SerializeToString()
        pipe = self.client.pipeline(transaction=False)
        if removed:
            pipe.hdel(frames_key(run), *[str(step) for step in removed])
        pipe.hset(frames_key(run), mapping=mapping)
        pipe.execute()
        self._written[run] = len(table)

    def load(self, run: str) -> tuple[int, list[tuple[int, Tensors]]]:
        """(stride, frames in step order); (1, []) when the run has none."""
        raw = self.client.hgetall(frames_key(run))
        stride = int(raw.pop(STRIDE, 1))
        metas = [meta_of(t) for t in history_pb2.FrameTensors.FromString(raw.pop(TENSORS, b"")).tensors]
        frames = []
        for value in raw.values():
            frame = history_pb2.Frame.FromString(value)
            tensors: Tensors = {}
            for i, summary in zip(frame.tensors, frame.summaries, strict=True):
                meta = metas[i]
                tensors.setdefault(meta.kind, []).append((meta, summary))
            frames.append((frame.step, tensors))
        frames.sort(key=lambda f: f[0])
        return stride, frames

    def _read_table(self, run: str) -> dict[tuple[int, str], tuple[int, TensorMeta]]:
        raw = self.client.hmget(frames_key(run), [TENSORS])[0]  # HMGET: the aggregator's ACL user has no HGET here
        metas = [meta_of(t) for t in history_pb2.FrameTensors.FromString(raw).tensors] if raw else []
        return {(m.kind, m.name): (i, m) for i, m in enumerate(metas)}

    def forget(self, run: str) -> None:
        self._tables.pop(run, None)
        self._written.pop(run, None)
