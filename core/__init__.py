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
__all__ = ["watch", "__version__"]


def watch(*args, **kwargs):
    """Start watching a model; see gradwatch.agent.watch."""
    # Imported lazily so `import gradwatch` stays cheap for the server side, which has no torch.
    from gradwatch.agent import watch as _watch

    return _watch(*args, **kwargs)
