"""The `gradwatch` command: up, demo, collector, aggregator, grafana, gradcheck, runs, export."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gradwatch import __version__
from gradwatch.names import GRADCHECK_PREFIX
from gradwatch.settings import ConfigError


def _stack_args(parser: argparse.ArgumentParser) -> None:
    from gradwatch.cli.stack import (
        DEFAULT_AGGREGATOR_METRICS_LISTEN,
        DEFAULT_COLLECTOR_LISTEN,
        DEFAULT_COLLECTOR_METRICS_LISTEN,
        DEFAULT_DATA_DIR,
        StackConfig,
    )

    # No defaults here: a flag left out falls back to its variable, then to the default (StackConfig.from_env).
    env = StackConfig.env_name
    parser.add_argument("--redis-url", help=f"use this Redis instead of an embedded one (env {env('redis_url')})")
    parser.add_argument("--data-dir", help=f"where the embedded Redis keeps its data (env {env('data_dir')}; "
                                           f"default {DEFAULT_DATA_DIR})")
    parser.add_argument("--collector-listen", help=f"gRPC address (env {env('collector_listen')}; "
                                                   f"default {DEFAULT_COLLECTOR_LISTEN})")
    parser.add_argument("--collector-metrics-listen", help=f"collector self-metrics (env "
                                                           f"{env('collector_metrics_listen')}; default "
                                                           f"{DEFAULT_COLLECTOR_METRICS_LISTEN})")
    parser.add_argument("--aggregator-metrics-listen", "--metrics-listen", dest="aggregator_metrics_listen",
                        help=f"Prometheus /metrics (env {env('aggregator_metrics_listen')}; default "
                             f"{DEFAULT_AGGREGATOR_METRICS_LISTEN})")
    parser.add_argument("--alertmanager-url", help=f"push alerts to this Alertmanager (env {env('alertmanager_url')})")
    parser.add_argument("--rules", metavar="FILE",
                        help=f"the aggregator's rule settings, TOML (env {env('rules')}; default: the "
                             f"aggregator's own GRADWATCH_AGGREGATOR_RULES)")


def _config(args):
    """The stack's settings: flags given, else GRADWATCH_UP_* (and the shared) variables, else the defaults."""
    from gradwatch.cli.stack import StackConfig
    from gradwatch.settings import given_flags

    return StackConfig.from_env(**given_flags(StackConfig, args))


def cmd_up(args) -> int:
    from gradwatch.cli.stack import Stack, run_forever

    cfg = _config(args).validate()
    stack = Stack(cfg).start()
    where = f" (embedded, data in {cfg.data_dir})" if stack.redis else ""
    print(f"gradwatch is up\n  redis      {stack.redis_url}{where}"
          f"\n  collector  {cfg.collector_listen}  (point agents here: GRADWATCH_COLLECTOR)"
          f"\n  metrics    http://{cfg.aggregator_metrics_listen}/metrics  (aggregator)"
          f"\n             http://{cfg.collector_metrics_listen}/metrics  (collector)"
          f"\n  live view  http://{cfg.aggregator_metrics_listen}/"
          f"\nA component that exits is restarted; Ctrl-C stops them all.", flush=True)
    return run_forever(stack)


def cmd_demo(args) -> int:
    from gradwatch.cli.demo import print_summary, run_demo

    cfg = _config(args)
    ok: list[bool] = []

    def keep_up(result) -> None:
        # The stack stays up for the live view until Ctrl-C or SIGTERM.
        import signal
        import threading

        ok.append(print_summary(result))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"\nlive view: http://{cfg.aggregator_metrics_listen}/#run={result.run}  (Ctrl-C stops the stack)",
              flush=True)
        while not stop.wait(0.5):
            pass

    result = run_demo(cfg, steps=args.steps, blowup_step=args.blowup_step, before_stop=keep_up if args.keep else None)
    return 0 if (ok[0] if ok else print_summary(result)) else 1


def _grafana_args(parser: argparse.ArgumentParser) -> None:
    from gradwatch.cli.grafana import DEFAULT_DIR, DEFAULT_FOLDER_UID

    sub = parser.add_subparsers(dest="grafana_command", required=True)
    gen = sub.add_parser("generate", help="write the dashboards as JSON (deploy/grafana/dashboards)")
    gen.add_argument("--out", type=Path, default=DEFAULT_DIR, help="directory (%(default)s)")
    gen.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are out of date")
    push = sub.add_parser("push", help="upload the dashboards to a Grafana (HTTP API, via grafana-client)")
    push.add_argument("--url", required=True, help="Grafana base URL, e.g. http://localhost:3000")
    push.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN") or None,
                      help="service-account token (env GRAFANA_TOKEN); without one, user:password in --url")
    push.add_argument("--folder-uid", default=DEFAULT_FOLDER_UID, help="folder, created if missing (%(default)s)")
    push.add_argument("--from", dest="from_dir", type=Path, default=None,
                      help="push these JSON files instead of freshly generated dashboards")


def cmd_grafana(args) -> int:
    try:
        from gradwatch.cli import grafana
        if args.grafana_command == "generate":
            return grafana.main_generate(args.out, args.check)
        from grafana_client.client import GrafanaException
    except ImportError as err:
        print(f"gradwatch grafana: {err.name} is missing: pip install 'gradwatch[deploy]'", file=sys.stderr)
        return 2
    try:
        return grafana.main_push(args.url, args.token, args.folder_uid, args.from_dir)
    except GrafanaException as err:
        status = f"HTTP {err.status_code}: " if getattr(err, "status_code", 0) else ""
        print(f"gradwatch grafana push: {status}{getattr(err, 'message', None) or err}", file=sys.stderr)
        return 1


def _gradcheck_args(parser: argparse.ArgumentParser) -> None:
    from gradwatch.agent import gradcheck as debug

    parser.add_argument("spec", metavar="MODULE:FUNCTION",
                        help="a function returning (model, loss_fn, batch), e.g. mypkg.models:gradcheck_case or "
                             "examples/gradcheck.py:broken")
    parser.add_argument("--eps", type=float, default=debug.DEFAULT_EPS, help="perturbation (%(default)g)")
    parser.add_argument("--samples", type=int, default=debug.DEFAULT_SAMPLES,
                        help="coordinates per parameter tensor (%(default)s)")
    parser.add_argument("--tolerance", type=float, default=debug.DEFAULT_TOLERANCE,
                        help="largest relative error that passes (%(default)g)")
    parser.add_argument("--seed", type=int, default=debug.DEFAULT_SEED, help="coordinate sampling (%(default)s)")
    parser.add_argument("--train", action="store_true", help="check in training mode (dropout, batch norm)")
    parser.add_argument("--run", default=None,
                        help="also send the result as telemetry of this run (to --collector, evaluation scalars)")
    parser.add_argument("--collector", default=None, help="collector host:port (env GRADWATCH_COLLECTOR)")


def cmd_gradcheck(args) -> int:
    from gradwatch.agent import gradcheck as debug

    try:
        model, loss_fn, batch = debug.load_spec(args.spec)
    except (ValueError, ImportError) as err:
        print(f"gradwatch gradcheck: {err}", file=sys.stderr)
        return 2
    watcher = None
    if args.run or args.collector:
        import gradwatch

        watcher = gradwatch.watch(model, run=args.run, collector=args.collector)
    try:
        report = debug.gradcheck(model, loss_fn, batch, eps=args.eps, samples=args.samples,
                                 tolerance=args.tolerance, seed=args.seed, train=args.train, watcher=watcher)
    finally:
        if watcher is not None:
            watcher.close()
    print(report.table())
    if watcher is not None:
        print(f"sent as evaluation scalars {GRADCHECK_PREFIX}* of run {watcher.run!r}")
    return 0 if report.passed else 1


def _runs_args(parser: argparse.ArgumentParser) -> None:
    from gradwatch.cli.runs import DEFAULT_URL

    sub = parser.add_subparsers(dest="runs_command", required=True)
    for name, what in (("list", "every run the aggregator knows"), ("compare", "runs side by side")):
        p = sub.add_parser(name, help=what)
        if name == "compare":
            p.add_argument("runs", nargs="+", metavar="RUN")
        p.add_argument("--url", default=DEFAULT_URL, help="the aggregator's HTTP address (%(default)s)")
        p.add_argument("--json", action="store_true", help="the API's answers as JSON")
    delete = sub.add_parser("delete", help="delete everything Redis holds of a run: keys, index entry, alerts")
    delete.add_argument("run", metavar="RUN")
    delete.add_argument("--force", action="store_true",
                        help="delete a run that reported within the last hour too (aggregators still follow it)")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for a confirmation")
    _redis_args(delete, "delete the run's keys (e.g. the admin user")


def _redis_args(parser: argparse.ArgumentParser, allowed: str) -> None:
    """Where the commands that go to Redis directly (runs delete, export) find it, and as whom."""
    parser.add_argument("--redis-url", help=f"Redis, as a user allowed to {allowed} of deploy/redis/users.acl); "
                                            "default: GRADWATCH_REDIS_URL, else the embedded Redis of gradwatch up, "
                                            "else the components' default")
    parser.add_argument("--redis-cluster", action=argparse.BooleanOptionalAction, default=None,
                        help="the Redis URL names a node of a Redis Cluster (env GRADWATCH_REDIS_CLUSTER)")
    parser.add_argument("--data-dir", help="the data dir of gradwatch up, to find its embedded Redis (env "
                                           "GRADWATCH_UP_DATA_DIR; default .gradwatch)")


def cmd_runs(args) -> int:
    from gradwatch.cli import runs

    if args.runs_command == "delete":
        return runs.main_delete(args.run, redis_url=args.redis_url, cluster=args.redis_cluster,
                                data_dir=args.data_dir, force=args.force, yes=args.yes)
    if args.runs_command == "list":
        return runs.main_list(args.url, args.json)
    return runs.main_compare(args.url, args.runs, args.json)


def _export_args(parser: argparse.ArgumentParser) -> None:
    from gradwatch.cli.export import FORMATS

    parser.add_argument("run", metavar="RUN")
    parser.add_argument("--format", choices=FORMATS, help="default: from --output's suffix, else parquet")
    parser.add_argument("--output", "-o", metavar="PATH", help="default RUN.parquet or RUN.csv; - for stdout")
    parser.add_argument("--from", dest="first", type=int, metavar="STEP", help="first step (a bucket: its first step)")
    parser.add_argument("--to", dest="last", type=int, metavar="STEP", help="last step")
    parser.add_argument("--wide", action="store_true",
                        help="one row per step: a column per statistic and layer (default: one row per step, layer "
                             "and statistic)")
    parser.add_argument("--no-layers", dest="layers", action="store_false",
                        help="run-level statistics only (loss, gradient norm, scalars)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or summary on stderr")
    _redis_args(parser, "read gradwatch:* (e.g. the reader user")


def cmd_export(args) -> int:
    from gradwatch.cli.export import main_export

    return main_export(args.run, fmt=args.format, output=args.output, redis_url=args.redis_url,
                       data_dir=args.data_dir, cluster=args.redis_cluster, first=args.first, last=args.last,
                       wide=args.wide, layers=args.layers, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The component commands own their flags: pass everything after the name straight through, before the
    # other commands' parsers are built (they import the agent; a component starts, or fails, in well under 1 s).
    if argv and argv[0] in ("collector", "aggregator"):
        if argv[0] == "collector":
            from gradwatch.collector.__main__ import main as component_main
        else:
            from gradwatch.aggregator.__main__ import main as component_main
        return component_main(argv[1:])
    parser = argparse.ArgumentParser(prog="gradwatch", description="Live telemetry for neural-network training.")
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole stack on this machine (embedded Redis unless --redis-url)")
    _stack_args(up)
    demo = sub.add_parser("demo", help="the stack plus a small model whose learning rate blows up")
    _stack_args(demo)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--blowup-step", type=int, default=200)
    demo.add_argument("--keep", action="store_true", help="keep the stack up after training, for the live view")
    sub.add_parser("collector", help="run a collector (see gradwatch collector --help)", add_help=False)
    sub.add_parser("aggregator", help="run an aggregator (see gradwatch aggregator --help)", add_help=False)
    _grafana_args(sub.add_parser("grafana", help="dashboards: generate the JSON files, push them to a Grafana"))
    _gradcheck_args(sub.add_parser("gradcheck", help="check a model's gradients against central differences"))
    _runs_args(sub.add_parser("runs", help="runs side by side, from the aggregator's API; delete one from Redis"))
    _export_args(sub.add_parser("export", help="a run's history from Redis to Parquet or CSV (pandas, polars, DuckDB)"))

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return {"up": cmd_up, "demo": cmd_demo, "grafana": cmd_grafana, "gradcheck": cmd_gradcheck,
                "runs": cmd_runs, "export": cmd_export}[args.command](args)
    except ConfigError as err:
        print(f"gradwatch {args.command}: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as err:
        print(f"gradwatch {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
