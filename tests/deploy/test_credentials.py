"""The scripts that generate the deployments' credentials, run for real: compose/credentials.sh (random values,
kept across runs, replaced when given) with compose/with-credentials.sh, and redis/aclfile.sh starting a real
redis-server 7 that the generated URLs log in to; kubernetes/base/make_secrets.py against a stand-in for the
Kubernetes API's Secrets endpoints (create, read, merge-patch with optimistic concurrency)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from gradwatch.cli.redis_server import RedisServer

HEX64 = re.compile(r"[0-9a-f]{64}")


def test_compose_credentials_are_random_kept_and_replaceable(kit, tmp_path):
    first = kit.compose_credentials(tmp_path)
    tokens = {k: v for k, v in first.items() if not k.endswith("GRADWATCH_REDIS_URL")}
    assert all(HEX64.fullmatch(v) for v in tokens.values()), tokens
    assert len(set(first.values())) == len(first) - 2  # each Prometheus token is a copy of its component's
    assert all((tmp_path / name).stat().st_mode & 0o777 == 0o400 for name in first)
    assert kit.compose_credentials(tmp_path) == first  # a restart keeps them
    given = kit.compose_credentials(tmp_path, {"GRADWATCH_TOKEN": "agents-token",
                                               "GRADWATCH_AGGREGATOR_READ_TOKEN": "read-token"})
    assert given["collector/GRADWATCH_TOKEN"] == "agents-token"
    assert given["prometheus/aggregator-read-token"] == given["aggregator/GRADWATCH_AGGREGATOR_READ_TOKEN"] \
        == "read-token"
    assert {k: v for k, v in given.items() if "TOKEN" not in k.upper()} == \
        {k: v for k, v in first.items() if "TOKEN" not in k.upper()}


def test_compose_credentials_open_redis_as_each_component(kit, tmp_path):
    credentials = kit.compose_credentials(tmp_path / "credentials")
    acl = tmp_path / "users.acl"
    # As the redis service runs it, with `echo` for redis-server: the command line it would exec.
    proc = kit.run(["sh", str(kit.ACLFILE_SH), str(kit.USERS_ACL), str(tmp_path / "credentials" / "redis"),
                    str(acl), "echo", "redis-server", "--appendonly", "yes"])
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.split() == ["redis-server", "--appendonly", "yes", "--aclfile", str(acl)]
    assert not any(password in acl.read_text() for password in credentials.values())  # hashes only

    with RedisServer(tmp_path / "redis", appendonly=False, extra_args=["--aclfile", str(acl)],
                     binary=kit.require_redis_7()) as server:
        with redis.Redis(host=server.host, port=server.port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()  # no default user
        for component in ("collector", "aggregator"):
            # The entry point turns the component's files into its environment.
            env = environment_of(kit, tmp_path / "credentials" / component)
            assert set(env) == {name.split("/", 1)[1] for name in credentials if name.startswith(component + "/")}
            url = urlsplit(env["GRADWATCH_REDIS_URL"])
            assert (url.username, url.hostname, url.port, url.path) == (component, "redis", 6379, "/0")
            local = url._replace(netloc=f"{url.username}:{url.password}@{server.host}:{server.port}").geturl()
            with redis.Redis.from_url(local) as client:
                assert client.ping()
        with redis.Redis(host=server.host, port=server.port, username="admin",
                         password=credentials["redis/admin"]) as admin:
            assert admin.acl_log() == []


def environment_of(kit, folder: Path) -> dict[str, str]:
    proc = kit.run(["sh", str(kit.WITH_CREDENTIALS_SH), str(folder), "env", "-0"], env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    variables = dict(item.split("=", 1) for item in proc.stdout.split("\0") if item)
    return {k: v for k, v in variables.items() if k.startswith("GRADWATCH_")}


def test_with_credentials_refuses_an_empty_folder(kit, tmp_path):
    proc = kit.run(["sh", str(kit.WITH_CREDENTIALS_SH), str(tmp_path), "true"])
    assert proc.returncode == 1 and "has the credentials service run" in proc.stderr


def test_aclfile_locks_a_user_without_a_password(kit, tmp_path):
    (tmp_path / "passwords").mkdir()
    (tmp_path / "passwords" / "collector").write_text("pw")
    proc = kit.run(["sh", str(kit.ACLFILE_SH), str(kit.USERS_ACL), str(tmp_path / "passwords"),
                    str(tmp_path / "users.acl")])
    assert proc.returncode == 0
    assert "no password for Redis user aggregator" in proc.stderr
    lines = {line.split()[1]: line for line in (tmp_path / "users.acl").read_text().splitlines()}
    assert lines["collector"].split()[3].startswith("#") and not lines["aggregator"].split()[3].startswith("#")


class FakeSecrets:
    """The Secrets endpoints of one namespace of the Kubernetes API, as make_secrets.py uses them: GET,
    POST (409 when it exists), merge PATCH (409 when metadata.resourceVersion is stale), bearer token checked."""

    def __init__(self, token: str = "sa-token", namespace: str = "gradwatch"):
        self.token, self.namespace = token, namespace
        self.secrets: dict[str, dict] = {}
        self.version = 0
        self.calls: list[tuple[str, str]] = []
        self.before_patch = None  # called before a PATCH is applied: a concurrent writer

        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

            def do_PATCH(self):
                fake.handle(self, "PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def put(self, name: str, data: dict[str, str]) -> None:
        self.version += 1
        self.secrets[name] = {"metadata": {"name": name, "resourceVersion": str(self.version)},
                              "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}

    def values(self, name: str) -> dict[str, str]:
        return {k: base64.b64decode(v).decode() for k, v in self.secrets[name]["data"].items()}

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        prefix = f"/api/v1/namespaces/{self.namespace}/secrets"
        name = request.path[len(prefix) + 1:] if request.path.startswith(prefix + "/") else None
        body = json.loads(request.rfile.read(int(request.headers.get("Content-Length") or 0)) or b"null")
        self.calls.append((method, name or ""))
        if request.headers.get("Authorization") != f"Bearer {self.token}" or not request.path.startswith(prefix):
            return self.answer(request, 401 if request.path.startswith(prefix) else 404, {"message": "no"})
        if method == "GET":
            return self.answer(request, *((200, self.secrets[name]) if name in self.secrets else (404, {})))
        if method == "POST":
            name = body["metadata"]["name"]
            if name in self.secrets:
                return self.answer(request, 409, {"message": "AlreadyExists"})
            self.version += 1
            self.secrets[name] = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
            return self.answer(request, 201, self.secrets[name])
        assert request.headers["Content-Type"] == "application/merge-patch+json"
        if self.before_patch:
            self.before_patch()
        current = self.secrets[name]
        if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]:
            return self.answer(request, 409, {"message": "Conflict"})
        self.version += 1
        current["data"].update(body["data"])
        current["metadata"]["resourceVersion"] = str(self.version)
        return self.answer(request, 200, current)

    @staticmethod
    def answer(request: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    fake = FakeSecrets()
    yield fake
    fake.close()


def make_secrets(kit, api: FakeSecrets, capsys) -> str:
    module = kit.load_module(kit.MAKE_SECRETS)
    client = module.Api(api.url, api.token, api.namespace)
    assert module.main(["--redis-acl", str(kit.USERS_ACL)], api=client) == 0
    return capsys.readouterr().out


def test_make_secrets_creates_every_credential_once(kit, api, capsys):
    module = kit.load_module(kit.MAKE_SECRETS)
    out = make_secrets(kit, api, capsys)
    tokens, passwords = api.values(module.TOKENS_SECRET), api.values(module.REDIS_SECRET)
    assert set(tokens) == set(module.TOKEN_KEYS)
    users = [line.split()[1] for line in kit.USERS_ACL.read_text().splitlines() if line.split()[2] == "on"]
    assert sorted(passwords) == sorted(users) and "default" not in passwords
    values = [*tokens.values(), *passwords.values()]
    assert all(HEX64.fullmatch(v) for v in values) and len(set(values)) == len(values)
    assert not any(v in out for v in values)  # key names only in the log
    assert api.secrets[module.TOKENS_SECRET]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gradwatch"

    api.calls.clear()
    assert "complete" in make_secrets(kit, api, capsys)  # the next apply: nothing to do, nothing written
    assert {method for method, _ in api.calls} == {"GET"}
    assert api.values(module.TOKENS_SECRET) == tokens and api.values(module.REDIS_SECRET) == passwords


def test_make_secrets_keeps_given_values_and_fills_in_the_rest(kit, api, capsys):
    module = kit.load_module(kit.MAKE_SECRETS)
    api.put(module.REDIS_SECRET, {"collector": "my-collector-password", "aggregator": ""})  # brought, and a hole
    out = make_secrets(kit, api, capsys)
    passwords = api.values(module.REDIS_SECRET)
    assert passwords["collector"] == "my-collector-password"
    assert HEX64.fullmatch(passwords["aggregator"]) and HEX64.fullmatch(passwords["reader"])
    assert "generated aggregator" in out and "collector," not in out


def test_make_secrets_retries_when_someone_writes_meanwhile(kit, api, capsys):
    module = kit.load_module(kit.MAKE_SECRETS)
    api.put(module.TOKENS_SECRET, {"agent-token": "theirs"})
    concurrent = iter([lambda: api.put(module.TOKENS_SECRET, {"agent-token": "theirs", "aggregator-api-token": "x"})])
    api.before_patch = lambda: next(concurrent, lambda: None)()
    make_secrets(kit, api, capsys)
    tokens = api.values(module.TOKENS_SECRET)
    assert tokens["agent-token"] == "theirs" and tokens["aggregator-api-token"] == "x"  # not overwritten
    assert set(tokens) == set(module.TOKEN_KEYS)
    assert [m for m, n in api.calls if n == module.TOKENS_SECRET].count("PATCH") == 2  # one 409, then again


def test_make_secrets_fails_clearly_without_rights(kit, api):
    module = kit.load_module(kit.MAKE_SECRETS)
    with pytest.raises(RuntimeError, match="HTTP 401"):
        module.main(["--redis-acl", str(kit.USERS_ACL)], api=module.Api(api.url, "wrong-token", api.namespace))


def test_make_secrets_runs_as_the_job_runs_it(kit, tmp_path):
    """`python make_secrets.py`: outside a cluster it says what it misses and exits 1, with no traceback."""
    proc = subprocess.run([sys.executable, str(kit.MAKE_SECRETS), "--redis-acl", str(kit.USERS_ACL)],
                          capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("gradwatch-secrets: not in a Kubernetes pod")
