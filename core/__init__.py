"""gradwatch: live telemetry for neural-network training.

`gradwatch.watch(model, optimizer)` is all a training job needs; the server side runs with
`gradwatch up` (see README.md).

This package holds the public entry point and the contracts every component shares, one home each
(docs/architecture.md): `stats` (mergeable statistics), `streams` (the Redis key layout), `names` (reserved
scalar and tensor names), `limits` (sizes agents may send), `endpoints` (default addresses), `rpc` (the gRPC
push-back trailer), `settings` (the configuration mechanism). The components are gradwatch.agent,
gradwatch.collector and gradwatch.aggregator; operations tooling (the `gradwatch` command, the one-machine
stack, the demo, dashboards) lives in gradwatch.cli.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["watch", "read_run", "__version__"]


def watch(*args, **kwargs):
    """Start watching a model; see gradwatch.agent.watch."""
    # Imported lazily so `import gradwatch` stays cheap for the server side, which has no torch.
    from gradwatch.agent import watch as _watch

    return _watch(*args, **kwargs)


def read_run(run: str, redis_url: str | None = None, *, first: int | None = None, last: int | None = None,
             wide: bool = False, layers: bool = True, data_dir: str | None = None, cluster: bool | None = None):
    """A run's history from Redis as a pandas DataFrame, as `gradwatch export` writes it: one row per step (or 10-
    and 100-step bucket: `resolution`), layer and statistic, training and evaluation (`phase`), NaN and Inf kept,
    the hyperparameters and labels as `hp.<name>` and `label.<name>` columns and in `df.attrs["gradwatch"]`.

    redis_url: default GRADWATCH_REDIS_URL, else the embedded Redis of `gradwatch up` run in `data_dir` (default
    `.gradwatch`). first/last: a step range. wide: one row per step, a column per statistic and layer. layers=False:
    run-level statistics only. Needs the `export` extra: pip install 'gradwatch[export]'.
    """
    # Imported lazily: a training job that imports gradwatch pays for neither pandas nor redis.
    from gradwatch.cli.export import read_run as _read_run

    return _read_run(run, redis_url, first=first, last=last, wide=wide, layers=layers, data_dir=data_dir,
                     cluster=cluster)
