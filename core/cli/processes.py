"""Child processes and the things that wait on them: stop one (SIGTERM, a bounded wait, then SIGKILL),
poll until a condition holds, or start a local Alertmanager (tests and benchmarks)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable
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
