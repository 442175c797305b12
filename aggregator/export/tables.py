"""The export's layouts and formats: a run's history chunks (records.py) as columns, written to Parquet one row
group per chunk (pyarrow), to CSV row by row (the standard library), or gathered into one pandas DataFrame.

Layouts:
  long (tidy, the default)  run, step, phase, resolution, time, layer, statistic, value, min, max, count, nonfinite,
                            then hp.<name> and label.<name>: one row per step (or bucket), layer and statistic
  wide                      run, step, phase, resolution, time, loss, grad_norm, <scalars>, grad_norm/<layer>...,
                            param_norm/<layer>..., hp.<name>, label.<name>: one row per step or bucket, its values
                            (a bucket's means) only; a figure a step lacks is null, a NaN stays NaN

Hyperparameters and labels are constant columns (typed as registered: float, int, string, bool), so the tables of
several runs concatenate into one for a groupby; Parquet stores such a column in a few bytes (dictionary and run
length encoding). A Parquet file also carries the run's registration as JSON under the schema metadata key
`gradwatch` (hyperparameters, labels, layers in forward order, world size, agent version; NaN and Inf spelled as
the API does), and read_run puts the same in DataFrame.attrs["gradwatch"].

Types: time is a UTC timestamp in microseconds (CSV: ISO 8601 with Z); run, phase, layer and statistic are
dictionary columns (pandas categoricals) in Parquet; min and max are null where no finite value was folded. NaN and
Inf are written as themselves (CSV: nan, inf, -inf), never as 0 or null.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gradwatch import __version__
from gradwatch.aggregator.export.records import (
    CHUNK_CELLS,
    GRAD_NORM,
    LAYER_GRAD_NORM,
    PARAM_NORM,
    PHASES,
    Chunk,
    RunReader,
)
from gradwatch.names import LOSS

METADATA_KEY = b"gradwatch"
WIDE_CHUNK_CELLS = 1_000_000  # a wide row group of a 1,000-layer run: ~500 rows of ~2,000 columns
CSV_BATCH = 65_536  # rows turned into Python objects at a time
PER_LAYER = {LAYER_GRAD_NORM: GRAD_NORM, PARAM_NORM: PARAM_NORM}  # statistic -> wide column prefix


@dataclass
class Column:
    """One output column of a chunk: kind "const" (data: one value), "int", "float" (`valid`: False = null), "dict"
    (codes into `names`) or "time" (unix seconds)."""

    name: str
    kind: str
    data: object
    names: list[str] | None = None
    valid: np.ndarray | None = None


@dataclass
class Result:
    rows: int = 0
    records: int = 0
    skipped: int = 0  # wide: cells of a layer or scalar that appeared after the columns were fixed


def constants(reader: RunReader) -> list[Column]:
    info = reader.info
    return [Column(f"hp.{k}", "const", v) for k, v in info.hyperparameters.items()] + [
        Column(f"label.{k}", "const", v) for k, v in info.labels.items()]


def _head(reader: RunReader, chunk: Chunk, per_cell: bool) -> list[Column]:
    expand = chunk.per_cell if per_cell else (lambda a: a)
    return [Column("run", "dict", np.zeros(len(chunk.value) if per_cell else len(chunk.step), np.int32),
                   [reader.run]),
            Column("step", "int", expand(chunk.step)),
            Column("phase", "dict", expand(chunk.eval.astype(np.int32)), list(PHASES)),
            Column("resolution", "int", expand(chunk.resolution)),
            Column("time", "time", expand(chunk.time))]


def long_columns(reader: RunReader, chunk: Chunk) -> tuple[list[Column], int]:
    head = _head(reader, chunk, per_cell=True)
    body = [Column("layer", "dict", chunk.layer, chunk.layers),
            Column("statistic", "dict", chunk.statistic, chunk.statistics),
            Column("value", "float", chunk.value),
            Column("min", "float", chunk.min, valid=~np.isnan(chunk.min)),
            Column("max", "float", chunk.max, valid=~np.isnan(chunk.max)),
            Column("count", "int", chunk.count),
            Column("nonfinite", "int", chunk.nonfinite)]
    return head + body + constants(reader), 0


def wide_names(reader: RunReader, scalars: list[str]) -> list[str]:
    layers = reader.layers.names[1:]
    names = [LOSS, GRAD_NORM, *scalars, *(f"{GRAD_NORM}/{x}" for x in layers), *(f"{PARAM_NORM}/{x}" for x in layers)]
    return list(dict.fromkeys(names))


def wide_columns(reader: RunReader, chunk: Chunk, names: list[str]) -> tuple[list[Column], int]:
    index = {name: i for i, name in enumerate(names)}
    lookup = np.full((len(chunk.statistics), len(chunk.layers)), -1, np.int32)
    for s, stat in enumerate(chunk.statistics):
        if stat in PER_LAYER:
            lookup[s, 1:] = [index.get(f"{PER_LAYER[stat]}/{layer}", -1) for layer in chunk.layers[1:]]
        else:
            lookup[s, 0] = index.get(stat, -1)
    where = lookup[chunk.statistic, chunk.layer]
    record = np.repeat(np.arange(len(chunk.step)), chunk.cells)
    ok = where >= 0
    values = np.full((len(names), len(chunk.step)), np.nan)
    present = np.zeros(values.shape, bool)
    values[where[ok], record[ok]] = chunk.value[ok]
    present[where[ok], record[ok]] = True
    body = [Column(name, "float", values[i], valid=present[i]) for i, name in enumerate(names)]
    return _head(reader, chunk, per_cell=False) + body + constants(reader), int((~ok).sum())


def metadata(reader: RunReader, layout: str) -> dict:
    from gradwatch.aggregator.alerts.record import json_number

    info = reader.info
    return {"run": reader.run, "layout": layout, "from": reader.first, "to": reader.last,
            "hyperparameters": {k: json_number(v) if isinstance(v, float) else v
                                for k, v in info.hyperparameters.items()},
            "labels": info.labels, "layers": reader.layers.names[1:], "world_size": info.world_size,
            "agent_version": info.agent_version, "start_time": info.start_time,
            "exported_by": f"gradwatch {__version__}", "exported_at": time.time()}


# -- formats ----------------------------------------------------------------------------------------------------


def arrow_table(columns: list[Column], n: int, schema=None):
    import pyarrow as pa

    arrays = []
    for c in columns:
        if c.kind == "const":
            arrays.append(pa.nulls(n, pa.string()) if c.data is None else pa.repeat(c.data, n))
        elif c.kind == "dict":
            arrays.append(pa.DictionaryArray.from_arrays(pa.array(c.data, pa.int32()), pa.array(c.names, pa.string())))
        elif c.kind == "time":
            micros = np.round(np.asarray(c.data) * 1e6).astype(np.int64)
            arrays.append(pa.array(micros, pa.int64()).view(pa.timestamp("us", "UTC")))
        elif c.kind == "float" and c.valid is not None:
            arrays.append(pa.array(c.data, pa.float64(), mask=~c.valid))
        else:
            arrays.append(pa.array(c.data))
    if schema is not None:
        return pa.Table.from_arrays(arrays, schema=schema)
    return pa.Table.from_arrays(arrays, names=[c.name for c in columns])


def csv_rows(columns: list[Column], n: int, batch: int = CSV_BATCH):
    """The rows as tuples, `batch` at a time: the Python objects of a whole chunk would take several times its
    arrays' memory."""
    names = {id(c): np.array(c.names, dtype=object) for c in columns if c.kind == "dict"}
    for lo in range(0, n, batch):
        hi, out = min(n, lo + batch), []
        for c in columns:
            if c.kind == "const":
                out.append(itertools.repeat(c.data, hi - lo))
                continue
            part = np.asarray(c.data)[lo:hi]
            if c.kind == "dict":
                out.append(names[id(c)][part].tolist())
            elif c.kind == "time":
                micros = np.round(part * 1e6).astype(np.int64).astype("datetime64[us]")
                out.append(np.datetime_as_string(micros, unit="us", timezone="UTC").tolist())
            elif c.kind == "float" and c.valid is not None:
                values = part.astype(object)
                values[~c.valid[lo:hi]] = None  # an empty field; NaN is written as nan
                out.append(values.tolist())
            else:
                out.append(part.tolist())
        yield from zip(*out, strict=True)


class _Layout:
    """The chosen layout's columns for each chunk, the same columns for an empty run."""

    def __init__(self, reader: RunReader, wide: bool):
        self.reader, self.wide = reader, wide
        self.names = wide_names(reader, reader.scalar_names()) if wide else None

    @property
    def name(self) -> str:
        return "wide" if self.wide else "long"

    def columns(self, chunk: Chunk) -> tuple[list[Column], int, int]:
        if self.wide:
            cols, skipped = wide_columns(self.reader, chunk, self.names)
            return cols, len(chunk.step), skipped
        cols, skipped = long_columns(self.reader, chunk)
        return cols, len(chunk.value), skipped

    def chunks(self, progress):
        return self.reader.chunks(WIDE_CHUNK_CELLS if self.wide else CHUNK_CELLS, progress)

    def empty(self) -> Chunk:
        return self.reader.empty()


def write(reader: RunReader, fmt: str, target, wide: bool = False,
          progress: Callable[[int], None] | None = None) -> Result:
    """Writes the run's history to `target` (Parquet: a binary file or path; CSV: a text stream), a chunk at a
    time. Parquet needs pyarrow."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"unknown format {fmt!r}: parquet or csv")
    layout, result = _Layout(reader, wide), Result()
    cols, n, _ = layout.columns(layout.empty())
    if fmt == "parquet":
        import pyarrow.parquet as pq

        schema = arrow_table(cols, n).schema.with_metadata({METADATA_KEY: json.dumps(metadata(reader, layout.name))})
        with pq.ParquetWriter(target, schema, compression="zstd") as writer:
            for chunk in layout.chunks(progress):
                cols, n, skipped = layout.columns(chunk)
                writer.write_table(arrow_table(cols, n, schema), row_group_size=max(1, n))
                result.rows, result.records, result.skipped = result.rows + n, reader.done, result.skipped + skipped
    else:
        out = csv.writer(target, lineterminator="\n")
        out.writerow([c.name for c in cols])
        for chunk in layout.chunks(progress):
            cols, n, skipped = layout.columns(chunk)
            out.writerows(csv_rows(cols, n))
            result.rows, result.records, result.skipped = result.rows + n, reader.done, result.skipped + skipped
    return result


def frame(reader: RunReader, wide: bool = False):
    """The run's history as one pandas DataFrame (via Arrow: categoricals, UTC timestamps), its registration in
    attrs["gradwatch"]."""
    import pyarrow as pa

    layout = _Layout(reader, wide)
    cols, n, _ = layout.columns(layout.empty())
    schema = arrow_table(cols, n).schema
    tables = [arrow_table(*layout.columns(chunk)[:2], schema) for chunk in layout.chunks(None)]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    df = table.to_pandas()
    df.attrs["gradwatch"] = metadata(reader, layout.name)
    return df
