"""`python -m gradwatch.aggregator` as a real process: start-up errors, serving, graceful stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from gradwatch.aggregator import gcpolicy
from gradwatch.aggregator.__main__ import redact, run
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.cli.redis_server import free_port


def aggregator(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gradwatch.aggregator", "--consumer", "test", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_taken_metrics_port_is_one_clear_line(redis_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = aggregator("--redis-url", redis_url, "--metrics-listen", f"127.0.0.1:{port}")
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert err.strip() == (f"gradwatch aggregator: cannot listen on 127.0.0.1:{port}: address in use (another "
                           "aggregator running? choose one with --metrics-listen)")


def test_unreachable_redis_is_one_clear_line():
    port = free_port()
    proc = aggregator("--redis-url", f"redis://:secret@127.0.0.1:{port}/0", "--metrics-listen",
                      f"127.0.0.1:{free_port()}")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert err.startswith(f"gradwatch aggregator: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: ")
    assert "secret" not in err and len(err.strip().splitlines()) == 1


def test_cluster_mode_against_one_redis_is_one_clear_line(redis_url):
    proc = aggregator("--redis-url", redis_url, "--redis-cluster", "--metrics-listen", f"127.0.0.1:{free_port()}")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert err.startswith(f"gradwatch aggregator: cannot reach Redis at {redis_url}: ")
    assert "Cluster mode is not enabled" in err and err.rstrip().endswith("or drop --redis-cluster for a single Redis)")
    assert len(err.strip().splitlines()) == 1


def test_invalid_setting_exits_2(redis_url):
    proc = aggregator("--redis-url", redis_url, "--metrics-listen", "no-port-here")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "GRADWATCH_AGGREGATOR_METRICS_LISTEN" in err


def test_invalid_webhook_url_exits_2(redis_url):
    proc = aggregator("--redis-url", redis_url, "--webhook-url", "hooks.example")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "GRADWATCH_AGGREGATOR_WEBHOOK_URL" in err


def test_a_bad_variable_stops_gradwatch_aggregator_within_a_second():
    """The issue's check, run as a user would: `GRADWATCH_AGGREGATOR_LEASE_TTL_MS=abc gradwatch aggregator`."""
    gradwatch = shutil.which("gradwatch", path=os.path.dirname(sys.executable)) or shutil.which("gradwatch")
    assert gradwatch, "the gradwatch console script is not installed next to this Python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    started = time.monotonic()
    proc = subprocess.run([gradwatch, "aggregator"], capture_output=True, text=True, timeout=30,
                          env={**env, "GRADWATCH_AGGREGATOR_LEASE_TTL_MS": "abc"})
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("gradwatch aggregator: invalid GRADWATCH_AGGREGATOR_LEASE_TTL_MS='abc': "
                                   "expected integer >= 0")
    assert elapsed < 1.0, f"took {elapsed:.2f}s"


def test_a_flag_overrides_the_environment(redis_url):
    env = {**os.environ, "GRADWATCH_AGGREGATOR_METRICS_LISTEN": "no-port-here"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch.aggregator", "--consumer", "test", "--redis-url",
                             redis_url, "--metrics-listen", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0


def test_serves_metrics_and_stops_on_sigterm(redis_url, build, publish):
    publish.registration(build.registration())
    publish.report(build.report(0, grad={"fc2": 7.0}))
    port = free_port()
    proc = aggregator("--redis-url", redis_url, "--metrics-listen", f"127.0.0.1:{port}")
    try:
        text, deadline = "", time.monotonic() + 15
        while 'gradwatch_layer_grad_norm{layer="fc2",run="demo"} 7.0' not in text and time.monotonic() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
            except OSError:
                time.sleep(0.05)
        assert 'gradwatch_layer_grad_norm{layer="fc2",run="demo"} 7.0' in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/runs/demo", timeout=5) as resp:
            assert json.loads(resp.read())["data"]["layers"][2] == {
                "layer": "fc2", "grad_norm": 7.0, "param_norm": 10.0,
                "nonfinite": {"parameter": 0, "gradient": 0, "activation": 0}}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopping" in err


def test_run_in_process_stops_on_event(agg_config):
    stop = threading.Event()
    config = AggregatorConfig(**{**agg_config.__dict__, "metrics_listen": f"127.0.0.1:{free_port()}"})
    result = []
    thread = threading.Thread(target=lambda: result.append(run(config, stop)))
    thread.start()
    deadline = time.monotonic() + 10
    while gcpolicy.installed() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gcpolicy.installed() is not None  # the process's full collections skip the long-lived state
    stop.set()
    thread.join(10)
    assert result == [0]
    assert gcpolicy.installed() is None  # handed back at stop


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://user:pw@host:6380/1", "redis://user:***@host:6380/1"),
])
def test_redact(url, shown):
    assert redact(url) == shown
