"""`gradwatch export RUN`: a run's history out of Redis into a Parquet or CSV file for pandas, polars or DuckDB; and
`gradwatch.read_run(RUN)`, the same as a pandas DataFrame.

Both read the aggregator's durable history (gradwatch.aggregator.export): every step it kept whole and the 10- and
100-step buckets older steps were folded into (`resolution`), training and evaluation, with the run's
hyperparameters and labels. Like `gradwatch runs delete` they talk to Redis, not to an aggregator, found the same
way (gradwatch.cli.runs `redis_target`): --redis-url, else GRADWATCH_REDIS_URL, else the embedded Redis of
`gradwatch up` recorded in its data dir (--data-dir, GRADWATCH_UP_DATA_DIR, `.gradwatch`), else the default. They
need only read commands: the `reader` user of deploy/redis/users.acl will do.

The file is written beside its final name and renamed when complete, so an interrupted export leaves no truncated
file that looks whole. Progress goes to stderr: a line updated in place on a terminal, a line every PROGRESS_S
otherwise (only long exports print one).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FORMATS = ("parquet", "csv")  # gradwatch.aggregator.export.write's
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
INSTALL = "pip install 'gradwatch[export]'"
PROGRESS_S = 10.0  # between progress lines when stderr is not a terminal
TTY_REFRESH_S = 0.2
TIMEOUT_S = 30.0  # one page of a 1,000-layer run is a reply of a few MB


def open_redis(redis_url: str | None = None, data_dir: str | None = None, cluster: bool | None = None):
    """(client, URL as shown, where it came from) of the Redis `gradwatch up` uses."""
    import redis
    from redis.cluster import RedisCluster

    from gradwatch.cli.runs import redis_target
    from gradwatch.collector.config import redact_url
    from gradwatch.streams import quiet_handshake

    url, where, cluster = redis_target(redis_url, data_dir, cluster)
    options = dict(socket_timeout=TIMEOUT_S, socket_connect_timeout=5, **quiet_handshake())
    client = RedisCluster.from_url(url, **options) if cluster else redis.Redis.from_url(url, **options)
    return client, redact_url(url), where


def read_run(run: str, redis_url: str | None = None, *, first: int | None = None, last: int | None = None,
             wide: bool = False, layers: bool = True, data_dir: str | None = None, cluster: bool | None = None,
             client=None):
    """The run's history as a pandas DataFrame; see gradwatch.read_run."""
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise ImportError(f"gradwatch.read_run needs pandas and pyarrow ({err.name} is missing): {INSTALL}") from err
    from gradwatch.aggregator.export import RunReader, frame

    own = client is None
    if own:
        client = open_redis(redis_url, data_dir, cluster)[0]
    try:
        return frame(RunReader(client, run, first, last, layers), wide)
    finally:
        if own:
            client.close()


def format_of(fmt: str | None, output: str | None) -> str:
    """--format, else the output's suffix, else parquet."""
    if fmt:
        return fmt
    return SUFFIXES.get(Path(output).suffix.lower(), "parquet") if output and output != "-" else "parquet"


class Progress:
    """Records read of the total, on stderr."""

    def __init__(self, err, run: str, total: int, quiet: bool = False):
        self.err, self.run, self.total = err, run, total
        self.tty = not quiet and hasattr(err, "isatty") and err.isatty()
        self.quiet = quiet
        self.start = self.shown = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.quiet or now - self.shown < (TTY_REFRESH_S if self.tty else PROGRESS_S):
            return
        self.shown = now
        share = f" ({100 * done / self.total:.0f} %)" if self.total else ""
        line = f"exporting {self.run}: {done:,} of {self.total:,} steps and buckets{share}, {now - self.start:.0f} s"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=self.err, flush=True)

    def finish(self) -> None:
        if self.tty and self.shown > self.start:
            print(file=self.err)


def main_export(run: str, fmt: str | None = None, output: str | None = None, redis_url: str | None = None,
                data_dir: str | None = None, cluster: bool | None = None, first: int | None = None,
                last: int | None = None, wide: bool = False, layers: bool = True, quiet: bool = False,
                out=None, err=None) -> int:
    """Writes the run's history to `output` (default RUN.parquet or RUN.csv; "-": stdout). 0 when written, 1 when
    the run or Redis failed, 2 for a usage error or a missing extra."""
    out, err = out or sys.stdout, err or sys.stderr
    me = "gradwatch export"
    fmt = format_of(fmt, output)
    if first is not None and last is not None and first > last:
        print(f"{me}: --from {first} is after --to {last}", file=err)
        return 2
    try:
        import numpy  # noqa: F401
        import redis  # noqa: F401 - the export reads Redis directly: say so here if it is missing

        if fmt == "parquet":
            import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        print(f"{me}: {e.name} is missing (needed for {fmt}): {INSTALL}", file=err)
        return 2
    from gradwatch.aggregator.export import RunNotFound, RunReader, write
    from gradwatch.aggregator.ingest.client import REDIS_ERRORS
    from gradwatch.cli.runs import redis_failure

    to_stdout = output == "-"
    if to_stdout and fmt == "parquet" and hasattr(out, "isatty") and out.isatty():
        print(f"{me}: Parquet is binary: not writing it to a terminal (--output FILE, or pipe it)", file=err)
        return 2
    path = None if to_stdout else Path(output or f"{run.replace(':', '-')}.{fmt}")
    client = shown = where = part = None
    try:
        client, shown, where = open_redis(redis_url, data_dir, cluster)
        reader = RunReader(client, run, first, last, layers)
        progress = Progress(err, run, reader.total(), quiet)
        if to_stdout:
            target = out.buffer if fmt == "parquet" else out
            result = write(reader, fmt, target, wide, progress)
            target.flush()
        else:
            part = path.with_name(f".{path.name}.{os.getpid()}.part")
            with open(part, "wb") if fmt == "parquet" else open(part, "w", newline="", encoding="utf-8") as f:
                result = write(reader, fmt, f, wide, progress)
            os.replace(part, path)
            part = None
        progress.finish()
    except RunNotFound as e:
        print(f"{me}: {e} (Redis at {shown}, {where}; see gradwatch runs list)", file=err)
        return 1
    except REDIS_ERRORS as e:
        print(redis_failure(me, e, shown, where, "read the run: use one with read access to gradwatch:*, such as "
                            "the reader user of deploy/redis/users.acl"), file=err)
        return 1
    finally:
        if part is not None:
            part.unlink(missing_ok=True)
        if client is not None:
            client.close()
    if not quiet:
        where_to = "stdout" if to_stdout else str(path)
        note = "" if result.records else " (no history yet: the aggregator writes it as it applies reports)"
        skipped = f"; {result.skipped:,} values of layers or scalars newer than the export left out" \
            if result.skipped else ""
        print(f"wrote {result.rows:,} rows ({result.records:,} steps and buckets) of run {run} to {where_to}"
              f"{note}{skipped}", file=err)
    return 0
