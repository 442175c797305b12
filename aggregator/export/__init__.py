"""A run's durable history read out of Redis for pandas, polars or DuckDB: `gradwatch export` (core/cli/export.py)
and `gradwatch.read_run`.

  records.py  the history's sources (full-resolution steps, 10- and 100-step buckets) paged and merged in step
              order into chunks of a tidy table, with the run's registration (hyperparameters, labels)
  tables.py   the layouts (long, wide) and formats (Parquet, CSV, a pandas DataFrame)

Like `gradwatch runs delete` (aggregator/lifecycle.py) it reads Redis directly, not through an aggregator, and
needs only read commands. pandas and pyarrow are the `export` extra: `pip install 'gradwatch[export]'`.
"""

from gradwatch.aggregator.export.records import RunReader
from gradwatch.aggregator.export.run import RunInfo, RunNotFound
from gradwatch.aggregator.export.tables import frame, write

__all__ = ["RunInfo", "RunNotFound", "RunReader", "frame", "write"]
