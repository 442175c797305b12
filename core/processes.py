"""Child processes and the things that wait on them: stop one (SIGTERM, a bounded wait, then SIGKILL),
or poll until a condition holds."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
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
