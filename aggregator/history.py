"""A run's step history kept in Redis, so that a restart, a lease takeover or an eviction loses no step.

Every row the state appends to a run's history (a single-rank run's report, a multi-rank run's joined and
merged step: loss, gradient norm, per-layer gradient and parameter norms, curve scalars) is written as a
history.proto StepRecord before the entries behind it are acknowledged, so a row is in Redis before its
reports can leave the stream. Keys (all under the run's hash tag, gradwatch.streams):

  gradwatch:{<run>}:history        HASH  "<step>" (training) or "<step>e" (evaluation) -> StepRecord
  gradwatch:{<run>}:history-steps  ZSET  the same field names, scored by step: ranges by step
  gradwatch:{<run>}:layers         HASH  layer name -> index used in the records ("\0next": the counter)

Writes are idempotent: a step's field is overwritten, never appended, so a row written again after a
takeover (the new owner re-applies what was not acknowledged) is not counted twice. Layer indexes are
allocated with HINCRBY and claimed with HSETNX, so two replicas that see a new layer at once agree on one
index. The in-memory history (RunState.history) is a cache of the latest rows; queries before it, and for
runs this aggregator does not hold, read Redis.

Per step and layer a record costs about 11 bytes per norm (a map entry of a float64: a history read back
equals what was served) in the hash value, plus the hash and sorted-set entry of the step (~100 bytes).

Tiers (`compact`): training steps older than the full-resolution window (the latest `full_steps`) fold into
buckets of 10 steps, and buckets older than ten windows into buckets of 100 (history.proto TierRecord:
min, max, sum and count of each figure over the bucket, NaN/Inf counted: a bucket holding one reads NaN),
except the steps within `window` of a pinned step (an alert's), which stay whole. Evaluation rows stay
whole. Keys: gradwatch:{<run>}:history-10 / -100 (HASH bucket -> TierRecord) and their -steps ZSETs,
gradwatch:{<run>}:history-pins (ZSET of pinned steps). Rows read back from a tier carry its width. A fold is one
MULTI/EXEC that also increments gradwatch:{<run>}:history-generation; a fold never moves a row out of its block of
100 steps (a bucket's first step is a multiple of its width), which is what lets the export read block by block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import redis

from gradwatch.streams import (
    HISTORY_TIERS,
    history_generation_key,
    history_key,
    history_steps_key,
    layers_key,
    pins_key,
    tier_key,
    tier_steps_key,
)
from gradwatch.v1 import history_pb2

TIERS = HISTORY_TIERS
COMPACT_BATCH = 2000  # rows folded per call: bounded work per run and compaction pass

NEXT = b"\x00next"
Row = tuple  # (step, time, train, loss, grad norm, layer -> grad norm, curve scalars, layer -> param norm)


def field(step: int, train: bool) -> bytes:
    return b"%d" % step if train else b"%de" % step


def encode(row: Row, ids: dict[str, int]) -> bytes:
    step, t, train, loss, norm, grads, curve, params = row
    rec = history_pb2.StepRecord(step=step, time=t, eval=not train, scalars=curve)
    if loss is not None:
        rec.loss = loss
    if norm is not None:
        rec.grad_norm = norm
    for layer, v in grads.items():
        rec.grad_norms[ids[layer]] = v
    for layer, v in params.items():
        rec.param_norms[ids[layer]] = v
    return rec.SerializeToString()


def _fold(stats: history_pb2.NormStats, v: float | None) -> None:
    if v is None:
        return
    if not math.isfinite(v):
        stats.nonfinite += 1
        return
    if not stats.count:
        stats.min = stats.max = v
    else:
        stats.min, stats.max = min(stats.min, v), max(stats.max, v)
    stats.sum += v
    stats.count += 1


def _merge_stats(into: history_pb2.NormStats, other: history_pb2.NormStats) -> None:
    if other.count:
        if into.count:
            into.min, into.max = min(into.min, other.min), max(into.max, other.max)
        else:
            into.min, into.max = other.min, other.max
    into.sum += other.sum
    into.count += other.count
    into.nonfinite += other.nonfinite


def bucket_mean(stats: history_pb2.NormStats) -> float | None:
    if stats.nonfinite:
        return math.nan  # never hidden by the finite rest of the bucket
    return stats.sum / stats.count if stats.count else None


def tier_row(rec: history_pb2.TierRecord, names: dict[int, str], width: int) -> tuple:
    """A bucket as a history row (the means; NaN where a NaN/Inf was folded in) plus its width."""
    def layers(m) -> dict[str, float]:
        return {names.get(i, f"layer_{i}"): v for i, st in sorted(m.items()) if (v := bucket_mean(st)) is not None}

    return (rec.first_step, rec.time, True, bucket_mean(rec.loss), bucket_mean(rec.grad_norm),
            layers(rec.grad_norms), {}, layers(rec.param_norms), width)


def decode(raw: bytes, names: dict[int, str]) -> Row:
    rec = history_pb2.StepRecord.FromString(raw)
    grads = {names.get(i, f"layer_{i}"): v for i, v in sorted(rec.grad_norms.items())}
    params = {names.get(i, f"layer_{i}"): v for i, v in sorted(rec.param_norms.items())}
    return (rec.step, rec.time, not rec.eval, rec.loss if rec.HasField("loss") else None,
            rec.grad_norm if rec.HasField("grad_norm") else None, grads, dict(rec.scalars), params)


class HistoryStore:
    """Reads and writes run histories on one Redis client (cluster-safe: every command of a call touches
    one run's keys)."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._ids: dict[str, dict[str, int]] = {}  # run -> layer -> index, as Redis has them

    def layer_ids(self, run: str, layers: Iterable[str]) -> dict[str, int]:
        """The run's layer -> index for these layers, allocating indexes for new ones."""
        ids = self._ids.setdefault(run, {})
        new = [layer for layer in dict.fromkeys(layers) if layer not in ids]
        if new:
            key = layers_key(run)
            known = self.client.hmget(key, new)
            missing = [layer for layer, v in zip(new, known, strict=True) if v is None]
            ids.update({layer: int(v) for layer, v in zip(new, known, strict=True) if v is not None})
            if missing:
                pipe = self.client.pipeline(transaction=False)
                for _ in missing:
                    pipe.hincrby(key, NEXT, 1)
                allocated = pipe.execute()
                pipe = self.client.pipeline(transaction=False)
                for layer, i in zip(missing, allocated, strict=True):
                    pipe.hsetnx(key, layer, int(i) - 1)
                won = pipe.execute()
                lost = [layer for layer, ok in zip(missing, won, strict=True) if not ok]
                ids.update({layer: int(i) - 1 for layer, i, ok in zip(missing, allocated, won, strict=True) if ok})
                if lost:  # another replica claimed these first: its index holds
                    ids.update({layer: int(v) for layer, v in zip(lost, self.client.hmget(key, lost), strict=True)})
        return ids

    def save(self, run: str, rows: list[Row]) -> None:
        """Writes rows (idempotent by step and phase)."""
        if not rows:
            return
        ids = self.layer_ids(run, (layer for row in rows for layers in (row[5], row[7]) for layer in layers))
        records = {field(row[0], row[2]): encode(row, ids) for row in rows}
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(history_key(run), mapping=records)
        pipe.zadd(history_steps_key(run), {f: row[0] for f, row in zip(records, rows, strict=True)})
        pipe.execute()

    def names(self, run: str) -> dict[int, str]:
        raw = self.client.hgetall(layers_key(run))
        out = {}
        for k, v in raw.items():
            if k != NEXT:
                out[int(v)] = k.decode(errors="replace") if isinstance(k, bytes) else str(k)
        self._ids[run] = {name: i for i, name in out.items()}
        return out

    def rows(self, run: str, first: int | None = None, last: int | None = None, limit: int = 1000) -> list[Row]:
        """The run's rows with first <= step <= last, the latest `limit`, oldest first."""
        if limit <= 0:
            return []
        lo = "-inf" if first is None else first
        hi = "+inf" if last is None else last
        names = self.names(run)
        out = []
        for width in (1, *TIERS):
            steps = history_steps_key(run) if width == 1 else tier_steps_key(run, width)
            fields = self.client.zrevrangebyscore(steps, hi, lo, start=0, num=limit)
            if not fields:
                continue
            raw = self.client.hmget(history_key(run) if width == 1 else tier_key(run, width), fields)
            if width == 1:
                out += [decode(r, names) for r in raw if r is not None]
            else:
                out += [tier_row(history_pb2.TierRecord.FromString(r), names, width) for r in raw if r is not None]
        return sorted(out, key=lambda row: (row[0], not row[2]))[-limit:]

    def pin(self, run: str, steps: Iterable[int]) -> None:
        """Steps to keep at full resolution (with their window): an alert's."""
        pinned = {str(s): s for s in map(int, steps) if s >= 0}
        if pinned:
            self.client.zadd(pins_key(run), pinned)

    def compact(self, run: str, latest: int, full_steps: int, window: int) -> int:
        """Folds training rows older than `full_steps` before `latest` into 10-step buckets, and buckets
        older than ten windows into 100-step buckets, leaving rows within `window` of a pin whole. Returns
        the rows and buckets folded (at most COMPACT_BATCH of each per call)."""
        pins = [int(p) for p in self.client.zrange(pins_key(run), 0, -1)]
        folded = 0
        cutoffs = {10: latest - full_steps, 100: latest - 10 * full_steps}
        for width, source in ((10, 1), (100, 10)):
            cutoff = cutoffs[width]
            if cutoff <= 0:
                continue
            src_steps = history_steps_key(run) if source == 1 else tier_steps_key(run, source)
            src_hash = history_key(run) if source == 1 else tier_key(run, source)
            fields = self.client.zrangebyscore(src_steps, "-inf", f"({cutoff}", start=0, num=COMPACT_BATCH,
                                               withscores=True)
            if source == 1:  # evaluation rows and the steps near a pin stay whole
                fields = [(f, sc) for f, sc in fields if not f.endswith(b"e")
                          and not any(abs(sc - p) <= window for p in pins)]
            fields = [(f, sc) for f, sc in fields if (int(sc) // width + 1) * width <= cutoff]  # whole buckets
            if not fields:
                continue
            raw = self.client.hmget(src_hash, [f for f, _ in fields])
            buckets: dict[int, history_pb2.TierRecord] = {}
            for (_, sc), r in zip(fields, raw, strict=True):
                if r is None:
                    continue
                b = int(sc) // width
                rec = buckets.get(b)
                if rec is None:
                    rec = buckets[b] = history_pb2.TierRecord(first_step=b * width)
                if source == 1:
                    self._fold_row(rec, history_pb2.StepRecord.FromString(r))
                else:
                    self._merge_tier(rec, history_pb2.TierRecord.FromString(r))
            dest = tier_key(run, width)
            existing = self.client.hmget(dest, [str(b) for b in buckets])
            for rec, old in zip(buckets.values(), existing, strict=True):
                if old is not None:
                    self._merge_tier(rec, history_pb2.TierRecord.FromString(old))
            # One transaction: no reader sees a row both whole and in its bucket, or in neither; the generation
            # tells a reader of several round trips (the export) that rows moved while it read.
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(dest, mapping={str(b): rec.SerializeToString() for b, rec in buckets.items()})
            pipe.zadd(tier_steps_key(run, width), {str(b): b * width for b in buckets})
            pipe.hdel(src_hash, *[f for f, _ in fields])
            pipe.zrem(src_steps, *[f for f, _ in fields])
            pipe.incr(history_generation_key(run))
            pipe.execute()
            folded += len(fields)
        return folded

    @staticmethod
    def _fold_row(rec: history_pb2.TierRecord, row: history_pb2.StepRecord) -> None:
        rec.steps += 1
        rec.time = max(rec.time, row.time)
        _fold(rec.loss, row.loss if row.HasField("loss") else None)
        _fold(rec.grad_norm, row.grad_norm if row.HasField("grad_norm") else None)
        for i, v in row.grad_norms.items():
            _fold(rec.grad_norms[i], v)
        for i, v in row.param_norms.items():
            _fold(rec.param_norms[i], v)

    @staticmethod
    def _merge_tier(rec: history_pb2.TierRecord, other: history_pb2.TierRecord) -> None:
        rec.steps += other.steps
        rec.time = max(rec.time, other.time)
        _merge_stats(rec.loss, other.loss)
        _merge_stats(rec.grad_norm, other.grad_norm)
        for i, st in other.grad_norms.items():
            _merge_stats(rec.grad_norms[i], st)
        for i, st in other.param_norms.items():
            _merge_stats(rec.param_norms[i], st)

    def count(self, run: str) -> int:
        return int(self.client.zcard(history_steps_key(run)))

    def forget(self, run: str) -> None:
        self._ids.pop(run, None)
