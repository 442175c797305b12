"""A run's durable history (aggregator/history.py) read back whole, page by page, as chunks of a tidy table: one
cell per step (or bucket), layer and statistic, in step order, in bounded memory.

    step  phase  resolution  layer  statistic        value    <- one cell
    120   train  10          fc1    layer_grad_norm  NaN      (a 10-step bucket that held a NaN)

Sources, merged by (step, training before evaluation, resolution), as HistoryStore.rows orders them:

  gradwatch:{run}:history     (+ -steps)  full-resolution training and evaluation steps  resolution 1
  gradwatch:{run}:history-10  (+ -steps)  10-step buckets of older training steps        resolution 10
  gradwatch:{run}:history-100 (+ -steps)  100-step buckets                               resolution 100

A run the aggregator still writes has a moving history: compaction (every 5 s) folds old rows into buckets. Read
source by source, an export could pass a bucket before the rows folded into it, or read a row and then its bucket.
So the sources are read together, a window of whole BLOCKs (100 steps) at a time: a fold never moves a row out of
its block (a bucket's first step is a multiple of its width). One pipeline reads the window: the history's
generation, then an HMGET of every field the window can hold in each source (a step's training and evaluation
field, the buckets that begin in it), then the generation again. A fold is one MULTI/EXEC that increments the
generation (aggregator/history.py), so an unchanged generation means no row moved during the read: the window is
a consistent snapshot, every step in it exactly once. A changed one reads the window again. Where the next window
starts comes from one ZRANGEBYSCORE per source, finest first: a fold moves a row to a coarser source, read after,
so a row is never skipped over. A bucket is in a --from/--to range when its first step is, as /steps answers. The
reads touch one run's keys (one slot on a Redis Cluster) and need only read commands (the `reader` user of
deploy/redis/users.acl).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from gradwatch.aggregator.export.run import run_info
from gradwatch.aggregator.history import (
    TIERS,
    HistoryStore,
    bucket_mean,  # one home for a bucket's mean (NaN wins)
)
from gradwatch.names import EVAL, LOSS, TRAIN
from gradwatch.streams import history_generation_key, history_key, history_steps_key, tier_key, tier_steps_key
from gradwatch.v1 import history_pb2

# Statistics: the run's loss and global gradient norm, each layer's gradient and parameter norm; user scalars
# (accuracy, ...) under their own names, or SCALAR_PREFIX + name where a name is one of these.
GRAD_NORM, LAYER_GRAD_NORM, PARAM_NORM = "grad_norm", "layer_grad_norm", "param_norm"
STATISTICS = (LOSS, GRAD_NORM, LAYER_GRAD_NORM, PARAM_NORM)
_LOSS, _GRAD_NORM, _LAYER_GRAD_NORM, _PARAM_NORM = range(len(STATISTICS))  # their codes
SCALAR_PREFIX = "scalar:"
PHASES = (TRAIN, EVAL)
RUN_LEVEL = ""  # the layer of run-level statistics
RUN_INDEX = -1  # ... as a Redis layer index, while a chunk is built
PAGE_CELLS = 250_000  # cells per Redis page (HMGET of up to PAGE_RECORDS records): a reply of a few MB
PAGE_RECORDS = 1000
BLOCK = 100  # steps: the widest bucket. A fold keeps a row within its block, so a window of whole blocks is closed
RETRIES = 100  # reads of one window that a fold interrupted, before giving up (a fold comes every few seconds)
CHUNK_CELLS = 500_000  # cells per chunk (a Parquet row group): ~150 MB of Python lists, arrays and Arrow buffers


class Names:
    """A growing list of names whose codes never change: the categories of a dictionary column."""

    def __init__(self, names=()):
        self.names: list[str] = []
        self.code: dict[str, int] = {}
        for name in names:
            self.add(name)

    def add(self, name: str) -> int:
        code = self.code.get(name)
        if code is None:
            code = self.code[name] = len(self.names)
            self.names.append(name)
        return code


@dataclass
class Chunk:
    """A page of the tidy table as columns: per record (a step or bucket) and per cell (its values)."""

    step: np.ndarray        # per record: int64
    eval: np.ndarray        # bool
    resolution: np.ndarray  # int32: 1, 10 or 100 steps
    time: np.ndarray        # float64 unix seconds (a bucket: its latest step's)
    cells: np.ndarray       # int64: cells of each record
    layer: np.ndarray       # per cell: int32 code in `layers` (0: run-level)
    statistic: np.ndarray   # int32 code in `statistics`
    value: np.ndarray       # float64: the value, a bucket's mean (NaN when it folded a NaN or Inf)
    min: np.ndarray         # float64: smallest finite value (NaN: none)
    max: np.ndarray         # float64: largest finite value (NaN: none)
    count: np.ndarray       # int64: finite values (a full-resolution cell: 1 or 0)
    nonfinite: np.ndarray   # int64: NaN and Inf values
    layers: list[str]
    statistics: list[str]

    def per_cell(self, per_record: np.ndarray) -> np.ndarray:
        return np.repeat(per_record, self.cells)


class _Builder:
    def __init__(self):
        self.step, self.eval, self.resolution, self.time, self.cells = [], [], [], [], []
        self.layer, self.statistic, self.value = [], [], []  # layer: the Redis index (RUN_INDEX: run-level)
        self.tier = ([], [], [], [])  # min, max, count, nonfinite of bucket cells, in order

    def build(self, layers: list[str], statistics: list[str], codes=lambda raw: (raw + 1).astype(np.int32)) -> Chunk:
        cells = np.array(self.cells, np.int64)
        value = np.array(self.value, np.float64)
        full = np.repeat(np.array(self.resolution, np.int32) == 1, cells)
        finite = np.isfinite(value)
        lo, hi = np.full(len(value), np.nan), np.full(len(value), np.nan)
        lo[full & finite] = hi[full & finite] = value[full & finite]
        count, nonfinite = (full & finite).astype(np.int64), (full & ~finite).astype(np.int64)
        bucket = ~full
        for column, values, kind in zip((lo, hi, count, nonfinite), self.tier, (np.float64, np.float64, np.int64,
                                                                                 np.int64), strict=True):
            column[bucket] = np.array(values, kind)
        return Chunk(np.array(self.step, np.int64), np.array(self.eval, bool), np.array(self.resolution, np.int32),
                     np.array(self.time, np.float64), cells, codes(np.array(self.layer, np.int64)),
                     np.array(self.statistic, np.int32), value, lo, hi, count, nonfinite, list(layers),
                     list(statistics))


class RunReader:
    """Reads one run's history from Redis in step order; `chunks()` yields it as Chunks of about CHUNK_CELLS."""

    def __init__(self, client, run: str, first: int | None = None, last: int | None = None, layers: bool = True):
        self.client, self.run, self.first, self.last, self.with_layers = client, run, first, last, layers
        self.info = run_info(client, run)
        index = HistoryStore(client).names(run)  # Redis index -> layer name
        order = self.info.order
        ranked = sorted(index, key=lambda i: (order.get(index[i], math.inf), i))  # forward order, then first seen
        self.layers = Names([RUN_LEVEL, *(index[i] for i in ranked)])
        self._codes = np.full(max(index, default=-1) + 2, -1, np.int32)  # Redis index + 1 -> code (0: run-level)
        self._codes[0] = 0
        for i in ranked:
            self._codes[i + 1] = self.layers.code[index[i]]
        self.statistics = Names(STATISTICS)
        self.scalar_code: dict[str, int] = {}
        self.page = max(16, min(PAGE_RECORDS, PAGE_CELLS // (2 * len(index) + 8)))
        self.done = 0  # records read so far

    def empty(self) -> Chunk:
        """A chunk of no cells: the columns of a run with no history yet."""
        return _Builder().build(self.layers.names, self.statistics.names)

    def total(self) -> int:
        """Records (steps and buckets) in the range, for progress: ZCOUNT of each source."""
        lo, hi = self._bounds()
        pipe = self.client.pipeline(transaction=False)
        for steps_key, _, _ in self._sources():
            pipe.zcount(steps_key, lo, hi)
        return sum(int(n) for n in pipe.execute())

    def scalar_names(self) -> list[str]:
        """The statistic names of every user scalar in the range (full-resolution rows: buckets keep none). A
        whole read of those rows, for the wide layout's columns."""
        names: dict[str, None] = {}
        for _, _, width, raw in self._records():
            if width == 1:
                for name in history_pb2.StepRecord.FromString(raw).scalars:
                    names[self._scalar_name(name)] = None
        return sorted(names)

    def chunks(self, cells: int = CHUNK_CELLS, progress: Callable[[int], None] | None = None) -> Iterator[Chunk]:
        b = _Builder()
        for step, _, width, raw in self._records():
            before = len(b.value)
            if width == 1:
                rec = history_pb2.StepRecord.FromString(raw)
                self._full(b, rec)
                b.eval.append(rec.eval)
                b.time.append(rec.time)
            else:
                tier = history_pb2.TierRecord.FromString(raw)
                self._bucket(b, tier)
                b.eval.append(False)
                b.time.append(tier.time)
            b.step.append(step)
            b.resolution.append(width)
            b.cells.append(len(b.value) - before)
            self.done += 1
            if len(b.value) >= cells:
                yield b.build(self.layers.names, self.statistics.names, self._layer_codes)
                b = _Builder()
                if progress:
                    progress(self.done)
        if b.step:
            yield b.build(self.layers.names, self.statistics.names, self._layer_codes)
        if progress:
            progress(self.done)

    # -- records -> cells ------------------------------------------------------------------------------------

    def _layer_codes(self, raw: np.ndarray) -> np.ndarray:
        """Redis layer indexes (RUN_INDEX: run-level) as codes in `layers`, vectorized: a Python lookup per cell
        would cost as much as the rest of the export."""
        if raw.size and raw.max() + 2 > len(self._codes):
            self._codes = np.concatenate([self._codes, np.full(raw.max() + 2 - len(self._codes), -1, np.int32)])
        codes = self._codes[raw + 1]
        unknown = np.unique(raw[codes < 0])
        if unknown.size:  # a layer newer than the export's start, or one the layers hash lost
            names = HistoryStore(self.client).names(self.run)
            for i in unknown.tolist():
                self._codes[i + 1] = self.layers.add(names.get(i, f"layer_{i}"))
            codes = self._codes[raw + 1]
        return codes

    def _scalar_name(self, name: str) -> str:
        return SCALAR_PREFIX + name if name in STATISTICS or name.startswith(SCALAR_PREFIX) else name

    def _scalar(self, name: str) -> int:
        code = self.scalar_code.get(name)
        if code is None:
            code = self.scalar_code[name] = self.statistics.add(self._scalar_name(name))
        return code

    def _full(self, b: _Builder, rec: history_pb2.StepRecord) -> None:
        stats, layers, values = b.statistic, b.layer, b.value
        for code, present, v in ((_LOSS, rec.HasField("loss"), rec.loss),
                                 (_GRAD_NORM, rec.HasField("grad_norm"), rec.grad_norm)):
            if present:
                stats.append(code)
                layers.append(RUN_INDEX)
                values.append(v)
        for name, v in sorted(rec.scalars.items()):
            stats.append(self._scalar(name))
            layers.append(RUN_INDEX)
            values.append(v)
        if not self.with_layers:
            return
        for stat, norms in ((_LAYER_GRAD_NORM, rec.grad_norms), (_PARAM_NORM, rec.param_norms)):
            if norms:
                keys = sorted(norms)  # a map's keys iterate in C, its items() in Python
                layers.extend(keys)
                values.extend([norms[k] for k in keys])
                stats.extend([stat] * len(keys))

    def _bucket(self, b: _Builder, rec: history_pb2.TierRecord) -> None:
        figures = [(_LOSS, RUN_INDEX, rec.loss), (_GRAD_NORM, RUN_INDEX, rec.grad_norm)]
        if self.with_layers:
            for stat, norms in ((_LAYER_GRAD_NORM, rec.grad_norms), (_PARAM_NORM, rec.param_norms)):
                figures += [(stat, i, norms[i]) for i in sorted(norms)]
        lo, hi, count, nonfinite = b.tier
        for stat, layer, st in figures:
            v = bucket_mean(st)
            if v is None:  # the figure was in none of the bucket's steps
                continue
            b.statistic.append(stat)
            b.layer.append(layer)
            b.value.append(v)
            lo.append(st.min if st.count else math.nan)
            hi.append(st.max if st.count else math.nan)
            count.append(st.count)
            nonfinite.append(st.nonfinite)

    # -- paging ----------------------------------------------------------------------------------------------

    def _sources(self) -> list[tuple[str, str, int]]:
        return [(history_steps_key(self.run), history_key(self.run), 1),
                *((tier_steps_key(self.run, w), tier_key(self.run, w), w) for w in TIERS)]

    def _bounds(self) -> tuple[str, str]:
        return ("-inf" if self.first is None else str(self.first)), ("+inf" if self.last is None else str(self.last))

    def _records(self) -> Iterator[tuple[int, bool, int, bytes]]:
        """(step, evaluation, width, encoded record) of every source in the range, ordered by step, training before
        evaluation, full resolution before buckets: window by window, each read whole and consistent."""
        lo = self.first
        blocks = max(1, self.page // (2 * BLOCK))  # a block holds up to 2 rows a step, and its buckets
        while True:
            start = self._next_step(lo)
            if start is None:
                return
            first = start // BLOCK * BLOCK
            if lo is not None:
                first = max(first, lo)  # --from inside a block
            end = (start // BLOCK + blocks) * BLOCK  # exclusive
            if self.last is not None:
                end = min(end, self.last + 1)
            yield from sorted(self._window(first, end), key=lambda r: (r[0], r[1], r[2]))
            if self.last is not None and end > self.last:
                return
            lo = end

    def _next_step(self, lo: int | None) -> int | None:
        """The first step (or bucket) at or after `lo` in any source; None when there is none in the range. Finest
        source first: a row folded between two of these reads is found in the coarser source, read after it."""
        low, high = ("-inf" if lo is None else str(lo)), ("+inf" if self.last is None else str(self.last))
        pipe = self.client.pipeline(transaction=False)
        for steps_key, _, _ in self._sources():
            pipe.zrangebyscore(steps_key, low, high, start=0, num=1, withscores=True)
        found = [int(page[0][1]) for page in pipe.execute() if page]
        return min(found) if found else None

    def _window(self, first: int, end: int) -> list[tuple[int, bool, int, bytes]]:
        """Every record of steps first <= step < end (a bucket: its first step), as one consistent snapshot."""
        generation = history_generation_key(self.run)
        wanted = []  # per source: (hash key, width, [(field, step, evaluation)])
        for _, hash_key, width in self._sources():
            if width == 1:
                fields = [(field, s, e) for s in range(first, end)
                          for field, e in ((b"%d" % s, False), (b"%de" % s, True))]
            else:
                fields = [(b"%d" % b, b * width, False) for b in range(-(-first // width), -(-end // width))]
            wanted.append((hash_key, width, fields))
        for _ in range(RETRIES):
            pipe = self.client.pipeline(transaction=False)
            pipe.get(generation)
            for hash_key, _, fields in wanted:
                if fields:
                    pipe.hmget(hash_key, [f for f, _, _ in fields])
            pipe.get(generation)
            before, *pages, after = pipe.execute()
            if before == after:
                return [(step, evaluation, width, raw)
                        for (_, width, fields), raw_page in zip((w for w in wanted if w[2]), pages, strict=True)
                        for (_, step, evaluation), raw in zip(fields, raw_page, strict=True) if raw is not None]
        raise RuntimeError(f"the history of run {self.run} was compacted during each of {RETRIES} reads of steps "
                           f"{first}..{end - 1}: try again")
