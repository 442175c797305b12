"""Running a test file as a real multi-process job: one interpreter per rank (as torchrun starts them), each
`python FILE RANK WORLD_SIZE PORT *ARGS`, with gloo on the loopback, a hang guard, and each rank's output kept
for the failure message."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gradwatch.cli.redis_server import free_port

REPO = Path(__file__).resolve().parents[3]  # a rank imports the test file's own imports, `tests` among them


def run_ranks(script: str, world_size: int, tmp_path: Path, timeout_s: float,
              args: Callable[[int], list[str]]) -> None:
    """Runs `script` once per rank (`args(rank)` after rank, world size and a free rendezvous port) and waits
    for all; no child outlives the call; asserts every rank exited 0, showing the tail of a failed one's log."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # containers whose hostname does not resolve
    procs, logs = [], [tmp_path / f"rank{rank}.log" for rank in range(world_size)]
    try:
        for rank in range(world_size):
            with open(logs[rank], "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, script, str(rank), str(world_size), str(port), *args(rank)],
                    stdout=out, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        for proc in procs:  # on a timeout or an error: no child outlives the test
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{logs[rank].read_text()[-4000:]}"
