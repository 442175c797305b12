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
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from gradwatch.streams import history_key, history_steps_key, layers_key
from gradwatch.v1 import history_pb2

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
        fields = self.client.zrevrangebyscore(history_steps_key(run), hi, lo, start=0, num=limit)
        if not fields:
            return []
        fields.reverse()
        names = self.names(run)
        raw = self.client.hmget(history_key(run), fields)
        return sorted((decode(r, names) for r in raw if r is not None), key=lambda row: (row[0], not row[2]))

    def count(self, run: str) -> int:
        return int(self.client.zcard(history_steps_key(run)))

    def forget(self, run: str) -> None:
        self._ids.pop(run, None)
