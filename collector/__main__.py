"""`python -m gradwatch.collector`: parse flags over environment defaults, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence

from gradwatch.collector.config import CollectorConfig, redact_url
from gradwatch.collector.server import CollectorServer, CollectorStartError
from gradwatch.settings import ConfigError

# In-flight calls get this long to finish on shutdown; the agent retries whatever is cut off.
SHUTDOWN_GRACE_S = 5.0

log = logging.getLogger("gradwatch.collector")


def add_arguments(parser: argparse.ArgumentParser, defaults: CollectorConfig | None = None) -> None:
    """The collector's flags, defaults from the environment (also used by `gradwatch collector`)."""
    d = defaults if defaults is not None else CollectorConfig.from_env()
    parser.add_argument("--listen", default=d.listen, metavar="HOST:PORT",
                        help=f"gRPC address agents export to (default {d.listen}; env GRADWATCH_COLLECTOR_LISTEN)")
    parser.add_argument("--redis-url", default=d.redis_url, metavar="URL",
                        help=f"Redis to write streams to (env GRADWATCH_REDIS_URL; default {redact_url(d.redis_url)})")
    parser.add_argument("--redis-cluster", action=argparse.BooleanOptionalAction, default=d.redis_cluster,
                        help="--redis-url is any node of a Redis Cluster (env GRADWATCH_REDIS_CLUSTER)")
    parser.add_argument("--stream-maxlen", type=int, default=d.stream_maxlen, metavar="N",
                        help="approximate entries kept per run stream (env GRADWATCH_STREAM_MAXLEN; "
                             "default %(default)s)")
    parser.add_argument("--token", default=d.token, metavar="TOKEN",
                        help="bearer token agents must send; prefer env GRADWATCH_TOKEN, flags show in `ps`")
    parser.add_argument("--metrics-listen", default=d.metrics_listen, metavar="HOST:PORT",
                        help="address of the collector's own /metrics, '' disables (env "
                             "GRADWATCH_COLLECTOR_METRICS_LISTEN; default %(default)s)")
    parser.add_argument("--tls-cert", default=d.tls_cert_file, metavar="FILE",
                        help="PEM certificate (chain) to serve TLS with, needs --tls-key (env "
                             "GRADWATCH_COLLECTOR_TLS_CERT; default: plaintext)")
    parser.add_argument("--tls-key", default=d.tls_key_file, metavar="FILE",
                        help="PEM private key of --tls-cert (env GRADWATCH_COLLECTOR_TLS_KEY)")
    parser.add_argument("--tls-client-ca", default=d.tls_client_ca_file, metavar="FILE",
                        help="PEM CA bundle; when set, agents must present a certificate it signed (mTLS) (env "
                             "GRADWATCH_COLLECTOR_TLS_CLIENT_CA)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default %(default)s")
    # Kept so add_arguments() callers can rebuild the config from the same environment.
    parser.set_defaults(_collector_defaults=d)


def config_from_args(args: argparse.Namespace) -> CollectorConfig:
    """The validated config the parsed flags describe; raises ConfigError."""
    base: CollectorConfig = getattr(args, "_collector_defaults", None) or CollectorConfig.from_env()
    # An empty flag value means "not set", so `--tls-cert ''` can switch off TLS configured in the environment.
    return dataclasses.replace(base, listen=args.listen, redis_url=args.redis_url,
                               redis_cluster=args.redis_cluster, stream_maxlen=args.stream_maxlen,
                               token=args.token, metrics_listen=args.metrics_listen,
                               tls_cert_file=args.tls_cert or None, tls_key_file=args.tls_key or None,
                               tls_client_ca_file=args.tls_client_ca or None).validate()


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
