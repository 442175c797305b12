"""deploy/prometheus: promtool checks the configuration and the rules, and runs the rule unit tests
(every alert firing and not firing); a deliberately broken copy of the rules must fail them."""

from __future__ import annotations

import shutil

import yaml


def promtool(kit) -> str:
    return kit.tool("promtool", "Debian's prometheus package")


def test_rules_are_valid(kit):
    proc = kit.run([promtool(kit), "check", "rules", str(kit.RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_prometheus_config_is_valid(kit):
    proc = kit.run([promtool(kit), "check", "config", str(kit.DEPLOY / "prometheus" / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_unit_tests_pass(kit):
    proc = kit.run([promtool(kit), "test", "rules", "gradwatch.test.yml"], cwd=kit.DEPLOY / "prometheus" / "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_unit_tests_catch_a_broken_rule(kit, tmp_path):
    """The unit tests bite: an ExplodingGradient rule that never fires fails them."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    original = kit.RULES.read_text()
    broken = original.replace('(gradwatch_alert_firing{rule="ExplodingGradient"}) > 0',
                              '(gradwatch_alert_firing{rule="ExplodingGradient"}) > 1')
    assert broken != original
    (tmp_path / "rules" / kit.RULES.name).write_text(broken)
    shutil.copy(kit.DEPLOY / "prometheus" / "tests" / "gradwatch.test.yml", tmp_path / "tests")
    proc = kit.run([promtool(kit), "test", "rules", "gradwatch.test.yml"], cwd=tmp_path / "tests")
    assert proc.returncode != 0
    assert "ExplodingGradient" in proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing(kit):
    alerts = {rule["alert"] for group in yaml.safe_load(kit.RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}
    tests = yaml.safe_load((kit.DEPLOY / "prometheus" / "tests" / "gradwatch.test.yml").read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    assert alerts == {c["alertname"] for c in cases if c["exp_alerts"]} == {c["alertname"] for c in cases
                                                                               if not c["exp_alerts"]}
    assert {"ExplodingGradient", "NonFinite", "StalledTraining", "GradwatchIngestRefusals",
            "GradwatchAggregatorLag"} <= alerts
