"""Child processes and the things that wait on them: stop one (SIGTERM, a bounded wait, then SIGKILL),
say how one ended, decide when a dead one is restarted (exponential backoff, giving up on a crash loop),
poll until a condition holds, or start a local Alertmanager (tests and benchmarks)."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Calls `predicate` every `interval` seconds until it returns something true, and returns that;
    raises TimeoutError naming `what` after `timeout` seconds (the predicate runs at least once)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    """Ask `proc` to stop and wait up to `timeout` seconds, then kill it. Safe on a process that already
    ended. Returns True when it had to be killed."""
    if proc.poll() is not None:
        return False
    proc.terminate()
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def describe_exit(returncode: int | None) -> str:
    """How a child ended, in words: "exit status 1", "killed by SIGKILL" (Popen's negative returncode)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


# A component that dies is back within a second; one that keeps dying is retried ever more slowly, so a
# stack whose Redis is gone does not spin. Five exits within a minute is a crash loop (a bad setting, a
# port someone else took): restarting cannot fix it, so the supervisor gives up and says why.
DEFAULT_RESTART_DELAY_S = 0.5
DEFAULT_RESTART_DELAY_MAX_S = 30.0
DEFAULT_RESTART_STABLE_S = 60.0
DEFAULT_CRASH_LOOP_EXITS = 5
DEFAULT_CRASH_LOOP_WINDOW_S = 60.0


@dataclass(frozen=True)
class RestartPolicy:
    """When a supervised child that died is started again, and when the supervisor gives up on it."""

    delay_s: float = DEFAULT_RESTART_DELAY_S  # the first restart's wait, doubled after each exit ...
    delay_max_s: float = DEFAULT_RESTART_DELAY_MAX_S  # ... up to this
    stable_s: float = DEFAULT_RESTART_STABLE_S  # up this long before it died: the wait starts over at delay_s
    crash_loop_exits: int = DEFAULT_CRASH_LOOP_EXITS  # this many exits ...
    crash_loop_window_s: float = DEFAULT_CRASH_LOOP_WINDOW_S  # ... within this many seconds: give up


class Restarts:
    """One child's exits under a RestartPolicy: how long to wait before the next start, or None to give up.
    Not thread-safe: one supervisor loop calls it."""

    def __init__(self, policy: RestartPolicy | None = None):
        self.policy = policy or RestartPolicy()
        self.count = 0  # restarts made (the supervisor counts each start it makes after an exit)
        self._delay = self.policy.delay_s
        self._exits: deque[float] = deque()  # monotonic times of the exits within the window

    def exited(self, now: float, uptime_s: float) -> float | None:
        """Records an exit at `now` (monotonic) after `uptime_s` seconds up; returns the seconds to wait
        before starting it again, or None when this exit makes a crash loop."""
        policy = self.policy
        if uptime_s >= policy.stable_s:
            self._delay = policy.delay_s
        self._exits.append(now)
        while now - self._exits[0] > policy.crash_loop_window_s:
            self._exits.popleft()
        if len(self._exits) >= policy.crash_loop_exits:
            return None
        delay, self._delay = self._delay, min(self._delay * 2, policy.delay_max_s)
        return delay

    def crash_loop(self) -> str:
        """The crash loop in words, for the give-up message."""
        return f"{len(self._exits)} exits within {self.policy.crash_loop_window_s:g}s"


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether a GET of `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except OSError:
        return False


# Every alert goes to one receiver that does nothing: the alerts themselves are read from the API.
_ALERTMANAGER_CONFIG = "route:\n  receiver: devnull\n  group_wait: 1s\nreceivers:\n  - name: devnull\n"


def start_alertmanager(directory: Path, binary: str = "prometheus-alertmanager",
                       ready_timeout: float = 20.0) -> tuple[subprocess.Popen, str]:
    """A single Alertmanager (no cluster) on a free 127.0.0.1 port, its config and data in `directory`,
    ready to take alerts; returns the process and its URL."""
    from gradwatch.cli.redis_server import free_port

    port = free_port()
    (directory / "am.yml").write_text(_ALERTMANAGER_CONFIG)
    proc = subprocess.Popen([binary, f"--config.file={directory / 'am.yml'}", f"--storage.path={directory / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/-/ready"), ready_timeout, "Alertmanager ready")
    except TimeoutError:
        stop_process(proc)
        raise
    return proc, url
