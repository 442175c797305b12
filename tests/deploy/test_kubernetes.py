"""deploy/kubernetes: every kustomization renders (kubectl kustomize), the Kubernetes objects pass the
API's JSON schemas strictly (kubernetes-validate), the Prometheus Operator objects pass the operator's
CRD schemas, the PrometheusRule holds exactly the rules promtool tests, and the pieces fit together.
The security policy is checked in test_kubernetes_policy.py."""

from __future__ import annotations

import copy

import pytest
import yaml

KUBERNETES_VERSION = "1.30.0"  # the oldest version still supported by the major clouds
KUSTOMIZATIONS = ["base", "monitoring", "overlays/external-redis", "overlays/tls"]
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def core_objects(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] not in OPERATOR_KINDS]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_objects_pass_the_kubernetes_schemas(kustomize, path):
    import kubernetes_validate

    objects = core_objects(kustomize(path))
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises on any error
        assert obj["metadata"].get("namespace", "gradwatch") == "gradwatch"


def test_the_schema_check_rejects_a_typo(kustomize):
    import kubernetes_validate

    deployment = copy.deepcopy(by_kind(kustomize("base"))[("Deployment", "gradwatch-collector")])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_operator_objects_pass_the_crd_schemas(kustomize, crd_validator):
    objects = [o for o in kustomize("monitoring") if o["kind"] in OPERATOR_KINDS]
    assert {o["kind"] for o in objects} == OPERATOR_KINDS
    code, out = crd_validator(objects)
    assert code == 0, out
    broken = copy.deepcopy(by_kind(objects)[("PodMonitor", "gradwatch-aggregator")])
    broken["spec"]["podMetricsEndpoints"][0]["interval"] = "often"
    code, out = crd_validator([broken])
    assert code == 1 and "interval" in out


def test_prometheus_rule_holds_the_tested_rules(kit, kustomize, tmp_path):
    rule = by_kind(kustomize("monitoring"))[("PrometheusRule", "gradwatch")]
    assert rule["spec"] == yaml.safe_load(kit.RULES.read_text())  # deploy/generate.py keeps them equal
    promtool = kit.tool("promtool", "Debian's prometheus package")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    proc = kit.run([promtool, "check", "rules", str(tmp_path / "rules.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_monitors_select_the_pods_and_ports_that_serve_metrics(kustomize):
    base = by_kind(kustomize("base"))
    monitoring = by_kind(kustomize("monitoring"))
    aggregator = base[("Deployment", "gradwatch-aggregator")]["spec"]["template"]
    pod_monitor = monitoring[("PodMonitor", "gradwatch-aggregator")]["spec"]
    assert pod_monitor["selector"]["matchLabels"].items() <= aggregator["metadata"]["labels"].items()
    ports = {p["name"] for c in aggregator["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in pod_monitor["podMetricsEndpoints"]} <= ports
    # the job label the rules and dashboards expect (up{job=~"gradwatch-.*"})
    assert aggregator["metadata"]["labels"][pod_monitor["jobLabel"]] == "gradwatch-aggregator"

    service = base[("Service", "gradwatch-collector")]
    service_monitor = monitoring[("ServiceMonitor", "gradwatch-collector")]["spec"]
    assert service_monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in service_monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert service["metadata"]["labels"][service_monitor["jobLabel"]] == "gradwatch-collector"


def test_every_kustomization_is_tested(kit):
    found = {str(p.parent.relative_to(kit.KUBERNETES)) for p in kit.KUBERNETES.glob("*/**/kustomization.yaml")}
    components = {p for p in found if p.startswith("components/")}
    assert found - components == set(KUSTOMIZATIONS)


def test_components_get_their_config_and_redis_user(kit, kustomize):
    objects = kustomize("base")
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    config = next(o for o in objects if o["metadata"]["name"].startswith("gradwatch-config"))
    for component in ("collector", "aggregator"):
        spec = by_kind(objects)[("Deployment", f"gradwatch-{component}")]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        refs = {("ConfigMap", e["configMapRef"]["name"]) for e in container["envFrom"]}
        assert refs == {("ConfigMap", config["metadata"]["name"])} and refs <= names  # the hashed name substituted
        assert container["args"] == [component] and container["image"] == "gradwatch:0.1.0"
        assert spec["securityContext"]["runAsNonRoot"] is True
        env = kit.container_env(container, config["data"], secret_values={"gradwatch-redis": {component: "pw"}})
        assert env["GRADWATCH_REDIS_URL"] == f"redis://{component}:pw@redis:6379/0"  # its own ACL user
    assert config["data"]["GRADWATCH_COLLECTOR_LISTEN"] == "0.0.0.0:4770"
    assert config["data"]["GRADWATCH_AGGREGATOR_METRICS_LISTEN"] == "0.0.0.0:4772"
    redis = by_kind(objects)[("StatefulSet", "redis")]["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][redis["args"].index("--appendfsync") + 1] == "everysec"


def test_external_redis_overlay_drops_the_bundled_redis(kit, kustomize):
    objects = kustomize("overlays/external-redis")
    assert not [o for o in objects if o["metadata"]["name"] == "redis"]
    assert not [o for o in objects if o["kind"] == "Secret"]  # the passwords come from gradwatch-redis
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {"gradwatch-collector", "gradwatch-aggregator"}
    config = next(o for o in objects if o["metadata"]["name"].startswith("gradwatch-config"))["data"]
    for name, deployment in deployments.items():
        user = name.removeprefix("gradwatch-")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = kit.container_env(container, config, secret_values={"gradwatch-redis": {user: "pw"}})
        assert env["GRADWATCH_REDIS_URL"] == f"rediss://{user}:pw@redis.example.internal:6380/0"

