"""The security policy of deploy/kubernetes, on what `kubectl kustomize` renders for the base and every overlay:
no port that anyone in the cluster can reach without a token or a Redis ACL user's password, Redis with the
users of deploy/redis/users.acl and no default user, every credential referenced from the Secrets that
make_secrets.py generates and none inlined, Prometheus scraping with the read tokens, and the generator's
Job holding no more rights than it needs."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import pytest

APPS = ["base", "overlays/external-redis", "overlays/tls"]   # every kustomization that runs gradwatch
EVERYTHING = [*APPS, "monitoring"]
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
REDIS_ACL = "a Redis ACL user's password"
# How each port a container opens is authenticated: (workload, port name) -> the variables that must hold a token
# from a Secret, or REDIS_ACL. A port that is not listed fails the test: say how it is protected first.
PORT_AUTH = {
    ("gradwatch-collector", "grpc"): ("GRADWATCH_TOKEN",),
    ("gradwatch-collector", "metrics"): ("GRADWATCH_COLLECTOR_READ_TOKEN",),
    ("gradwatch-aggregator", "http"): ("GRADWATCH_AGGREGATOR_READ_TOKEN", "GRADWATCH_AGGREGATOR_API_TOKEN"),
    ("redis", "redis"): REDIS_ACL,
}
# Names that hold a credential: such a variable or ConfigMap key must come from a Secret.
SECRETISH = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|(^|_)KEY$", re.I)
TLS_SECRET = "gradwatch-collector-tls"   # created by the user (components/collector-tls)


@pytest.fixture(scope="module")
def generator(kit):
    return kit.load_module(kit.MAKE_SECRETS)


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOADS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def env_refs(container: dict) -> dict[str, tuple[str, str]]:
    """name -> (Secret, key) of each variable read from a Secret."""
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def generated_keys(kit, generator) -> set[tuple[str, str]]:
    users = generator.redis_users(kit.USERS_ACL.read_text())
    return ({(generator.TOKENS_SECRET, key) for key in generator.TOKEN_KEYS}
            | {(generator.REDIS_SECRET, user) for user in users})


@pytest.mark.parametrize("path", APPS)
def test_no_port_is_reachable_without_a_token(kustomize, path):
    objects = kustomize(path)
    for service in (o for o in objects if o["kind"] == "Service"):
        spec = service["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", f"{service['metadata']['name']} leaves the cluster"
        assert not spec.get("externalIPs")
    for workload in workloads(objects):
        name, spec = workload["metadata"]["name"], pod_spec(workload)
        assert not spec.get("hostNetwork"), name
        for container in spec["containers"]:
            refs = env_refs(container)
            for port in container.get("ports", []):
                assert "hostPort" not in port, (name, port)
                needs = PORT_AUTH.get((name, port["name"]))
                assert needs is not None, f"{name} opens {port['name']}: add to PORT_AUTH how it is authenticated"
                if needs == REDIS_ACL:
                    assert "aclfile.sh" in " ".join(container["command"]), name
                else:
                    assert set(needs) <= set(refs), f"{name}:{port['name']} lacks a token from a Secret"


@pytest.mark.parametrize("path", ["base", "overlays/tls"])
def test_redis_runs_the_acl_users_without_a_default_user(kit, kustomize, path):
    objects = kustomize(path)
    (redis,) = [o for o in objects if o["kind"] == "StatefulSet"]
    spec = pod_spec(redis)
    (container,) = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    acl_map = next(o for o in objects if o["kind"] == "ConfigMap"
                   and o["metadata"]["name"] == volumes["acl"]["configMap"]["name"])
    # The ConfigMap holds deploy/redis's own files (deploy/generate.py copies them into base).
    assert acl_map["data"]["users.acl"] == kit.USERS_ACL.read_text()
    assert acl_map["data"]["aclfile.sh"] == kit.ACLFILE_SH.read_text()
    users = acl_map["data"]["users.acl"].splitlines()
    assert users[0].split()[:3] == ["user", "default", "off"]
    assert not any(" >" in line or " #" in line for line in users)  # no password in the template
    assert volumes["passwords"]["secret"]["secretName"] == "gradwatch-redis"
    # sh aclfile.sh USERS_ACL PASSWORD_DIR OUT redis-server ...: the script adds --aclfile OUT
    assert container["command"][:5] == ["sh", f"{mounts['acl']}/aclfile.sh", f"{mounts['acl']}/users.acl",
                                        mounts["passwords"], f"{mounts['run']}/users.acl"]
    assert container["args"][0] == "redis-server" and "--aclfile" not in container["args"]
    assert volumes["run"]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("path", EVERYTHING)
def test_credentials_are_referenced_never_inlined(kit, kustomize, generator, path):
    objects = kustomize(path)
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are generated in the cluster, never rendered"
    known = generated_keys(kit, generator)
    for config in (o for o in objects if o["kind"] == "ConfigMap"):
        for key, value in config["data"].items():
            if re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):  # a variable (the others are files: scripts, users.acl)
                assert not SECRETISH.search(key), f"{config['metadata']['name']} holds {key}"
                assert "://" not in value or urlsplit(value).password is None, f"a password in {key}"
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            refs = env_refs(container)
            assert set(refs.values()) <= known, "a key the Job does not generate: the pod would never start"
            for entry in container.get("env", []):
                if SECRETISH.search(entry["name"]) and not entry["name"].endswith("_FILE"):
                    assert entry["name"] in refs, f"{workload['metadata']['name']}: {entry['name']} inlined"
                if "value" in entry and "://" in entry["value"]:
                    # a password in a URL is a variable read from a Secret before it (the kubelet expands it)
                    password = urlsplit(entry["value"]).password
                    assert password is None or (password.startswith("$(") and password[2:-1] in refs), entry
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in {generator.REDIS_SECRET, TLS_SECRET}


def test_prometheus_scrapes_with_the_read_tokens(kustomize):
    base = {(o["kind"], o["metadata"]["name"]): o for o in kustomize("base")}
    monitors = {o["kind"]: o for o in kustomize("monitoring") if o["kind"] in ("PodMonitor", "ServiceMonitor")}
    for kind, endpoints, workload, variable in (
            ("PodMonitor", "podMetricsEndpoints", "gradwatch-aggregator", "GRADWATCH_AGGREGATOR_READ_TOKEN"),
            ("ServiceMonitor", "endpoints", "gradwatch-collector", "GRADWATCH_COLLECTOR_READ_TOKEN")):
        (container,) = pod_spec(base[("Deployment", workload)])["containers"]
        for endpoint in monitors[kind]["spec"][endpoints]:
            auth = endpoint["authorization"]
            assert auth.get("type", "Bearer") == "Bearer"
            assert (auth["credentials"]["name"], auth["credentials"]["key"]) == env_refs(container)[variable]


def test_every_setting_named_is_one_the_component_reads(kustomize):
    """A misspelt variable would be ignored and leave a port open (or the component refusing to start)."""
    from gradwatch.aggregator.config import AggregatorConfig
    from gradwatch.collector.config import CollectorConfig
    from gradwatch.settings import variables

    reads = {name: {n for v in variables(cls) for n in v.names}
             for name, cls in (("gradwatch-collector", CollectorConfig), ("gradwatch-aggregator", AggregatorConfig))}
    for path in APPS:
        objects = kustomize(path)
        config = next(o for o in objects if o["metadata"]["name"].startswith("gradwatch-config"))["data"]
        assert {k for k in config if k.startswith("GRADWATCH_")} <= reads["gradwatch-collector"] | \
            reads["gradwatch-aggregator"]
        for workload in (o for o in objects if o["kind"] == "Deployment"):
            (container,) = pod_spec(workload)["containers"]
            named = {e["name"] for e in container.get("env", []) if e["name"].startswith("GRADWATCH_")}
            assert named <= reads[workload["metadata"]["name"]], named - reads[workload["metadata"]["name"]]


def test_the_generator_job_holds_only_what_it_needs(kit, kustomize, generator):
    objects = kustomize("base")
    by = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    (role,) = [o for o in objects if o["kind"] == "Role"]
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""] and rule["resources"] == ["secrets"] and "*" not in rule["verbs"]
        if rule.get("resourceNames"):
            assert set(rule["resourceNames"]) == {generator.TOKENS_SECRET, generator.REDIS_SECRET}
            assert set(rule["verbs"]) <= {"get", "patch"}
        else:
            assert rule["verbs"] == ["create"]  # RBAC cannot name what is created
    binding = by[("RoleBinding", role["metadata"]["name"])]
    job = by[("Job", "gradwatch-secrets")]
    spec = pod_spec(job)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": "gradwatch"}]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # gone later, so the next apply runs it again
    (container,) = spec["containers"]
    script = next(o for o in objects if o["kind"] == "ConfigMap" and "make_secrets.py" in o.get("data", {}))
    assert script["data"]["make_secrets.py"] == kit.MAKE_SECRETS.read_text()
    assert container["image"] == "gradwatch:0.1.0" and container["command"][0] == "python"
    # Only the Job's pod gets an API token; the components and Redis run without one.
    for workload in workloads(objects):
        if workload is not job:
            assert pod_spec(workload)["automountServiceAccountToken"] is False, workload["metadata"]["name"]


def test_tls_overlay_serves_the_agents_tls(kustomize):
    objects = {(o["kind"], o["metadata"]["name"]): o for o in kustomize("overlays/tls")}
    spec = pod_spec(objects[("Deployment", "gradwatch-collector")])
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
    assert env["GRADWATCH_COLLECTOR_TLS_CERT_FILE"] == f"{mount}/tls.crt"
    assert env["GRADWATCH_COLLECTOR_TLS_KEY_FILE"] == f"{mount}/tls.key"
    assert next(v for v in spec["volumes"] if v["name"] == "tls")["secret"]["secretName"] == TLS_SECRET
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]  # the key is group-readable
    for probe in ("readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe], "the kubelet's gRPC probes cannot speak TLS"


@pytest.mark.parametrize("path", ["base", "overlays/external-redis"])
def test_components_accept_the_environment_they_get(kit, kustomize, generator, monkeypatch, path):
    """Read by the components' own settings classes, the rendered environment (with stand-in secret values)
    is valid and passes their start-up rule: no listener beyond loopback without a token."""
    from gradwatch.aggregator.config import AggregatorConfig
    from gradwatch.collector.config import CollectorConfig
    from gradwatch.settings import loopback_only

    objects = kustomize(path)
    config = next(o for o in objects if o["metadata"]["name"].startswith("gradwatch-config"))["data"]
    values: dict[str, dict[str, str]] = {}
    for name, key in generated_keys(kit, generator):
        values.setdefault(name, {})[key] = f"stand-in-{name}-{key}"
    for workload in (o for o in objects if o["kind"] == "Deployment"):
        (container,) = pod_spec(workload)["containers"]
        env = kit.container_env(container, config, values)
        for name in [n for n in os.environ if n.startswith("GRADWATCH_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        if workload["metadata"]["name"] == "gradwatch-collector":
            collector = CollectorConfig.from_env().validate()
            assert collector.token and collector.read_token and collector.exposure_problem() is None
        else:
            aggregator = AggregatorConfig.from_env().validate()
            host, _ = aggregator.metrics_address()
            assert not loopback_only(host) and aggregator.read_token and aggregator.api_token

