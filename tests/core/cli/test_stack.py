"""`gradwatch up` heals itself, with real processes: a SIGKILLed aggregator, collector or embedded Redis is
started again and the restart logged and counted; a component that keeps exiting makes `up` exit 1 with a
message; a signal stops everything without restarts; and the port probe tells a live listener (refused)
from the TIME_WAIT left by a stack just stopped (free), so stop-then-up on the same ports works at once."""

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
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwatch.cli import main as cli
from gradwatch.cli.processes import RestartPolicy, Restarts, describe_exit, http_ok, wait_until
from gradwatch.cli.redis_server import free_port
from gradwatch.cli.stack import Stack, StackConfig, port_taken

PORTS = ("collector_listen", "collector_metrics_listen", "aggregator_metrics_listen")


# --- the restart policy --------------------------------------------------------------------------------------------

def test_restart_delay_doubles_and_five_quick_exits_are_a_crash_loop():
    restarts = Restarts(RestartPolicy())
    delays = [restarts.exited(now, uptime_s=0.3) for now in (0.0, 0.8, 2.1, 4.4, 8.7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, None]
    assert restarts.crash_loop() == "5 exits within 60s"


def test_restart_delay_is_capped_and_exits_spread_out_never_give_up():
    restarts = Restarts(RestartPolicy())
    delays = [restarts.exited(now, uptime_s=20.0) for now in range(0, 20 * 31, 31)]  # one exit every 31 s
    assert None not in delays
    assert delays[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0] and set(delays[7:]) == {30.0}


def test_restart_delay_starts_over_after_a_stable_run():
    restarts = Restarts(RestartPolicy())
    assert [restarts.exited(t, 1.0) for t in (0.0, 1.0, 3.0)] == [0.5, 1.0, 2.0]
    assert restarts.exited(100.0, uptime_s=60.0) == 0.5  # up a minute: a fresh start


@pytest.mark.parametrize(("returncode", "words"), [(0, "exit status 0"), (2, "exit status 2"),
                                                   (-signal.SIGKILL, "killed by SIGKILL"),
                                                   (-signal.SIGTERM, "killed by SIGTERM")])
def test_describe_exit(returncode, words):
    assert describe_exit(returncode) == words


# --- the port probe ------------------------------------------------------------------------------------------------

def listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def plain_bind_fails(port: int) -> bool:
    """Whether a bind without SO_REUSEADDR (the old probe) fails: a listener, or connections in TIME_WAIT."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            assert err.errno == errno.EADDRINUSE
            return True
    return False


def leave_time_wait(port: int) -> None:
    """What a server that just stopped leaves behind: it closed an accepted connection first, so that
    connection's end on `port` sits in TIME_WAIT (60 s on Linux); nothing listens any more."""
    with listener(port) as server:
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()
        client.recv(1)  # the server's FIN
        client.close()
    wait_until(lambda: plain_bind_fails(port), 5, f"TIME_WAIT on port {port}")


def stack_config(tmp_path: Path, ports: dict[str, str] | None = None) -> StackConfig:
    ports = ports or {name: f"127.0.0.1:{free_port()}" for name in PORTS}
    return StackConfig(data_dir=str(tmp_path / "data"), log_level="WARNING", **ports)


def test_port_probe_counts_a_listener_as_taken_and_time_wait_as_free():
    port = free_port()
    with listener(port):
        assert port_taken("127.0.0.1", port)
    leave_time_wait(port)
    assert plain_bind_fails(port)  # what made `up` refuse for a minute after a stop
    assert not port_taken("127.0.0.1", port)


def test_up_refuses_a_port_with_a_live_listener(tmp_path, capsys):
    cfg = stack_config(tmp_path)
    host, port = cfg.aggregator_metrics_listen.rsplit(":", 1)
    with listener(int(port)):
        code = cli.main(["up", "--data-dir", cfg.data_dir, "--collector-listen", cfg.collector_listen,
                         "--collector-metrics-listen", cfg.collector_metrics_listen,
                         "--aggregator-metrics-listen", cfg.aggregator_metrics_listen])
    assert code == 2
    assert (f"gradwatch up: cannot listen on {host}:{port} (aggregator-metrics-listen): address in use (is "
            "gradwatch already running?); choose another with --aggregator-metrics-listen") in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before anything started


def grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def serving(cfg: StackConfig) -> bool:
    return (http_ok(f"http://{cfg.aggregator_metrics_listen}/healthz") and grpc_serving(cfg.collector_listen)
            and http_ok(f"http://{cfg.collector_metrics_listen}/metrics"))


@pytest.mark.e2e
def test_stop_then_up_again_on_the_same_ports_starts_at_once(tmp_path):
    cfg = stack_config(tmp_path)
    with Stack(cfg.validate()):
        assert serving(cfg)  # connections to every port, closed by the servers' side
    for name in PORTS:
        leave_time_wait(int(getattr(cfg, name).rsplit(":", 1)[1]))  # for certain, whatever the servers did
    started = time.monotonic()
    with Stack(stack_config(tmp_path, {name: getattr(cfg, name) for name in PORTS}).validate()):
        assert serving(cfg)
    assert time.monotonic() - started < 15


# --- restarts ------------------------------------------------------------------------------------------------------

@pytest.fixture
def supervised(tmp_path, caplog):
    """A stack on free ports with an embedded Redis, supervised on a thread as `gradwatch up` does."""
    caplog.set_level(logging.INFO, logger="gradwatch.up")
    stack = Stack(stack_config(tmp_path)).start()
    stop = threading.Event()
    failures: list[BaseException] = []

    def supervise() -> None:
        try:
            stack.supervise(stop)
        except BaseException as err:  # the test reads it
            failures.append(err)

    thread = threading.Thread(target=supervise, name="test-supervise", daemon=True)
    thread.start()
    try:
        yield stack
    finally:
        stop.set()
        thread.join(10)
        stack.stop()
    assert not failures


def restart_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gradwatch.up"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["aggregator", "collector"])
def test_a_killed_component_is_restarted_logged_and_counted(supervised, caplog, name):
    cfg = supervised.config
    old = supervised.process(name)
    old.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    old.wait(5)
    wait_until(lambda: supervised.process(name) is not old, 5, f"a new {name}")
    wait_until(lambda: serving(cfg), 10, "the stack serving again", interval=0.1)
    assert time.monotonic() - killed < 5
    assert supervised.restarts == {name: 1}
    lines = restart_lines(caplog)
    assert any(f"the {name} exited (killed by SIGKILL)" in line and "restart 1 in 0.5s" in line for line in lines)
    assert any(f"restarted the {name} (pid {supervised.process(name).pid}; restart 1)" in line for line in lines)


@pytest.mark.e2e
def test_a_killed_embedded_redis_is_restarted_with_its_data(supervised, caplog):
    url = supervised.redis_url
    client = redis.Redis.from_url(url)
    client.set("gradwatch-test", "kept")
    time.sleep(1.2)  # appendfsync everysec: on disk within a second (a redis-server crash alone loses nothing)
    supervised.redis.kill()
    wait_until(lambda: supervised.restarts.get("redis-server") == 1, 5, "redis-server restarted")
    assert wait_until(lambda: _get(client, "gradwatch-test"), 5, "Redis answering") == b"kept"
    assert serving(supervised.config)
    assert any("the redis-server exited (killed by SIGKILL)" in line for line in restart_lines(caplog))


def _get(client: redis.Redis, key: str) -> bytes | None:
    try:
        return client.get(key)
    except redis.ConnectionError:
        return None


# --- `gradwatch up` as a process -----------------------------------------------------------------------------------

class Up:
    """`python -m gradwatch up` on free ports, its output in a file, in its own process group (a terminal's
    Ctrl-C reaches the whole group)."""

    def __init__(self, tmp_path: Path):
        self.cfg = stack_config(tmp_path)
        self.out = tmp_path / "up.log"
        env = {k: v for k, v in os.environ.items() if k != "GRADWATCH_REDIS_URL"}
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gradwatch", "up", "--data-dir", self.cfg.data_dir,
                 *[arg for name in PORTS for arg in (f"--{name.replace('_', '-')}", getattr(self.cfg, name))]],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_until(lambda: "gradwatch is up" in self.output() or self.proc.poll() is not None, 30, "gradwatch up")
        except TimeoutError:
            self.close()
            raise
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        """The component processes, by name, from /proc."""
        pid = self.proc.pid
        found = {}
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            name = next((part.decode().removeprefix("gradwatch.") for part in cmdline
                         if part.startswith(b"gradwatch.")), "redis-server")
            found[name] = int(child)
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A child of `up` that ended is reaped by it; any left would be reparented, not a zombie of ours.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


@pytest.mark.e2e
def test_up_gives_up_on_a_component_that_keeps_exiting(tmp_path):
    up = Up(tmp_path)
    try:
        children = up.children()
        assert set(children) == {"redis-server", "aggregator", "collector"}
        port = int(up.cfg.aggregator_metrics_listen.rsplit(":", 1)[1])
        os.kill(children["aggregator"], signal.SIGKILL)
        wait_until(lambda: not port_taken("127.0.0.1", port), 5, "the aggregator's port free")
        with listener(port):  # someone else took the port: every restart exits at once
            code = up.proc.wait(30)
    finally:
        up.close()
    out = up.output()
    assert code == 1, out
    assert out.count("cannot listen on") == 4 and "restart 4 in 4.0s" in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("gradwatch up: the aggregator keeps exiting (5 exits within 60s, the last with exit "
                           "status 1 after ")
    assert last.endswith("gave up restarting it (its own message above says why)")
    assert "gradwatch: restarts during this run: aggregator 4" in out
    assert all(gone(pid) for pid in children.values())


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_signal_stops_everything_without_restarts(tmp_path, how):
    up = Up(tmp_path)
    try:
        children = up.children()
        if how == "ctrl-c":
            os.killpg(up.proc.pid, signal.SIGINT)  # the children get it too, and exit on their own
        else:
            up.proc.send_signal(signal.SIGTERM)
        code = up.proc.wait(30)
    finally:
        up.close()
    out = up.output()
    assert code == 0, out
    assert "gradwatch.up" not in out and "restarts during" not in out, out  # no exit noted, no restart
    assert all(gone(pid) for pid in children.values())
    assert not serving(up.cfg)
