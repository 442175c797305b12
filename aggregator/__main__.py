"""`python -m gradwatch.aggregator`: runs one aggregator process until SIGINT or SIGTERM.

Start-up order is downstream first: Redis must answer, then the HTTP port (/metrics and the query
API) must open, then the consumer starts. Any of these failing is one clear line on stderr and exit
status 1 (2 for an invalid setting). A signal lets the current batch finish and be acked, then exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from gradwatch.aggregator.config import DEFAULT_METRICS_LISTEN, DEFAULT_REDIS_URL, AggregatorConfig
from gradwatch.settings import ConfigError, given_flags

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("gradwatch.aggregator")
PROG = "gradwatch aggregator"


def build_parser() -> argparse.ArgumentParser:
    env = AggregatorConfig.env_name
    p = argparse.ArgumentParser(
        prog=PROG, description="Reads gradwatch report streams from Redis, evaluates alert rules, serves "
                               "Prometheus metrics and pushes alerts to Alertmanager.")
    p.add_argument("--redis-url", help=f"Redis to read (env {env('redis_url')}; default {DEFAULT_REDIS_URL})")
    p.add_argument("--redis-cluster", action=argparse.BooleanOptionalAction,
                   help=f"--redis-url is any node of a Redis Cluster (env {env('redis_cluster')}; default off)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help=f"where /metrics is served (env {env('metrics_listen')}; default {DEFAULT_METRICS_LISTEN})")
    p.add_argument("--alertmanager-url", metavar="URL",
                   help=f"Alertmanager to push alerts to, e.g. http://127.0.0.1:9093 "
                        f"(env {env('alertmanager_url')}; default: none, alerts go to Redis and /metrics only)")
    p.add_argument("--webhook-url", metavar="URL",
                   help=f"POST every alert transition there as JSON (env {env('webhook_url')}; "
                        f"bearer token from {env('webhook_token')}; default: none)")
    p.add_argument("--consumer", help=f"consumer name in the Redis group (env {env('consumer')}; "
                                      "default HOSTNAME-PID)")
    p.add_argument("--rules", metavar="FILE",
                   help=f"TOML file of rule settings, see aggregator/rules/example.toml (env "
                        f"{env('rules')}; default: the built-in defaults)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # flags over the environment over the defaults; a bad variable stops us here, before Redis
        config = AggregatorConfig.from_env(**given_flags(AggregatorConfig, args))
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return run(config)


def run(config: AggregatorConfig, stop: threading.Event | None = None,
        registry: CollectorRegistry | None = None) -> int:
    """Runs until `stop` is set (or SIGINT/SIGTERM when called from the main thread); returns the exit
    status. For `gradwatch up`, which runs this in-process next to the other components."""
    # Imported here, not at the top: a bad setting is refused before the aggregator's modules load.
    from prometheus_client import CollectorRegistry, ProcessCollector

    from gradwatch.aggregator import gcpolicy
    from gradwatch.aggregator.http.server import ListenError, serve
    from gradwatch.aggregator.http.snapshots import SnapshotStore
    from gradwatch.aggregator.http.views import alert_log
    from gradwatch.aggregator.ingest.client import REDIS_ERRORS
    from gradwatch.aggregator.service import Aggregator

    try:
        config.validate()
        host, port = config.metrics_address()
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory: the aggregator's own cost
    aggregator = None
    try:
        aggregator = Aggregator(config, registry)  # a cluster client asks a node for the slot map here
        aggregator.client.ping()
    except REDIS_ERRORS as e:
        hint = ("give a node of a running Redis Cluster with --redis-url, or drop --redis-cluster for a single Redis"
                if config.redis_cluster else "start it, or choose one with --redis-url")
        print(f"{PROG}: cannot reach Redis at {redact(config.redis_url)}: {e} ({hint})", file=sys.stderr)
        if aggregator is not None:
            aggregator.stop(0)
        return 1
    try:
        server, _ = serve(host, port, registry, aggregator.view, history=aggregator.history,
                          topology=aggregator.topology, alert_log=lambda run: alert_log(aggregator.client, run),
                          frames=aggregator.frames, snapshots=SnapshotStore(aggregator.client),
                          api_token=config.api_token, read_token=config.read_token,
                          allow_unauthenticated=config.allow_unauthenticated)
    except ListenError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        aggregator.stop(0)
        return 1

    stop = stop if stop is not None else threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    targets = ", ".join(["Redis"] + (["Alertmanager"] if config.alertmanager_url else [])
                        + (["webhook"] if config.webhook_url else []))
    redis_at = redact(config.redis_url) + (" (a Redis Cluster)" if config.redis_cluster else "")
    log.info("aggregator %s reading %s; metrics on http://%s:%d/metrics, query API under /api/v1, live view at "
             "/ui/; alerts to %s", config.consumer, redis_at, host, server.server_port, targets)
    # Process-wide, so here and not in Aggregator: an aggregator embedded in another program (a test, a notebook)
    # leaves that program's garbage collection alone.
    gcpolicy.install(config.gc_full_scan_s)  # full collections skip the long-lived state (aggregator/gcpolicy.py)
    aggregator.start()
    try:
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
        log.info("stopping: finishing the current batch")
    finally:
        aggregator.stop(timeout=10.0)
        gcpolicy.uninstall()
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
