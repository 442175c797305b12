"""A real Prometheus for scenario tests: deploy/prometheus/prometheus.yml with local targets and 1 s intervals, the
project's rule file with named edits (a shorter `for:` or threshold, each checked to apply), and its HTTP API.

Skipped without the `prometheus` binary, a failure instead under GRADWATCH_REQUIRE_TOOLS=1 (.ci/run installs
Debian's prometheus), as the deploy tests do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from gradwatch.cli.processes import stop_process, wait_until
from gradwatch.cli.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES = REPO / "deploy" / "prometheus" / "rules" / "gradwatch.rules.yml"


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = "prometheus is not installed (Debian's prometheus package; .ci/run installs it)"
        if os.environ.get("GRADWATCH_REQUIRE_TOOLS", "") == "1":
            pytest.fail(f"{message}, and GRADWATCH_REQUIRE_TOOLS=1")
        pytest.skip(message)
    return path


def edited_rules(edits: dict[str, str], into: Path) -> Path:
    """The project's rule file with each `old` text replaced by `new`; every edit must apply exactly once, so a rule
    that changed fails the test instead of being tested unedited."""
    text = RULES.read_text()
    for old, new in edits.items():
        assert text.count(old) == 1, f"{RULES.name} no longer has exactly one {old!r}: update the test's edit"
        text = text.replace(old, new)
    into.write_text(text)
    return into


class Prometheus:
    """`with Prometheus(tmp_path, targets, rules) as prom:` scrapes `targets` (job name -> host:port of the
    project's jobs) every second and evaluates `rules` every second; no Alertmanager."""

    def __init__(self, workdir: Path, targets: dict[str, str], rules: Path):
        self.binary = prometheus_binary()
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(rules)]
        config.pop("alerting", None)
        targets = {**targets, "prometheus": f"127.0.0.1:{self.port}"}
        config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] in targets]
        for job in config["scrape_configs"]:
            job["static_configs"][0]["targets"] = [targets[job["job_name"]]]
            job.pop("authorization", None)  # loopback: /metrics needs no token there
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        self.log = open(self.workdir / "prometheus.log", "wb")  # closed in __exit__
        self.proc = subprocess.Popen([self.binary, f"--config.file={self.config}",
                                      f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self._ready(), 30, "Prometheus ready", interval=0.2)
        except TimeoutError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.log.close()

    def _ready(self) -> bool:
        assert self.proc.poll() is None, (self.workdir / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """An instant query: the labels of each series (sorted pairs, __name__ left out) -> its value."""
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
                for r in self.get("/api/v1/query", query=expr)["result"]}

    def alerts(self, name: str) -> list[dict]:
        """The active (pending or firing) alerts of that name, as /api/v1/alerts lists them."""
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["labels"].get("alertname") == name]

    def targets_up(self) -> set[str]:
        return {t["labels"]["job"] for t in self.get("/api/v1/targets")["activeTargets"] if t["health"] == "up"}
