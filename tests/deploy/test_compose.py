"""deploy/docker-compose.yml and deploy/Dockerfile, checked without a Docker daemon: `docker-compose
config` (Debian's docker-compose validates the file against its Compose schema), the files the
services mount exist, and the image build copies every source folder the package needs. The security
policy is checked in test_compose_policy.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import yaml


def compose(kit) -> dict:
    return yaml.safe_load((kit.DEPLOY / "docker-compose.yml").read_text())


def test_compose_file_is_valid(kit):
    docker_compose = kit.tool("docker-compose", "Debian's docker-compose validates the Compose file")
    proc = kit.run([docker_compose, "-f", str(kit.DEPLOY / "docker-compose.yml"), "config", "-q"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stack_services_and_mounts(kit):
    services = compose(kit)["services"]
    assert set(services) == {"credentials", "redis", "collector", "aggregator", "prometheus", "alertmanager", "grafana"}
    for name, service in services.items():
        assert not service["image"].endswith(":latest") and ":" in service["image"], name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (kit.DEPLOY / source).exists(), f"{name} mounts missing {source}"
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert services["aggregator"]["environment"]["GRADWATCH_ALERTMANAGER_URL"] == "http://alertmanager:9093"


def test_prometheus_config_scrapes_the_compose_services(kit):
    config = yaml.safe_load((kit.DEPLOY / "prometheus" / "prometheus.yml").read_text())
    services = compose(kit)["services"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["gradwatch-aggregator"] == [services["aggregator"]["environment"]
                                               ["GRADWATCH_AGGREGATOR_METRICS_LISTEN"].replace("0.0.0.0", "aggregator")]
    assert targets["gradwatch-collector"] == [services["collector"]["environment"]
                                              ["GRADWATCH_COLLECTOR_METRICS_LISTEN"].replace("0.0.0.0", "collector")]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_grafana_provisioning_points_at_the_dashboards(kit):
    grafana = compose(kit)["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provider = yaml.safe_load((kit.DEPLOY / "grafana/provisioning/dashboards/gradwatch.yml").read_text())
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    datasource = yaml.safe_load((kit.DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_dockerfile_copies_every_package_folder_and_the_context_admits_them(kit):
    dockerfile = (kit.DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M)) | {"README.md"}
    package_dirs = tomllib.loads((kit.REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    needed = {path.split("/")[0] for path in package_dirs.values()} | {"pyproject.toml", "README.md"}
    assert needed <= copied
    rules = [line for line in (kit.REPO / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]

    def admitted(path: str) -> bool:
        verdict = True
        for rule in rules:
            negate = rule.startswith("!")
            if fnmatch.fnmatch(path, rule.lstrip("!")):
                verdict = negate
        return verdict

    assert all(admitted(path) for path in needed)
    assert not admitted(".venv") and not admitted(".gradwatch")
