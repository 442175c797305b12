"""The export's reading of a run's durable history on a real Redis, written with HistoryStore as the aggregator
writes it: paging that neither loses nor repeats a step's training and evaluation rows, buckets holding NaN and
Inf, step ranges, layers the layers hash lacks, scalars named like a statistic, an unknown run, an empty run, and
a history written in several row groups."""

from __future__ import annotations

import io
import json
import math

import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradwatch.aggregator.export import RunNotFound, RunReader, frame, write
from gradwatch.aggregator.history import HistoryStore
from gradwatch.streams import RUNS_KEY, history_key, registrations_key
from gradwatch.v1 import history_pb2, run_pb2

RUN = "hist"


def rows(steps, nan_at=(), inf_at=(), evals=()):
    """Training rows of two layers (fc1's gradient norm = the step, NaN/Inf where asked), evaluation rows at
    `evals` with an accuracy."""
    out = []
    for s in steps:
        g = math.nan if s in nan_at else (math.inf if s in inf_at else float(s))
        out.append((s, 1000.0 + s, True, 1.0 / (s + 1), g, {"fc1": g, "fc2": 2.0}, {"accuracy": s / 1000},
                    {"fc1": 10.0, "fc2": 20.0}))
        if s in evals:
            out.append((s, 1000.5 + s, False, 0.25, None, {}, {"accuracy": 0.75}, {}))
    return out


def cells(df: pd.DataFrame) -> list[tuple]:
    return [(int(s), p, int(r), layer, stat) for s, p, r, layer, stat in
            zip(df["step"], df["phase"], df["resolution"], df["layer"], df["statistic"], strict=True)]


def api_keys(store: HistoryStore, first=None, last=None) -> list[tuple]:
    return [(r[0], "train" if r[2] else "eval", r[8] if len(r) > 8 else 1)
            for r in store.rows(RUN, first, last, limit=10**6)]


@pytest.mark.parametrize("page", [1, 2, 3, 1000])
def test_pages_lose_and_repeat_nothing(redis_client, page):
    """Training and evaluation rows of one step share a score: a page boundary between them must not drop or
    repeat either."""
    store = HistoryStore(redis_client)
    store.save(RUN, rows(range(40), evals=range(0, 40, 3)))
    reader = RunReader(redis_client, RUN)
    reader.page = page
    df = frame(reader)
    keys = list(dict.fromkeys((s, p, r) for s, p, r, _, _ in cells(df)))
    assert keys == api_keys(store)
    assert reader.total() == reader.done == len(keys)


def test_buckets_keep_nan_and_inf_and_their_finite_range(redis_client):
    store = HistoryStore(redis_client)
    store.save(RUN, rows(range(300), nan_at={13}, inf_at={27}))
    while store.compact(RUN, latest=299, full_steps=10, window=0):
        pass
    df = frame(RunReader(redis_client, RUN))
    fc1 = df[(df["layer"] == "fc1") & (df["statistic"] == "layer_grad_norm")].set_index(["resolution", "step"])
    assert set(df["resolution"]) == {1, 10, 100}
    b = fc1.loc[(100, 0)]  # 0..99: a NaN and an Inf among 100 steps
    assert math.isnan(b["value"]) and (b["count"], b["nonfinite"]) == (98, 2) and (b["min"], b["max"]) == (0, 99)
    assert fc1.loc[(10, 150)]["value"] == pytest.approx(154.5)  # a bucket's value is its mean
    assert fc1.loc[(1, 299)][["value", "min", "max", "count", "nonfinite"]].tolist() == [299, 299, 299, 1, 0]
    assert set(df.loc[df["resolution"] > 1, "statistic"]) == {"loss", "grad_norm", "layer_grad_norm", "param_norm"}


def test_inf_stays_inf_at_full_resolution(redis_client):
    HistoryStore(redis_client).save(RUN, rows(range(5), inf_at={2}))
    df = frame(RunReader(redis_client, RUN))
    cell = df[(df["step"] == 2) & (df["layer"] == "fc1") & (df["statistic"] == "layer_grad_norm")].iloc[0]
    assert cell["value"] == math.inf and (cell["count"], cell["nonfinite"]) == (0, 1) and pd.isna(cell["max"])


def test_a_step_range_is_the_apis(redis_client):
    store = HistoryStore(redis_client)
    store.save(RUN, rows(range(100), evals={50}))
    while store.compact(RUN, latest=99, full_steps=20, window=0):
        pass
    df = frame(RunReader(redis_client, RUN, first=35, last=60))
    keys = list(dict.fromkeys((s, p, r) for s, p, r, _, _ in cells(df)))
    assert keys == api_keys(store, 35, 60)  # buckets by their first step: 40, 50 and 60 in, 30 out
    assert keys == [(40, "train", 10), (50, "train", 10), (50, "eval", 1), (60, "train", 10)]  # eval stays whole


def test_layers_the_hash_lacks_and_scalars_named_like_statistics(redis_client):
    rec = history_pb2.StepRecord(step=0, time=1.0, loss=0.5, scalars={"loss": 0.1, "accuracy": 0.9})
    rec.grad_norms[7] = 3.0  # an index the layers hash never named: "layer_7", as HistoryStore reads it
    redis_client.hset(history_key(RUN), "0", rec.SerializeToString())
    redis_client.zadd(f"{history_key(RUN)}-steps", {"0": 0})
    df = frame(RunReader(redis_client, RUN))
    assert dict(zip(df["statistic"].astype(str), df["value"], strict=True)) == {
        "loss": 0.5, "scalar:loss": 0.1, "accuracy": 0.9, "layer_grad_norm": 3.0}
    assert df.loc[df["statistic"] == "layer_grad_norm", "layer"].item() == "layer_7"


def test_an_unknown_run_names_the_runs_there(redis_client):
    redis_client.zadd(RUNS_KEY, {"run-a": 1.0, "run-b": 2.0})
    with pytest.raises(RunNotFound, match="no run 'nope'.*run-b, run-a"):
        RunReader(redis_client, "nope")


def test_a_run_without_history_yet_is_an_empty_table(redis_client):
    reg = run_pb2.RunRegistration(run_id=RUN, rank=0, world_size=2)
    reg.hyperparameters["lr"].number = math.nan
    redis_client.hset(registrations_key(RUN), "0", reg.SerializeToString())
    out = io.StringIO()
    assert write(RunReader(redis_client, RUN), "csv", out).rows == 0
    assert out.getvalue().splitlines() == [
        "run,step,phase,resolution,time,layer,statistic,value,min,max,count,nonfinite,hp.lr"]
    buf = io.BytesIO()
    write(RunReader(redis_client, RUN), "parquet", buf)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    assert table.num_rows == 0 and "hp.lr" in table.column_names
    meta = json.loads(table.schema.metadata[b"gradwatch"])
    assert meta["hyperparameters"] == {"lr": "NaN"} and meta["world_size"] == 2  # JSON without NaN


def test_a_long_history_is_written_in_row_groups(redis_client, monkeypatch):
    layers = [f"blocks.{i}" for i in range(50)]
    store = HistoryStore(redis_client)
    for start in range(0, 600, 200):
        store.save(RUN, [(s, float(s), True, 1.0, 1.0, dict.fromkeys(layers, s + 0.5), {}, dict.fromkeys(layers, 3.0))
                         for s in range(start, start + 200)])
    seen = []
    reader = RunReader(redis_client, RUN)
    monkeypatch.setattr("gradwatch.aggregator.export.tables.CHUNK_CELLS", 10_000)  # ~100 steps of 102 cells
    buf = io.BytesIO()
    result = write(reader, "parquet", buf, progress=seen.append)
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    assert result.rows == meta.num_rows == 600 * 102 and meta.num_row_groups == 7
    assert seen[-1] == 600 and seen == sorted(seen) and len(seen) == 7


class Interleaved:
    """A Redis client whose reads let the aggregator's compaction in between them, as another connection's commands
    may come between one client's: `hook` runs after every HMGET the export sends, and inside each pipeline just
    before its last command (a window's read: a fold lands between the two generation reads)."""

    def __init__(self, client, hook):
        self.client, self.hook = client, hook

    def __getattr__(self, name):
        return getattr(self.client, name)

    def hmget(self, *args, **kwargs):
        out = self.client.hmget(*args, **kwargs)
        self.hook()
        return out

    def pipeline(self, *args, **kwargs):
        return _Pipeline(self.client, self.hook)


class _Pipeline:
    def __init__(self, client, hook):
        self.client, self.hook, self.calls = client, hook, []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs)) or self

    def execute(self):
        def run(calls):
            pipe = self.client.pipeline(transaction=False)
            for name, args, kwargs in calls:
                getattr(pipe, name)(*args, **kwargs)
            return pipe.execute() if calls else []
        head = run(self.calls[:-1])
        self.hook()
        return head + run(self.calls[-1:])


def test_an_export_while_compaction_folds_the_history_has_every_step_once(redis_client):
    """Compaction folds rows into buckets while the export reads (the history of a live run): every training step's
    loss is in the file exactly once, whole or in one bucket, and every evaluation row is there."""
    steps = 2000
    store = HistoryStore(redis_client)
    store.save(RUN, rows(range(steps), evals=range(0, steps, 7)))
    folds = []

    def fold():
        # the run goes on: the full-resolution window slides 40 steps further at every chance the export gives it
        latest = 40 * (len(folds) + 1)
        folds.append(store.compact(RUN, latest=latest, full_steps=20, window=0))

    reader = RunReader(Interleaved(redis_client, fold), RUN)
    reader.page = 250  # several windows
    df = frame(reader)
    assert sum(folds) > 200  # rows really moved during the read

    loss = df[(df["statistic"] == "loss") & (df["phase"] == "train")]
    assert loss["count"].sum() == steps  # each step once: not lost between sources, not read twice
    spans = sorted((int(s), int(s) + int(r)) for s, r in zip(loss["step"], loss["resolution"], strict=True))
    assert spans[0][0] == 0 and spans[-1][1] == steps
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # the records tile the steps
    evals = df[(df["statistic"] == "loss") & (df["phase"] == "eval")]
    assert sorted(evals["step"]) == list(range(0, steps, 7))
