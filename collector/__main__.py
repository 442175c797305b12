"""`python -m gradwatch.collector`: flags over the environment over the defaults, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from gradwatch.collector.config import (
    DEFAULT_LISTEN,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_REDIS_URL,
    DEFAULT_STREAM_MAXLEN,
    CollectorConfig,
)
from gradwatch.collector.server import CollectorServer, CollectorStartError
from gradwatch.settings import ConfigError, given_flags, load

# In-flight calls get this long to finish on shutdown; the agent retries whatever is cut off.
SHUTDOWN_GRACE_S = 5.0

log = logging.getLogger("gradwatch.collector")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The collector's flags (also used by `gradwatch collector`); a flag left out falls back to its variable."""
    env = CollectorConfig.env_name
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help=f"gRPC address agents export to (default {DEFAULT_LISTEN}; env {env('listen')})")
    parser.add_argument("--redis-url", metavar="URL",
                        help=f"Redis to write streams to (env {env('redis_url')}; default {DEFAULT_REDIS_URL})")
    parser.add_argument("--redis-cluster", action=argparse.BooleanOptionalAction,
                        help=f"--redis-url is any node of a Redis Cluster (env {env('redis_cluster')})")
    parser.add_argument("--stream-maxlen", type=int, metavar="N",
                        help=f"hard cap on entries per run stream, for an aggregator down for long; entries "
                             f"trimmed unread raise StreamDataLost (env {env('stream_maxlen')}; "
                             f"default {DEFAULT_STREAM_MAXLEN})")
    parser.add_argument("--token", metavar="TOKEN",
                        help=f"bearer token agents must send; prefer env {env('token')}, flags show in `ps`")
    parser.add_argument("--tokens-file", metavar="FILE",
                        help=f"scoped agent tokens, one '<token> <run-id-prefix>' a line ('*': any run); a token "
                             f"writes only the runs its prefix allows (env {env('tokens_file')})")
    parser.add_argument("--allow-unauthenticated", action=argparse.BooleanOptionalAction,
                        help=f"listen beyond loopback without a token (gRPC: no token and no mTLS; /metrics: no "
                             f"{env('read_token')}), on purpose (env {env('allow_unauthenticated')}; default off: "
                             "such a listener refuses to start)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help=f"address of the collector's own /metrics, '' disables (env {env('metrics_listen')}; "
                             f"default {DEFAULT_METRICS_LISTEN})")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help=f"PEM certificate (chain) to serve TLS with, needs --tls-key (env "
                             f"{env('tls_cert_file')}; default: plaintext)")
    parser.add_argument("--tls-key", metavar="FILE",
                        help=f"PEM private key of --tls-cert (env {env('tls_key_file')})")
    parser.add_argument("--tls-client-ca", metavar="FILE",
                        help=f"PEM CA bundle; when set, agents must present a certificate it signed (mTLS) (env "
                             f"{env('tls_client_ca_file')})")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default %(default)s")


def config_from_args(args: argparse.Namespace) -> CollectorConfig:
    """The validated config: each flag given, else its environment variable, else the default; raises
    ConfigError (naming the variable when one is bad)."""
    flags = given_flags(CollectorConfig, args)
    # An empty flag value means "not set", so `--tls-cert ''` can switch off TLS configured in the environment.
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "tokens_file"):
        if flags.get(name) == "":
            flags[name] = None
    return load(CollectorConfig, flags).validate()


async def serve(config: CollectorConfig, stop: asyncio.Event | None = None) -> None:
    """Run a collector until `stop` is set (or SIGINT/SIGTERM when `stop` is None), then shut it down."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    server = CollectorServer(config)
    await server.start()
    try:
        await stop.wait()
        log.info("gradwatch collector stopping: finishing in-flight calls (up to %.0fs)", SHUTDOWN_GRACE_S)
    finally:
        await server.stop(SHUTDOWN_GRACE_S)


def run(config: CollectorConfig) -> int:
    """Serve `config` in this thread until a signal; 0 on a clean stop, 1 (one log line) if it cannot start."""
    try:
        asyncio.run(serve(config))
    except CollectorStartError as err:
        log.error("gradwatch collector: %s", err)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradwatch.collector",
                                     description="Receive agents' telemetry over gRPC and write it to Redis.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as err:
        log.error("gradwatch collector: invalid configuration: %s", err)
        return 1
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
