"""deploy/alertmanager: amtool validates the configuration and resolves its routes (by severity and
run); the inhibition is exercised against a real Alertmanager in test_e2e_prometheus.py."""

from __future__ import annotations

import pytest
import yaml


def amtool(kit) -> str:
    return kit.tool("amtool", "Debian's prometheus-alertmanager package")


def test_config_is_valid(kit):
    proc = kit.run([amtool(kit), "check-config", str(kit.ALERTMANAGER_CONFIG)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("labels, receivers", [
    ({"alertname": "ExplodingGradient", "severity": "critical", "run": "prod-llm-7"}, "oncall-pager,ml-team-urgent"),
    ({"alertname": "NonFinite", "severity": "critical", "run": "exp-42", "source": "prometheus"}, "ml-team-urgent"),
    ({"alertname": "LossSpike", "severity": "warning", "run": "prod-llm-7"}, "ml-team"),
    ({"alertname": "GradwatchAggregatorLag", "severity": "warning", "run": "exp-42"}, "platform"),
    ({"alertname": "GradwatchIngestRefusals", "severity": "warning", "reason": "unauthenticated"}, "platform"),
    ({"alertname": "PoorWeightInitialization", "severity": "info", "run": "exp-42"}, "null"),
    ({"alertname": "Unknown"}, "ml-team"),
])
def test_routes(kit, labels, receivers):
    proc = kit.run([amtool(kit), "config", "routes", "test", f"--config.file={kit.ALERTMANAGER_CONFIG}",
                *(f"{k}={v}" for k, v in labels.items())])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == receivers


def test_nonfinite_inhibits_exploding_gradient_of_the_same_run(kit):
    config = yaml.safe_load(kit.ALERTMANAGER_CONFIG.read_text())
    assert {"source_matchers": ['alertname="NonFinite"'], "target_matchers": ['alertname="ExplodingGradient"'],
            "equal": ["run"]} in config["inhibit_rules"]
    assert config["route"]["group_by"] == ["alertname", "run"]  # both paths' copies of one alert: one group
