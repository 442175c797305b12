"""The security policy of deploy/docker-compose.yml, on what `docker-compose config` renders, as shipped and
with the collector and the aggregator published to other machines: no published port beyond loopback
without a token, Redis with the users of deploy/redis/users.acl and no default user, every credential in a
file that compose/credentials.sh generates (each service seeing its own only) and none in the compose file,
Prometheus scraping with the read tokens. credentials.sh itself runs here, as the `credentials` service would."""

from __future__ import annotations

import os
import posixpath
import re

import pytest
import yaml

SHIPPED = {}
EXPOSED = {"GRADWATCH_COLLECTOR_BIND": "0.0.0.0", "GRADWATCH_AGGREGATOR_BIND": "0.0.0.0"}
# (service, container port) -> the variable, among the service's credentials, that makes the port ask for a token.
PORT_AUTH = {
    ("collector", 4770): "GRADWATCH_TOKEN",
    ("collector", 4771): "GRADWATCH_COLLECTOR_READ_TOKEN",
    ("aggregator", 4772): "GRADWATCH_AGGREGATOR_READ_TOKEN",
}
SECRETISH = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|(^|_)KEY$", re.I)
GENERATOR = "credentials"
GENERATOR_ROOT = "/credentials"


@pytest.fixture(scope="module")
def credentials(kit, tmp_path_factory) -> dict[str, str]:
    return kit.compose_credentials(tmp_path_factory.mktemp("credentials"))


def published(service: dict) -> list[tuple[str, int]]:
    """(host address, container port) of each published port, "" for every interface; docker-compose config
    writes HOST_IP:HOST_PORT:CONTAINER_PORT/PROTO, or the long form when no address is given."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), int(port["target"])))
        else:
            host_ip, _, container = port.split("/")[0].rsplit(":", 2) if port.count(":") >= 2 else ("", "", port)
            out.append((host_ip, int(container.split("/")[0])))
    return out


def mounts(service: dict) -> dict[str, str]:
    """container path -> source (a named volume, or an absolute host path)."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}


def credentials_dir(services: dict, name: str) -> tuple[str, str]:
    """(path in `name`'s container, folder of credentials.sh's output) of the credentials volume `name` mounts."""
    generator = {source: path for path, source in mounts(services[GENERATOR]).items()}
    for path, source in mounts(services[name]).items():
        if source in generator and generator[source].startswith(GENERATOR_ROOT + "/"):
            return path, posixpath.relpath(generator[source], GENERATOR_ROOT)
    raise AssertionError(f"{name} mounts no credentials volume")


def own_credentials(services: dict, name: str, credentials: dict[str, str]) -> dict[str, str]:
    """The files the service `name` sees in its credentials volume: {file name: value}."""
    _, folder = credentials_dir(services, name)
    return {key.split("/", 1)[1]: value for key, value in credentials.items() if key.startswith(folder + "/")}


@pytest.mark.parametrize("env", [SHIPPED, EXPOSED], ids=["as-shipped", "exposed"])
def test_no_port_is_published_beyond_loopback_without_a_token(compose_render, credentials, env):
    services = compose_render(env)["services"]
    seen = set()
    for name, service in services.items():
        for host_ip, port in published(service):
            seen.add((name, port, host_ip))
            if host_ip == "127.0.0.1":
                continue
            variable = PORT_AUTH.get((name, port))
            assert variable, f"{name}:{port} is published on {host_ip or 'every interface'} without a token"
            # the service runs with its credentials as variables (compose/with-credentials.sh)
            entrypoint = service["entrypoint"]
            assert entrypoint[:2] == ["sh", "/etc/gradwatch/with-credentials.sh"]
            assert entrypoint[2] == credentials_dir(services, name)[0]
            assert len(own_credentials(services, name, credentials)[variable]) == 64
    exposed = {(name, port) for name, port, host_ip in seen if host_ip != "127.0.0.1"}
    assert exposed == ({("collector", 4770), ("aggregator", 4772)} if env else set())


def test_redis_runs_the_acl_users_without_a_default_user(kit, compose_render, credentials):
    services = compose_render()["services"]
    redis = services["redis"]
    assert not redis.get("ports")
    command, where = redis["command"], mounts(redis)
    # sh aclfile.sh USERS_ACL PASSWORD_DIR OUT redis-server ...: the script adds --aclfile OUT
    assert command[0] == "sh" and where[command[1]] == str(kit.ACLFILE_SH)
    assert where[command[2]] == str(kit.USERS_ACL)
    assert command[3] == credentials_dir(services, "redis")[0]
    assert posixpath.dirname(command[4]) in redis["tmpfs"]
    assert command[5] == "redis-server" and "--aclfile" not in command
    users = kit.USERS_ACL.read_text().splitlines()
    assert users[0].split()[:3] == ["user", "default", "off"]
    logging_in = {line.split()[1] for line in users if line.split()[2] == "on"}
    assert set(own_credentials(services, "redis", credentials)) == logging_in  # a password for every user
    assert redis["depends_on"][GENERATOR]["condition"] == "service_completed_successfully"


def test_credentials_are_in_files_never_in_the_compose_file(kit, compose_render):
    raw = yaml.safe_load(kit.COMPOSE.read_text())["services"]
    for name, service in raw.items():
        for key, value in (service.get("environment") or {}).items():
            if "://" in str(value):
                assert "@" not in str(value), f"{name}: {key} carries credentials"
            if not SECRETISH.search(key) or key.endswith("_FILE"):
                continue
            # Only the generator takes credentials from the host, as `${NAME:-}`: given ones replace its own.
            assert name == GENERATOR and value == f"${{{key}:-}}", f"{name}: {key} is in the compose file"
    given = {key: f"given-{key.lower()}" for key in raw[GENERATOR]["environment"] if SECRETISH.search(key)}
    rendered = compose_render(given)["services"]
    for name, service in rendered.items():
        text = yaml.safe_dump(service)
        assert name == GENERATOR or not any(value in text for value in given.values()), name


def test_each_service_sees_only_its_own_credentials(compose_render):
    services = compose_render()["services"]
    generator_volumes = {source for path, source in mounts(services[GENERATOR]).items()
                         if path.startswith(GENERATOR_ROOT + "/")}
    readers: dict[str, list[str]] = {volume: [] for volume in generator_volumes}
    for name, service in services.items():
        if name == GENERATOR:
            continue
        for volume in service.get("volumes", []):
            source, _, mode = volume.split(":")
            if source in readers:
                assert mode == "ro", f"{name} may change {source}"
                readers[source].append(name)
        if source_dirs := [s for s in readers if name in readers[s]]:
            assert services[name]["depends_on"][GENERATOR]["condition"] == "service_completed_successfully"
            assert len(source_dirs) == 1
    assert all(len(names) == 1 for names in readers.values()), readers


def test_prometheus_scrapes_with_the_read_tokens(kit, compose_render, credentials):
    services = compose_render()["services"]
    config = yaml.safe_load((kit.DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    where, _ = credentials_dir(services, "prometheus")
    tokens = own_credentials(services, "prometheus", credentials)
    for job, component, variable in (("gradwatch-aggregator", "aggregator", "GRADWATCH_AGGREGATOR_READ_TOKEN"),
                                     ("gradwatch-collector", "collector", "GRADWATCH_COLLECTOR_READ_TOKEN")):
        path = jobs[job]["authorization"]["credentials_file"]
        assert posixpath.dirname(path) == where
        assert tokens[posixpath.basename(path)] == own_credentials(services, component, credentials)[variable]


def test_grafana_admin_password_is_generated(compose_render, credentials):
    services = compose_render()["services"]
    env = services["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    path = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    where, _ = credentials_dir(services, "grafana")
    assert posixpath.dirname(path) == where
    assert len(own_credentials(services, "grafana", credentials)[posixpath.basename(path)]) == 64


def test_every_setting_named_is_one_the_component_reads(compose_render, credentials):
    """A misspelt variable would be ignored and leave a port open (or the component refusing to start)."""
    from gradwatch.aggregator.config import AggregatorConfig
    from gradwatch.collector.config import CollectorConfig
    from gradwatch.settings import variables

    services = compose_render({"GRADWATCH_TLS_DIR": "/tls"}, tls=True)["services"]
    for name, cls in (("collector", CollectorConfig), ("aggregator", AggregatorConfig)):
        reads = {n for v in variables(cls) for n in v.names}
        named = {k for k in services[name]["environment"] if k.startswith("GRADWATCH_")}
        named |= set(own_credentials(services, name, credentials))
        assert named <= reads, named - reads


def test_tls_is_one_file_away(compose_render):
    services = compose_render({"GRADWATCH_TLS_DIR": "/etc/gradwatch-tls"}, tls=True)["services"]
    collector = services["collector"]
    tls_dir = next(path for path, source in mounts(collector).items() if source == "/etc/gradwatch-tls")
    env = collector["environment"]
    assert env["GRADWATCH_COLLECTOR_TLS_CERT_FILE"] == f"{tls_dir}/tls.crt"
    assert env["GRADWATCH_COLLECTOR_TLS_KEY_FILE"] == f"{tls_dir}/tls.key"
    missing = compose_render.config({}, tls=True)
    assert missing.returncode != 0 and "GRADWATCH_TLS_DIR" in missing.stderr  # a clear error, before anything runs


@pytest.mark.parametrize("env", [SHIPPED, EXPOSED], ids=["as-shipped", "exposed"])
def test_components_accept_the_environment_they_get(compose_render, credentials, monkeypatch, env):
    """Read by the components' own settings classes, the compose environment plus the generated credentials
    (what with-credentials.sh exports) is valid and passes their start-up rule: no listener beyond loopback
    without a token."""
    from gradwatch.aggregator.config import AggregatorConfig
    from gradwatch.collector.config import CollectorConfig

    services = compose_render(env)["services"]
    for name in ("collector", "aggregator"):
        for variable in [n for n in os.environ if n.startswith("GRADWATCH_")]:
            monkeypatch.delenv(variable)
        given = {**services[name]["environment"], **own_credentials(services, name, credentials)}
        for variable, value in given.items():
            monkeypatch.setenv(variable, value)
        if name == "collector":
            collector = CollectorConfig.from_env().validate()
            assert collector.exposure_problem() is None and collector.token and collector.read_token
        else:
            aggregator = AggregatorConfig.from_env().validate()
            assert aggregator.read_token and aggregator.api_token
