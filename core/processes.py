"""Stopping a child process: SIGTERM, a bounded wait, then SIGKILL."""

from __future__ import annotations

import subprocess


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
